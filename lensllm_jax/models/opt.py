"""OPT decoder block (separate q/k/v projections with biases, ReLU MLP, pre- or post-LN).

Parameter layout of one block "layers_i" (names follow Hugging Face
OPTForCausalLM; Dense kernels are [in, out], the transpose of torch's
nn.Linear weight):

    self_attn/{q_proj, k_proj, v_proj, out_proj}/{kernel [d, d], bias [d]}
    self_attn_layer_norm/{scale [d], bias [d]}
    fc1/{kernel [d, d_ff], bias [d_ff]}
    fc2/{kernel [d_ff, d], bias [d]}
    final_layer_norm/{scale [d], bias [d]}

pre_norm=True (OPT-125m, 1.3b, 2.7b, 6.7b, ...):
    x = x + attn(ln1(x));  x = x + mlp(ln2(x))
pre_norm=False (OPT-350m, do_layer_norm_before=False):
    x = ln1(x + attn(x));  x = ln2(x + mlp(x))
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lensllm_jax.models import layers
from lensllm_jax.models.config import ModelConfig


class OPTBlock(nn.Module):
  """One OPT decoder layer; the residual stream stays float32."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    drop = nn.Dropout(c.dropout_rate)
    out_std = layers.residual_std(c.n_layers)
    ln_attn = layers.layer_norm(c.norm_eps, "self_attn_layer_norm")
    ln_mlp = layers.layer_norm(c.norm_eps, "final_layer_norm")
    attn = layers.ProjectedAttention(c.n_heads, c.n_heads, c.head_dim, c.d_model, dtype,
                                     "out_proj", out_std, c.dropout_rate, name="self_attn")
    h = ln_attn(x) if c.pre_norm else x
    x = layers.add_residual(x, attn(h.astype(dtype), mask, deterministic), drop, deterministic)
    if not c.pre_norm:
      x = ln_attn(x)
    h = ln_mlp(x) if c.pre_norm else x
    h = layers.activation_fn(c.activation)(layers.dense(c.d_ff, dtype, "fc1")(h.astype(dtype)))
    h = layers.dense(c.d_model, dtype, "fc2", std=out_std)(h)
    x = layers.add_residual(x, h, drop, deterministic)
    return x if c.pre_norm else ln_mlp(x)
