"""Llama decoder block (RMSNorm, rotary attention, SwiGLU MLP, no biases).

Parameter layout of one block "layers_i" (names follow Hugging Face
LlamaForCausalLM; Dense kernels are [in, out], i.e. the transpose of
torch's nn.Linear weight):

    input_layernorm/scale [d]
    self_attn/q_proj/kernel [d, H Dh]
    self_attn/k_proj/kernel [d, K Dh]
    self_attn/v_proj/kernel [d, K Dh]
    self_attn/o_proj/kernel [H Dh, d]
    post_attention_layernorm/scale [d]
    mlp/gate_proj/kernel [d, d_ff]
    mlp/up_proj/kernel [d, d_ff]
    mlp/down_proj/kernel [d_ff, d]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lensllm_jax.models import layers
from lensllm_jax.models.config import ModelConfig


def _dense(features: int, config: ModelConfig, name: str,
           std: float = layers.INIT_STD) -> nn.Dense:
  return layers.dense(features, jnp.dtype(config.dtype), name, std=std, use_bias=False)


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with rotary position embeddings on q and k."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array,
               deterministic: bool) -> jax.Array:
    c = self.config
    batch, length, _ = x.shape
    q = _dense(c.n_heads * c.head_dim, c, "q_proj")(x)
    k = _dense(c.n_kv_heads * c.head_dim, c, "k_proj")(x)
    v = _dense(c.n_kv_heads * c.head_dim, c, "v_proj")(x)
    q = layers.apply_rotary(q.reshape(batch, length, c.n_heads, c.head_dim), cos, sin)
    k = layers.apply_rotary(k.reshape(batch, length, c.n_kv_heads, c.head_dim), cos, sin)
    v = v.reshape(batch, length, c.n_kv_heads, c.head_dim)
    out = layers.dot_product_attention(q, k, v, mask, dropout=nn.Dropout(c.dropout_rate),
                                       deterministic=deterministic)
    return _dense(c.d_model, c, "o_proj", layers.residual_std(c.n_layers))(out)


class LlamaMLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    gate = layers.activation_fn(c.activation)(_dense(c.d_ff, c, "gate_proj")(x))
    up = _dense(c.d_ff, c, "up_proj")(x)
    return _dense(c.d_model, c, "down_proj", layers.residual_std(c.n_layers))(gate * up)


class LlamaBlock(nn.Module):
  """x + attn(rms(x)), then + mlp(rms(.)); the residual stream stays float32."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array,
               deterministic: bool) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    drop = nn.Dropout(c.dropout_rate)
    h = layers.RMSNorm(c.norm_eps, dtype, name="input_layernorm")(x)
    h = LlamaAttention(c, name="self_attn")(h, mask, cos, sin, deterministic)
    x = layers.add_residual(x, h, drop, deterministic)
    h = layers.RMSNorm(c.norm_eps, dtype, name="post_attention_layernorm")(x)
    return layers.add_residual(x, LlamaMLP(c, name="mlp")(h), drop, deterministic)
