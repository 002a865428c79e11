"""Token-level losses and log-likelihoods of a causal LM.

Convention: logits[b, t] is the prediction for targets[b, t]; with the raw
model outputs, targets[b, t] = input_ids[b, t + 1] (see `next_token_targets`).
loss_mask[b, t] is 1 where targets[b, t] counts (target tokens only for
input -> target tasks, real tokens only under padding).

THE LM loss of the project (training objective, validation / test loss of a
curve, the loss whose Hessian the Hessian binaries and the study analyse) is
the mean NLL per target token over the batch, `mean_token_nll`:

    L = sum_{b,t} m_bt (-log p(targets_bt)) / sum_{b,t} m_bt,

computed from `token_nll_sums` (numerator, denominator), so that sums over
micro-batches or eval batches divide once. It is NOT the mean over sequences
of per-sequence means (`token_nll`), which weighs a short sequence's tokens
more. Per-example quantities (the NTK outputs of `ntk.lm_output_fn`, the
PAC-Bayes maxima over single examples) are the same definition applied to a
batch of one sequence: `token_nll` per row.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


def next_token_targets(input_ids: jax.Array,
                       attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Shifts ids left by one: targets[:, t] = input_ids[:, t + 1].

  Args:
    input_ids: [B, T] ints.
    attention_mask: [B, T] (1 = real token) or None.

  Returns:
    targets [B, T] int32 (last column 0) and loss_mask [B, T] float32,
    1 where both position t and t + 1 are real tokens (last column 0).
  """
  targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  real = attention_mask.astype(jnp.float32)
  mask = jnp.concatenate([real[:, :-1] * real[:, 1:], jnp.zeros_like(real[:, :1])], axis=1)
  return targets.astype(jnp.int32), mask


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets[b, t] | context) = log_softmax(logits)[b, t, targets[b, t]].

  Args:
    logits: [B, T, V].
    targets: [B, T] ints in [0, V).

  Returns:
    [B, T] float32.

  Computed as logits[b, t, targets] - logsumexp_v logits[b, t, v], the target
  logit gathered (B T values; a masked sum over the vocabulary was a [B, T, V]
  pass), with a JVP written as that masked sum: the gradient is then
  softmax - one_hot, elementwise and fused, instead of a scatter into a
  [B, T, V] array of zeros (the costliest op of a CPU backward pass at a
  large vocabulary), and no [B, T, V] log-softmax is kept.
  """
  logits = logits.astype(jnp.float32)
  return _target_logit(logits, targets.astype(jnp.int32)) - jax.nn.logsumexp(logits, axis=-1)


@jax.custom_jvp
def _target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits[b, t, targets[b, t]], [B, T]: a gather of B T values (no [B, T, V] pass);
  0 where a target is outside [0, V), like the masked sum of the JVP."""
  vocab = logits.shape[-1]
  picked = jnp.take_along_axis(logits, jnp.clip(targets, 0, vocab - 1)[..., None], axis=-1)
  return jnp.where((targets >= 0) & (targets < vocab), picked[..., 0], 0.0)


@_target_logit.defjvp
def _target_logit_jvp(primals, tangents):
  # The tangent as a masked sum over the vocabulary, so that its transpose (the
  # gradient) is the elementwise one_hot * cotangent, fused into d logits, not a scatter.
  logits, targets = primals
  vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  picked = jnp.sum(jnp.where(vocab == targets[..., None], tangents[0], 0.0), axis=-1)
  return _target_logit(logits, targets), picked


