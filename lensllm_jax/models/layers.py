"""Building blocks shared by the decoder-only models (GPT-2, Llama, OPT, Phi).

Shapes: B batch, T query length, S key length, H query heads, K key/value
heads, G = H / K queries per key/value head, Dh head width, d model width.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# Large finite negative score for masked keys: a fully masked query row then
# gets a uniform (finite) softmax instead of NaN.
_MASK_VALUE = -1e30


def attention_mask_bias(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
  """Causal mask combined with a key padding mask.

  mask[b, 0, i, j] = (j <= i) and attention_mask[b, j].

  Args:
    attention_mask: [B, T] with 1 (or True) for real tokens and 0 for padding,
      or None (no padding).
    batch: B.
    length: T.

  Returns:
    [B, 1, T, T] bool, True where query i may attend to key j.
  """
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
  if attention_mask is None:
    return jnp.broadcast_to(causal, (batch, 1, length, length))
  if attention_mask.shape != (batch, length):
    raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected "
                     f"{(batch, length)} to match input_ids")
  keys = attention_mask.astype(bool)[:, None, None, :]
  return causal & keys


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                          dropout: nn.Module | None = None,
                          deterministic: bool = True, scale: float | None = None,
                          bias: jax.Array | None = None) -> jax.Array:
  """Multi-head (optionally grouped-query) softmax attention.

  out[b, t, h] = sum_s softmax_s(q[b,t,h] . k[b,s,h//G] scale + bias[b,h,t,s] + mask) v[b,s,h//G]
  with scale = 1/sqrt(Dh) by default (T5 uses 1) and no bias by default (T5's
  relative-position bias). Scores and softmax are float32 whatever the input dtype.

  Args:
    q: [B, T, H, Dh].
    k: [B, S, K, Dh] with K dividing H (query head h reads key/value head h // G).
    v: [B, S, K, Dh].
    mask: [B, 1, T, S] bool (True = attend).
    dropout: optional `nn.Dropout` applied to the attention probabilities.
    deterministic: disables dropout.
    scale: score multiplier (default 1 / sqrt(Dh)).
    bias: optional [B or 1, H, T, S] float added to the scores.

  Returns:
    [B, T, H * Dh] in v's dtype.
  """
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  q = q.reshape(batch, length, kv_heads, groups, head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(head_dim) if scale is None else scores * scale
  if bias is not None:
    scores = scores + bias.astype(jnp.float32).reshape(
        bias.shape[0], kv_heads, groups, length, k.shape[1])
  scores = jnp.where(mask[:, :, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    probs = dropout(probs, deterministic=deterministic)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
  return out.reshape(batch, length, heads * head_dim)


def rotary_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables of rotary position embeddings (rotate-half layout).

  angle[b, t, i] = positions[b, t] * theta^(-2 i / Dh) for i < Dh/2, repeated
  over both halves of the head: cos/sin[..., i] == cos/sin[..., i + Dh/2].

  Args:
    positions: [B, T] integer positions.
    head_dim: Dh (even).
    theta: RoPE base (10000 for Llama 1/2).

  Returns:
    (cos, sin), each [B, T, Dh] float32.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates each head of x by its position (Hugging Face rotate-half convention).

  With x = [x1, x2] (two halves of a head), the result is
  x * cos + [-x2, x1] * sin: the pairs (x1[i], x2[i]) are rotated by angle[i],
  so q(m) . k(n) depends on positions only through m - n.

  Partial rotary (Phi): when cos/sin are narrower than the head (R < Dh),
  only the first R channels are rotated (rotate-half within them) and the
  other Dh - R pass through unchanged.

  Args:
    x: [B, T, heads, Dh].
    cos, sin: [B, T, R] from `rotary_angles` with R <= Dh (R = Dh: full rotary).

  Returns:
    [B, T, heads, Dh] in x's dtype (computed in float32).
  """
  xf = x.astype(jnp.float32)
  width = cos.shape[-1]
  xr, passed = xf[..., :width], xf[..., width:]
  half = width // 2
  rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
  out = xr * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return jnp.concatenate([out, passed], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
  """Root-mean-square norm: y = x / sqrt(mean(x^2) + eps) * scale, in float32.

  Param: "scale" [d] (Hugging Face "weight"). Output is cast to ``dtype``.
  """

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (xf * scale).astype(self.dtype)


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
  """Float32 LayerNorm (exact two-pass variance), params "scale" and "bias"."""
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


class Unembed(nn.Module):
  """Untied output head: logits = h @ kernel (+ bias), kernel [d, V], bias [V]
  (only with use_bias, Phi), float32 accumulation."""

  vocab_size: int
  dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02
  use_bias: bool = False

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.normal(self.init_std),
                        (h.shape[-1], self.vocab_size), jnp.float32)
    logits = jnp.einsum("btd,dv->btv", h.astype(self.dtype), kernel.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    if self.use_bias:
      logits = logits + self.param("bias", nn.initializers.zeros, (self.vocab_size,), jnp.float32)
    return logits


def tied_logits(h: jax.Array, embedding: jax.Array, dtype) -> jax.Array:
  """Tied output head: logits[b, t, v] = h[b, t] . embedding[v], float32 accumulation."""
  return jnp.einsum("btd,vd->btv", h.astype(dtype), embedding.astype(dtype),
                    preferred_element_type=jnp.float32)


def activation_fn(name: str):
  """GELU (tanh approximation: GPT-2's gelu_new), exact GELU, SiLU or ReLU."""
  if name == "gelu_new":
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "silu":
    return jax.nn.silu
  if name == "relu":
    return jax.nn.relu
  raise ValueError(f"unknown activation {name!r}")


INIT_STD = 0.02  # normal init of the decoder-only models' weights (GPT-2's)


def residual_std(n_layers: int) -> float:
  """Init std of the projections into the residual stream, INIT_STD / sqrt(2 L)
  (GPT-2's scaling, so the residual stream's variance does not grow with depth)."""
  return INIT_STD / math.sqrt(2 * n_layers)


def add_residual(x: jax.Array, h: jax.Array, drop: nn.Dropout, deterministic: bool) -> jax.Array:
  """x + dropout(h), with the residual stream x kept in float32."""
  return x + drop(h, deterministic=deterministic).astype(jnp.float32)


def dense(features: int, dtype, name: str, *, std: float = INIT_STD,
          use_bias: bool = True) -> nn.Dense:
  """Dense layer with float32 params, kernel [in, out] ~ N(0, std^2), matmul in ``dtype``."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(std), name=name)


class ProjectedAttention(nn.Module):
  """Causal self-attention with separate q/k/v projections and biases (OPT, Phi).

  q = x Wq + bq, k = x Wk + bk, v = x Wv + bv (heads H, H, K; head width Dh),
  optional rotary embeddings on q and k (cos/sin of width R <= Dh: partial
  rotary), softmax(q k^T / sqrt(Dh) + mask) v, then the output projection
  ``out_name`` (OPT "out_proj", Phi "dense"). Params: q_proj, k_proj,
  v_proj, <out_name>, each {"kernel" [in, out], "bias" [out]}.
  """

  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_model: int
  dtype: jnp.dtype
  out_name: str
  out_std: float = 0.02
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool,
               cos: jax.Array | None = None, sin: jax.Array | None = None) -> jax.Array:
    batch, length, _ = x.shape
    q = dense(self.n_heads * self.head_dim, self.dtype, "q_proj")(x)
    k = dense(self.n_kv_heads * self.head_dim, self.dtype, "k_proj")(x)
    v = dense(self.n_kv_heads * self.head_dim, self.dtype, "v_proj")(x)
    q = q.reshape(batch, length, self.n_heads, self.head_dim)
    k = k.reshape(batch, length, self.n_kv_heads, self.head_dim)
    v = v.reshape(batch, length, self.n_kv_heads, self.head_dim)
    if cos is not None:
      q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = dot_product_attention(q, k, v, mask, dropout=nn.Dropout(self.dropout_rate),
                                deterministic=deterministic)
    return dense(self.d_model, self.dtype, self.out_name, std=self.out_std)(out)
