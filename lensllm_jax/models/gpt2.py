"""GPT-2 transformer block (pre-LayerNorm, fused QKV, GELU MLP).

Parameter layout of one block "h_i" (names follow Hugging Face GPT-2, Dense
kernels are [in, out] like GPT-2's Conv1D weights):

    ln_1/{scale [d], bias [d]}
    attn/c_attn/{kernel [d, 3d], bias [3d]}    # columns: q | k | v, heads within each
    attn/c_proj/{kernel [d, d], bias [d]}
    ln_2/{scale [d], bias [d]}
    mlp/c_fc/{kernel [d, d_ff], bias [d_ff]}
    mlp/c_proj/{kernel [d_ff, d], bias [d]}
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lensllm_jax.models import layers
from lensllm_jax.models.config import ModelConfig


def _dense(features: int, config: ModelConfig, name: str,
           std: float = layers.INIT_STD):
  return layers.dense(features, jnp.dtype(config.dtype), name, std=std)


class GPT2Attention(nn.Module):
  """Causal multi-head self-attention with a fused QKV projection."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    c = self.config
    batch, length, _ = x.shape
    qkv = _dense(3 * c.d_model, c, "c_attn")(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    shape = (batch, length, c.n_heads, c.head_dim)
    out = layers.dot_product_attention(
        q.reshape(shape), k.reshape(shape), v.reshape(shape), mask,
        dropout=nn.Dropout(c.dropout_rate), deterministic=deterministic)
    return _dense(c.d_model, c, "c_proj", layers.residual_std(c.n_layers))(out)


class GPT2MLP(nn.Module):
  """d -> d_ff -> d with GELU."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    h = layers.activation_fn(c.activation)(_dense(c.d_ff, c, "c_fc")(x))
    return _dense(c.d_model, c, "c_proj", layers.residual_std(c.n_layers))(h)


class GPT2Block(nn.Module):
  """x + attn(ln_1(x)), then + mlp(ln_2(.)); the residual stream stays float32."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    drop = nn.Dropout(c.dropout_rate)
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # rows [B T, d]: see `layers.dense`
    h = layers.layer_norm(c.norm_eps, "ln_1")(x).astype(dtype)
    attn = GPT2Attention(c, name="attn")(h.reshape(shape), mask, deterministic)
    x = layers.add_residual(x, attn.reshape(x.shape), drop, deterministic)
    h = layers.layer_norm(c.norm_eps, "ln_2")(x).astype(dtype)
    return layers.add_residual(x, GPT2MLP(c, name="mlp")(h), drop, deterministic).reshape(shape)
