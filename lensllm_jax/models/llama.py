"""The Llama-family decoder block: RMSNorm, rotary attention, gated MLP, with options.

One block serves Llama 1-3 / SmolLM, Mistral, Qwen2 / 2.5, Qwen3, Phi-3,
Gemma 2 and Gemma 3 (`config.LLAMA_FAMILY`); the options are fields of
`ModelConfig` (see its docstring). Parameter layout of one block "layers_i"
(names follow Hugging Face; Dense kernels are [in, out], i.e. the transpose of
torch's nn.Linear weight):

    input_layernorm/scale [d]
    self_attn/q_proj/kernel [d, H Dh]    (+ bias [H Dh] with qkv_bias)
    self_attn/k_proj/kernel [d, K Dh]    (+ bias with qkv_bias)
    self_attn/v_proj/kernel [d, K Dh]    (+ bias with qkv_bias)
      or, with fused_projections, self_attn/qkv_proj/kernel [d, (H + 2K) Dh]
    self_attn/q_norm/scale, k_norm/scale [Dh]   (qk_norm only)
    self_attn/o_proj/kernel [H Dh, d]
    post_attention_layernorm/scale [d]
    pre_feedforward_layernorm/scale, post_feedforward_layernorm/scale [d]
                                          (sandwich_norms only)
    mlp/gate_proj/kernel [d, d_ff]
    mlp/up_proj/kernel [d, d_ff]
      or, with fused_projections, mlp/gate_up_proj/kernel [d, 2 d_ff] ([gate | up])
    mlp/down_proj/kernel [d_ff, d]

Block (RMSNorm scale offset + w, offset 1 for Gemma):
    plain:     x = x + attn(input_ln(x));  x = x + mlp(post_attention_ln(x))
    sandwich:  x = x + post_attention_ln(attn(input_ln(x)));
               x = x + post_feedforward_ln(mlp(pre_feedforward_ln(x)))
with mlp(h) = down(act(gate(h)) * up(h)) (SwiGLU; GeGLU with tanh GELU for
Gemma) and attention scores (q . k) / sqrt(query_pre_attn_scalar), soft-capped
when attn_softcap is set; the caller passes each layer its mask (sliding or
full) and its cos/sin tables. The residual stream x is the token rows [B T, d]
(`layers.token_rows`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lensllm_jax.models import layers
from lensllm_jax.models.config import ModelConfig


def _dense(features: int, config: ModelConfig, name: str,
           std: float = layers.INIT_STD):
  return layers.dense(features, jnp.dtype(config.dtype), name, std=std, use_bias=False)


def _norm(config: ModelConfig, name: str, dtype=None) -> layers.RMSNorm:
  dtype = jnp.dtype(config.dtype) if dtype is None else dtype
  return layers.RMSNorm(config.norm_eps, dtype, config.norm_offset, name=name)


def _head_norm(config: ModelConfig, name: str, x: jax.Array) -> jax.Array:
  """Float32 RMSNorm of each head of x [B, T, heads, Dh], on its rows [B T heads, Dh]."""
  return _norm(config, name, jnp.float32)(layers.token_rows(x)).reshape(x.shape)


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with rotary position embeddings on q and k; x and the
  result are rows [B T, d] (mask [B, 1, T, T])."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array,
               deterministic: bool) -> jax.Array:
    c = self.config
    q, k, v = layers.qkv_projections(
        x, mask.shape[0], c.n_heads, c.n_kv_heads, c.head_dim, jnp.dtype(c.dtype),
        use_bias=c.qkv_bias, fused="qkv_proj" if c.fused_projections else None)
    if c.qk_norm:  # normed and rotated in float32, rounded to the compute dtype once
      dtype = q.dtype
      q, k = _head_norm(c, "q_norm", q), _head_norm(c, "k_norm", k)
      q = layers.apply_rotary(q, cos, sin).astype(dtype)
      k = layers.apply_rotary(k, cos, sin).astype(dtype)
    else:
      q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    out = layers.dot_product_attention(q, k, v, mask, dropout=nn.Dropout(c.dropout_rate),
                                       deterministic=deterministic,
                                       scale=c.query_pre_attn_scalar ** -0.5,
                                       softcap=c.attn_softcap)
    return _dense(c.d_model, c, "o_proj", layers.residual_std(c.n_layers))(layers.token_rows(out))


class LlamaMLP(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)) (SwiGLU with silu, GeGLU with GELU)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    if c.fused_projections:
      gate, up = jnp.split(_dense(2 * c.d_ff, c, "gate_up_proj")(x), 2, axis=-1)
    else:
      gate, up = _dense(c.d_ff, c, "gate_proj")(x), _dense(c.d_ff, c, "up_proj")(x)
    gate = layers.activation_fn(c.activation)(gate)
    return _dense(c.d_model, c, "down_proj", layers.residual_std(c.n_layers))(gate * up)


class LlamaBlock(nn.Module):
  """Plain or sandwich-normed pre-norm block (module docstring) on the rows x [B T, d]
  (float32) of the residual stream; mask [B, 1, T, T]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array,
               deterministic: bool) -> jax.Array:
    c = self.config
    drop = nn.Dropout(c.dropout_rate)
    h = LlamaAttention(c, name="self_attn")(_norm(c, "input_layernorm")(x), mask, cos, sin,
                                            deterministic)
    if c.sandwich_norms:  # float32: it goes straight into the float32 residual stream
      h = _norm(c, "post_attention_layernorm", jnp.float32)(h)
    x = layers.add_residual(x, h, drop, deterministic)
    name = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
    h = LlamaMLP(c, name="mlp")(_norm(c, name)(x))
    if c.sandwich_norms:
      h = _norm(c, "post_feedforward_layernorm", jnp.float32)(h)
    return layers.add_residual(x, h, drop, deterministic)
