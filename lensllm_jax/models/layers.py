"""Building blocks shared by the decoder-only models (GPT-2, the Llama family, OPT, Phi,
GPT-NeoX).

Shapes: B batch, T query length, S key length, H query heads, K key/value
heads, G = H / K queries per key/value head, Dh head width, d model width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.models import losses

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


def sliding_window_mask(mask: jax.Array, window: int) -> jax.Array:
  """``mask`` [B, 1, T, T] restricted to keys j with i - window < j (query index i)."""
  length = mask.shape[-1]
  i = jnp.arange(length)[:, None]
  return mask & (jnp.arange(length)[None, :] > i - window)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap tanh(x / cap) (Gemma 2's soft-capping of scores and logits); x if cap is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                          dropout: nn.Module | None = None,
                          deterministic: bool = True, scale: float | None = None,
                          bias: jax.Array | None = None,
                          softcap: float | None = None) -> jax.Array:
  """Multi-head (optionally grouped-query) softmax attention.

  out[b, t, h] = sum_s softmax_s(cap(q[b,t,h] . k[b,s,h//G] scale + bias[b,h,t,s]) + mask)
  v[b,s,h//G] with scale = 1/sqrt(Dh) by default (T5 uses 1), no bias by default
  (T5's relative-position bias) and cap = `soft_cap` with ``softcap`` (Gemma 2;
  identity by default). Scores and softmax are float32 whatever the input dtype.

  Args:
    q: [B, T, H, Dh].
    k: [B, S, K, Dh] with K dividing H (query head h reads key/value head h // G).
    v: [B, S, K, Dh].
    mask: [B, 1, T, S] bool (True = attend).
    dropout: optional `nn.Dropout` applied to the attention probabilities.
    deterministic: disables dropout.
    scale: score multiplier (default 1 / sqrt(Dh)).
    bias: optional [B or 1, H, T, S] float added to the scores.
    softcap: optional c of c tanh(scores / c), applied before the mask.

  Returns:
    [B, T, H * Dh] in v's dtype.
  """
  batch, length, heads, head_dim = q.shape
  kv_heads, keys = k.shape[2], k.shape[1]
  groups = heads // kv_heads
  # Heads-major operands, so that both products are plain batched matmuls over (b, k)
  # with the query rows of a key/value head's group stacked, [B, K, G T, Dh]: written
  # with the heads inside the einsums, XLA:CPU transposed the [B, K, G, T, S] scores
  # and probabilities around each product instead (1.7x slower forward + backward).
  q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  q = q.reshape(batch, kv_heads, groups * length, head_dim)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
  scores = scores.reshape(batch, kv_heads, groups, length, keys)
  scores = scores / math.sqrt(head_dim) if scale is None else scores * scale
  if bias is not None:
    scores = scores + bias.astype(jnp.float32).reshape(
        bias.shape[0], kv_heads, groups, length, keys)
  scores = soft_cap(scores, softcap)
  scores = jnp.where(mask[:, :, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    probs = dropout(probs, deterministic=deterministic)
  probs = probs.astype(v.dtype).reshape(batch, kv_heads, groups * length, keys)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
  out = out.reshape(batch, kv_heads, groups, length, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, length, heads * head_dim)


def rope_inv_freq(dim: int, theta: float) -> np.ndarray:
  """inv_freq[i] = theta^(-2 i / dim), i < dim / 2, float32 (the plain RoPE frequencies)."""
  exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def llama3_inv_freq(inv_freq: np.ndarray, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_len: int) -> np.ndarray:
  """Llama 3.1's RoPE scaling of the frequencies (float32).

  With wavelength w = 2 pi / f: w < orig / high_freq_factor keeps f; w >
  orig / low_freq_factor gives f / factor; in between f is interpolated,
  (1 - s) f / factor + s f with s = (orig / w - low) / (high - low).
  """
  wavelen = 2 * np.pi / inv_freq
  low = original_max_len / low_freq_factor
  high = original_max_len / high_freq_factor
  divided = np.where(wavelen > low, inv_freq / factor, inv_freq)
  smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * divided / factor + smooth * divided
  medium = (wavelen >= high) & (wavelen <= low)
  return np.where(medium, smoothed, divided).astype(np.float32)


def rotary_angles(positions: jax.Array, head_dim: int, theta: float,
                  inv_freq: jax.Array | np.ndarray | None = None,
                  scale: float | jax.Array = 1.0) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables of rotary position embeddings (rotate-half layout).

  angle[b, t, i] = positions[b, t] * inv_freq[i] for i < Dh/2, with
  inv_freq = theta^(-2 i / Dh) unless given (scaled RoPE), repeated over both
  halves of the head: cos/sin[..., i] == cos/sin[..., i + Dh/2]; both tables
  are multiplied by ``scale`` (LongRoPE's attention factor; 1 otherwise).

  Args:
    positions: [B, T] integer positions.
    head_dim: Dh (even; the rotated width).
    theta: RoPE base (10000 for Llama 1/2).
    inv_freq: optional [Dh / 2] frequencies replacing theta's.
    scale: multiplier of cos and sin.

  Returns:
    (cos, sin), each [B, T, Dh] float32.
  """
  if inv_freq is None:
    inv_freq = rope_inv_freq(head_dim, theta)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


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
  """Root-mean-square norm: y = x / sqrt(mean(x^2) + eps) * (offset + scale), in float32.

  Param: "scale" [d] (Hugging Face "weight"), initialised so that offset +
  scale = 1 (offset 1: Gemma, whose weights are stored as w in 1 + w). Output
  is cast to ``dtype``.
  """

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.constant(1.0 - self.offset), (x.shape[-1],),
                       jnp.float32)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (xf * (self.offset + scale)).astype(self.dtype)


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
  def __call__(self, h: jax.Array, targets: jax.Array | None = None,
               loss_mask: jax.Array | None = None, softcap: float | None = None):
    """logits [..., V] of h [..., d], soft-capped by ``softcap``; with ``targets``, the
    LM loss sums of those logits instead (`losses.head_token_nll_sums`)."""
    kernel = self.param("kernel", nn.initializers.normal(self.init_std),
                        (h.shape[-1], self.vocab_size), jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros, (self.vocab_size,), jnp.float32)
            if self.use_bias else None)
    if targets is not None:
      return losses.head_token_nll_sums(h, targets, loss_mask, kernel=kernel, bias=bias,
                                        softcap=softcap, dtype=self.dtype)
    rows = jnp.dot(h.reshape(-1, h.shape[-1]).astype(self.dtype), kernel.astype(self.dtype),
                   preferred_element_type=jnp.float32)  # 2-D: see `dense`
    logits = rows.reshape(h.shape[:-1] + (self.vocab_size,))
    if bias is not None:
      logits = logits + bias
    return soft_cap(logits, softcap)


def tied_logits(h: jax.Array, embedding: jax.Array, dtype) -> jax.Array:
  """Tied output head: logits[b, t, v] = h[b, t] . embedding[v], float32 accumulation.

  Computed on the rows [B T, d] (see `dense`: the embedding's gradient
  dlogits^T h is then a 2-D product, without a transposed copy of dlogits).
  """
  rows = jax.lax.dot_general(h.reshape(-1, h.shape[-1]).astype(dtype), embedding.astype(dtype),
                             (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return rows.reshape(h.shape[:-1] + (embedding.shape[0],))


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
          use_bias: bool = True) -> Callable[[jax.Array], jax.Array]:
  """Dense layer with float32 params, kernel [in, out] ~ N(0, std^2), matmul in ``dtype``.

  Returns x [..., in] -> x W + b [..., out]: an `nn.Dense` named ``name`` (its
  params) applied to the rows of x as one [rows, in] matrix. In 2-D the weight
  gradient x^T dy is a plain matrix product with a transposed operand, which
  XLA:CPU's matmul takes as is; with [B, T, in] operands (two contracting
  dimensions) it wrote the transposed activations or gradients out first.
  """
  layer = nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=nn.initializers.normal(std), name=name)
  return lambda x: layer(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1] + (features,))


def token_rows(x: jax.Array) -> jax.Array:
  """x [..., f] as one matrix of rows [N, f] (a bitcast), the layout of the blocks.

  The blocks of the Llama family, OPT, Phi / GPT-NeoX, T5 and BART keep their
  residual stream, norms and MLPs on the token rows [B T, d]; only attention
  views them as [B, T, ...] (`split_heads`). With [B, T, f] operands the bias
  and norm-scale gradients are sums over two dimensions, which XLA:CPU (YNNPACK
  reductions off, the jaxlib 0.10.2 workaround) runs as windowed reductions,
  ~8x slower than the column sum of the rows.
  """
  return x.reshape(-1, x.shape[-1])


def split_heads(rows: jax.Array, batch: int, heads: int) -> jax.Array:
  """rows [B L, heads Dh] of ``batch`` sequences -> [B, L, heads, Dh]."""
  return rows.reshape(batch, -1, heads, rows.shape[-1] // heads)


def qkv_projections(x: jax.Array, batch: int, n_heads: int, n_kv_heads: int, head_dim: int,
                    dtype, *, use_bias: bool, fused: str | None = None,
                    per_head: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q [B, T, H, Dh], k and v [B, T, K, Dh] from the rows x [B T, d] of ``batch`` sequences.

  Separate Dense layers "q_proj", "k_proj", "v_proj" by default; with
  ``fused`` one Dense of that name whose output columns are [q | k | v]
  (Phi-3's qkv_proj, widths H Dh, K Dh, K Dh) or, with ``per_head`` (needs
  K = H), head by head [q_h | k_h | v_h] (GPT-NeoX's query_key_value).
  """
  q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
  if fused is None:
    q = dense(q_dim, dtype, "q_proj", use_bias=use_bias)(x)
    k = dense(kv_dim, dtype, "k_proj", use_bias=use_bias)(x)
    v = dense(kv_dim, dtype, "v_proj", use_bias=use_bias)(x)
  elif per_head:
    qkv = split_heads(dense(3 * q_dim, dtype, fused, use_bias=use_bias)(x), batch, n_heads)
    return tuple(jnp.split(qkv, 3, axis=-1))
  else:
    qkv = dense(q_dim + 2 * kv_dim, dtype, fused, use_bias=use_bias)(x)
    q, k, v = jnp.split(qkv, [q_dim, q_dim + kv_dim], axis=-1)
  return (split_heads(q, batch, n_heads), split_heads(k, batch, n_kv_heads),
          split_heads(v, batch, n_kv_heads))


class ProjectedAttention(nn.Module):
  """Causal self-attention with q/k/v projections and biases (OPT, Phi, GPT-NeoX).

  q = x Wq + bq, k = x Wk + bk, v = x Wv + bv (heads H, H, K; head width Dh),
  optional rotary embeddings on q and k (cos/sin of width R <= Dh: partial
  rotary), softmax(q k^T / sqrt(Dh) + mask) v, then the output projection
  ``out_name`` (OPT "out_proj", Phi and GPT-NeoX "dense"). Params: q_proj,
  k_proj, v_proj (or one per-head fused ``fused_name``, GPT-NeoX's
  query_key_value: see `qkv_projections`), <out_name>, each {"kernel"
  [in, out], "bias" [out]}.
  """

  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_model: int
  dtype: jnp.dtype
  out_name: str
  out_std: float = 0.02
  dropout_rate: float = 0.0
  fused_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool,
               cos: jax.Array | None = None, sin: jax.Array | None = None) -> jax.Array:
    """x: rows [B T, d] (mask [B, 1, T, T]); returns rows [B T, d]."""
    q, k, v = qkv_projections(x, mask.shape[0], self.n_heads, self.n_kv_heads, self.head_dim,
                              self.dtype, use_bias=True, fused=self.fused_name, per_head=True)
    if cos is not None:
      q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = dot_product_attention(q, k, v, mask, dropout=nn.Dropout(self.dropout_rate),
                                deterministic=deterministic)
    return dense(self.d_model, self.dtype, self.out_name, std=self.out_std)(token_rows(out))