def token_nll(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Masked mean negative log-likelihood per sequence.

  nll[b] = -sum_t m[b,t] log p(targets[b,t]) / max(sum_t m[b,t], 1)
  (0 for a sequence with no counted token).

  Args:
    logits: [B, T, V].
    targets: [B, T] ints.
    loss_mask: [B, T] (1 = counted).

  Returns:
    [B] float32.
  """
  mask = loss_mask.astype(jnp.float32)
  total = -jnp.sum(token_log_probs(logits, targets) * mask, axis=-1)
  return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def sequence_log_likelihood(logits: jax.Array, targets: jax.Array,
                            loss_mask: jax.Array) -> jax.Array:
  """Per-sequence mean log-likelihood, -token_nll: [B] float32 (a scalar output per example)."""
  return -token_nll(logits, targets, loss_mask)


def token_nll_sums(logits: jax.Array, targets: jax.Array,
                   loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum_{b,t} m[b,t] (-log p(targets[b,t])), sum_{b,t} m[b,t]): float32 scalars.

  Args:
    logits: [B, T, V]; targets: [B, T] ints; loss_mask: [B, T] (1 = counted).
  """
  mask = loss_mask.astype(jnp.float32)
  return -jnp.sum(token_log_probs(logits, targets) * mask), jnp.sum(mask)


def mean_token_nll(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """THE LM loss (module docstring): mean NLL per counted token of the batch, scalar float32.

  sum_{b,t} m[b,t] (-log p) / max(sum_{b,t} m[b,t], 1). Unlike the mean of
  `token_nll`, long sequences weigh more.
  """
  total, count = token_nll_sums(logits, targets, loss_mask)
  return total / jnp.maximum(count, 1.0)


def head_token_nll_sums(h: jax.Array, targets: jax.Array, loss_mask: jax.Array, *,
                        embedding: jax.Array | None = None, kernel: jax.Array | None = None,
                        bias: jax.Array | None = None, softcap: float | None = None,
                        dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """`token_nll_sums` of the output head's logits, without writing the [B T, V] logits.

  logits = soft_cap(h E^T) with a tied embedding E [V, d], or soft_cap(h W + b)
  with an untied kernel W [d, V] (and bias b [V]); soft_cap(z) = c tanh(z / c)
  with c = softcap (none by default). Products in ``dtype``, accumulated in
  float32, as the heads of `layers`.

  Args:
    h: [B, T, d] final hidden states; targets: [B, T] ints; loss_mask: [B, T].
    embedding / kernel: exactly one of them; bias: [V] or None.

  Returns:
    (sum_bt m_bt (-log p(targets_bt)), sum_bt m_bt), float32 scalars: the value
    of `token_nll_sums(logits, targets, loss_mask)` to float32 rounding.

  The rows are taken in chunks (`_row_chunks`) whose logits stay in the cache.
  Differentiated, the forward pass also forms the gradients, per chunk,

      dz = m (softmax(z) - one_hot(target))  (times c's tanh' with a softcap)
      dh = dz W^T,  dW += h^T dz,  db += sum_rows dz,

  and the backward pass scales them by the scalar cotangent: three products
  of the logits' size (like autodiff of the dense head) and no [B T, V] array
  in memory. A custom VJP: no forward-mode derivative (jvp, Hessian-vector
  products); those go through the logits and `token_nll_sums`.
  """
  if (embedding is None) == (kernel is None):
    raise ValueError("head_token_nll_sums needs exactly one of embedding and kernel")
  tied = embedding is not None
  weight = embedding if tied else kernel
  vocab = weight.shape[0 if tied else 1]
  rows = h.reshape(-1, h.shape[-1])
  chunks = _row_chunks(rows.shape[0], vocab, rows.shape[1])
  spec = _HeadSpec(tied, softcap, jnp.dtype(dtype), chunks)
  mask = loss_mask.astype(jnp.float32).reshape(-1)
  total = _head_nll_total(spec, rows, weight, bias, targets.astype(jnp.int32).reshape(-1), mask)
  return total, jnp.sum(mask)


# A chunk's float32 logits [n, V] in bytes: measured on 2 cores with 2 MiB L2 and
# 32 MiB L3, the head of small-gpt2 (2048 rows, V 8192, d 256) ran in 300-330 ms
# forward + backward with chunks of 128-256 rows against 420-470 ms unchunked.
_CHUNK_BYTES = 8 << 20


def _row_chunks(rows: int, vocab: int, width: int) -> int:
  """How many row chunks `head_token_nll_sums` takes: chunks of the rows whose logits
  fill _CHUNK_BYTES, or one chunk (the dense head) when such a chunk has fewer rows
  than the width d: the weight gradient, [d, V], is then read and written more per
  chunk than the chunk's logits (gpt2-124m's head, 512 rows, V 50257, d 768: 1560 ms
  with chunks of 256 rows, 1390-1430 ms unchunked)."""
  per_chunk = _CHUNK_BYTES // (4 * vocab)
  if per_chunk < width or per_chunk >= rows:
    return 1
  return -(-rows // per_chunk)


class _HeadSpec(NamedTuple):
  """The static part of `head_token_nll_sums`: weight layout ([V, d] if tied, else
  [d, V]), softcap, product dtype, number of row chunks."""
  tied: bool
  softcap: float | None
  dtype: Any
  chunks: int


def _layouts(spec: _HeadSpec, weight):
  """(W^T [V, d], W [d, V]) in the product dtype: with chunks both (one transposed copy;
  each product then reads the layout it runs fastest with, ~90 GFLOP/s one thread
  where h E^T with E [V, d] ran at ~65 at small-gpt2's chunk shapes), else the given
  one and None (gpt2-124m's unchunked products ran alike in either layout)."""
  weight = weight.astype(spec.dtype)
  if spec.chunks > 1:
    return (weight, weight.T) if spec.tied else (weight.T, weight)
  return (weight, None) if spec.tied else (None, weight)


def _dot(a, b, contract_a: int, contract_b: int):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _chunk_logits(spec: _HeadSpec, h, w_vd, w_dv, bias):
  """(logits [n, V] float32, tanh(z / c) or None) of rows h [n, d]."""
  h = h.astype(spec.dtype)
  z = _dot(h, w_vd, 1, 1) if w_dv is None else _dot(h, w_dv, 1, 0)
  if bias is not None:
    z = z + bias
  if spec.softcap is None:
    return z, None
  tanh = jnp.tanh(z / spec.softcap)
  return spec.softcap * tanh, tanh


def _chunk_nll(z, targets):
  """(-log softmax(z)[targets] [n], log-sum-exp [n, 1]); nll = lse where a target is
  outside [0, V) (as `token_log_probs`)."""
  top = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  lse = jnp.log(jnp.sum(jnp.exp(z - top), axis=-1, keepdims=True)) + top
  return lse[:, 0] - _target_logit(z, targets), lse


def _chunk_value(spec, h, w_vd, w_dv, bias, targets, mask):
  z, _ = _chunk_logits(spec, h, w_vd, w_dv, bias)
  return jnp.sum(_chunk_nll(z, targets)[0] * mask)


def _chunk_value_and_grads(spec, h, w_vd, w_dv, bias, targets, mask):
  """(sum m nll, nll [n], dh [n, d], weight gradient, sum_rows dz [V] or None); the
  weight gradient is dz^T h [V, d] for an unchunked tied head (as autodiff forms
  it), else h^T dz [d, V]."""
  z, tanh = _chunk_logits(spec, h, w_vd, w_dv, bias)
  nll, lse = _chunk_nll(z, targets)
  hit = jnp.arange(z.shape[-1], dtype=jnp.int32) == targets[:, None]
  dz = mask[:, None] * (jnp.exp(z - lse) - hit.astype(jnp.float32))
  if tanh is not None:
    dz = dz * (1.0 - tanh * tanh)
  dz_low, h_low = dz.astype(spec.dtype), h.astype(spec.dtype)
  dh = _dot(dz_low, w_dv, 1, 1) if w_vd is None else _dot(dz_low, w_vd, 1, 0)
  if spec.tied and spec.chunks == 1:
    dweight = _dot(dz_low, h_low, 0, 0)
  else:
    dweight = _dot(h_low, dz_low, 0, 0)
  dbias = None if bias is None else jnp.sum(dz, axis=0)
  return jnp.sum(nll * mask), nll, dh, dweight, dbias


def _strided_chunks(spec, x):
  """[N, ...] -> [chunks, N / chunks, ...], chunk j = rows j, j + chunks, ...: a batch
  sharded by rows stays sharded inside every chunk. Zero rows pad N."""
  n = -(-x.shape[0] // spec.chunks)
  x = jnp.pad(x, [(0, n * spec.chunks - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return x.reshape((n, spec.chunks) + x.shape[1:]).swapaxes(0, 1)


def _unchunk(x, rows):
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])[:rows]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_nll_total(spec, h, weight, bias, targets, mask):
  """sum_rows mask * nll of the head's logits (`head_token_nll_sums`), float32 scalar."""
  w_vd, w_dv = _layouts(spec, weight)
  if spec.chunks == 1:
    return _chunk_value(spec, h, w_vd, w_dv, bias, targets, mask)

  def body(total, xs):
    hc, tc, mc = xs
    return total + _chunk_value(spec, hc, w_vd, w_dv, bias, tc, mc), None

  xs = tuple(_strided_chunks(spec, x) for x in (h, targets, mask))
  return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]


def _head_nll_fwd(spec, h, weight, bias, targets, mask):
  w_vd, w_dv = _layouts(spec, weight)
  if spec.chunks == 1:
    total, nll, dh, dweight, dbias = _chunk_value_and_grads(spec, h, w_vd, w_dv, bias,
                                                            targets, mask)
  else:

    def body(carry, xs):
      total, dweight, dbias = carry
      hc, tc, mc = xs
      t, nll, dh, dw, db = _chunk_value_and_grads(spec, hc, w_vd, w_dv, bias, tc, mc)
      dbias = None if db is None else dbias + db
      return (total + t, dweight + dw, dbias), (nll, dh)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w_dv.shape, jnp.float32),
            None if bias is None else jnp.zeros(bias.shape, jnp.float32))
    xs = tuple(_strided_chunks(spec, x) for x in (h, targets, mask))
    (total, dweight, dbias), (nll, dh) = jax.lax.scan(body, init, xs)
    nll, dh = _unchunk(nll, h.shape[0]), _unchunk(dh, h.shape[0])
  if spec.tied and spec.chunks > 1:
    dweight = dweight.T  # [V, d] like the embedding
  grads = (dh.astype(h.dtype), dweight.astype(weight.dtype),
           None if bias is None else dbias.astype(bias.dtype), nll)
  return total, grads


def _head_nll_bwd(spec, grads, g):
  dh, dweight, dbias, nll = grads
  dbias = None if dbias is None else (g * dbias).astype(dbias.dtype)
  return (g * dh).astype(dh.dtype), (g * dweight).astype(dweight.dtype), dbias, None, g * nll


_head_nll_total.defvjp(_head_nll_fwd, _head_nll_bwd)
