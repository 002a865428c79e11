"""Parallel decoder block: Phi (phi-1.5, phi-2, one LayerNorm) and GPT-NeoX (Pythia, two).

Parameter layout of one block "layers_i" (names follow Hugging Face
PhiForCausalLM; Dense kernels are [in, out], the transpose of torch's
nn.Linear weight):

    input_layernorm/{scale [d], bias [d]}
    self_attn/q_proj/{kernel [d, H Dh], bias [H Dh]}
    self_attn/{k_proj, v_proj}/{kernel [d, K Dh], bias [K Dh]}
    self_attn/dense/{kernel [H Dh, d], bias [d]}
    mlp/fc1/{kernel [d, d_ff], bias [d_ff]}
    mlp/fc2/{kernel [d_ff, d], bias [d]}

    phi:       h = ln(x);  x = x + attn(h) + mlp(h)
    gpt_neox:  x = x + attn(input_layernorm(x)) + mlp(post_attention_layernorm(x))

with rotary embeddings on the first rotary_dim channels of q and k. GPT-NeoX
(use_parallel_residual=True, Pythia) adds post_attention_layernorm/{scale,
bias} [d] and has one fused self_attn/query_key_value/{kernel [d, 3 d], bias
[3 d]} (output columns head by head: q_h | k_h | v_h, as Hugging Face's)
instead of q_proj, k_proj, v_proj.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lensllm_jax.models import layers
from lensllm_jax.models.config import ModelConfig


class PhiMLP(nn.Module):
  """d -> d_ff -> d with GELU (tanh approximation)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    h = layers.activation_fn(c.activation)(layers.dense(c.d_ff, dtype, "fc1")(x))
    return layers.dense(c.d_model, dtype, "fc2", std=layers.residual_std(c.n_layers))(h)


class PhiBlock(nn.Module):
  """x + attn(ln(x)) + mlp(ln(x)) (phi) or with two norms (gpt_neox); residual float32."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array,
               deterministic: bool) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    drop = nn.Dropout(c.dropout_rate)
    neox = c.arch == "gpt_neox"
    h = layers.layer_norm(c.norm_eps, "input_layernorm")(x).astype(dtype)
    h_mlp = (layers.layer_norm(c.norm_eps, "post_attention_layernorm")(x).astype(dtype)
             if neox else h)
    attn = layers.ProjectedAttention(c.n_heads, c.n_kv_heads, c.head_dim, c.d_model, dtype,
                                      "dense", layers.residual_std(c.n_layers),
                                      c.dropout_rate,
                                      fused_name="query_key_value" if neox else None,
                                      name="self_attn")
    x_attn = layers.add_residual(x, attn(h, mask, deterministic, cos, sin), drop, deterministic)
    return layers.add_residual(x_attn, PhiMLP(c, name="mlp")(h_mlp), drop, deterministic)
