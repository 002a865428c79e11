"""Sketched kernels: an unbiased NTK estimate in memory O(n k + block), and its error.

Theta_hat = (J S)(J S)^T with a random sketch S of k directions (count sketch,
Rademacher or Gaussian), E[Theta_hat] = Theta; `sketch_rms_error` and
`ntk_test_loss_error_bound` state how far it and F(Theta_hat, t) can be off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.theory.ntk.blocked import _leading_size, _to_blocks
from lensllm_jax.theory.ntk.exact import (
  ApplyFn,
  NTKFn,
  PyTree,
  _contraction_spec,
  _normalise_axes,
  _split_selected,
)

SKETCHES = ("countsketch", "rademacher", "gaussian")


def _leaf_sketch(key: jax.Array, leaf_index: int, g: jax.Array, sketch: str,
                 sketch_dim: int, chunk_size: int) -> jax.Array:
  """g [m, p] (rows: per-example output gradients on one leaf) -> g S_leaf [m, k].

  S_leaf [p, k] is the leaf's rows of the sketch matrix. It depends on (key,
  leaf_index) and, for the dense sketches, on the direction index j only (row
  s_j = draw(fold_in(fold_in(key, leaf), j))), so it is the same for every
  block of examples and every chunk size, and is never held whole: the dense
  sketches draw `chunk_size` directions at a time.
  """
  leaf_key = jax.random.fold_in(key, leaf_index)
  p = g.shape[1]
  if sketch == "countsketch":
    # One +-1 per parameter, in bucket h(p): E[S S^T] = I, cost O(m p). One
    # draw of 32 bits: the top bit is the sign, the other 31 pick the bucket
    # (uniform up to k / 2^31).
    bits = jax.random.bits(leaf_key, (p,), jnp.uint32)
    sign = jnp.where(bits >> 31, 1.0, -1.0).astype(g.dtype)
    bucket = ((bits & 0x7FFFFFFF) % sketch_dim).astype(jnp.int32)
    return jax.ops.segment_sum((g * sign).T, bucket, num_segments=sketch_dim).T

  def draw(k, shape, dtype):
    if sketch == "gaussian":
      return jax.random.normal(k, shape, dtype)
    return jnp.where(jax.random.bits(k, shape, jnp.uint32) >> 31, 1.0, -1.0).astype(dtype)

  chunk = min(chunk_size, sketch_dim)
  num_chunks = -(-sketch_dim // chunk)

  def one_chunk(c):
    directions = c * chunk + jnp.arange(chunk)
    rows = jax.vmap(lambda j: draw(jax.random.fold_in(leaf_key, j), (p,), g.dtype))(directions)
    return g @ rows.T  # [m, chunk]

  z = jax.lax.map(one_chunk, jnp.arange(num_chunks))  # [chunks, m, chunk]
  z = jnp.moveaxis(z, 0, 1).reshape(g.shape[0], num_chunks * chunk)
  # Directions past sketch_dim (last chunk's padding) are dropped; the scale
  # 1/sqrt(k) makes E[S S^T] / k = I.
  return z[:, :sketch_dim] / math.sqrt(sketch_dim)


def make_sketched_ntk_fn(
    apply_fn: ApplyFn,
    *,
    sketch_dim: int,
    key: jax.Array,
    trace_axes: Sequence[int] = (),
    trace_reduction: str = "mean",
    param_mask: PyTree | None = None,
    sketch: str = "countsketch",
    block_size: int | None = None,
    chunk_size: int = 128,
) -> NTKFn:
  """Returns a jitted `ntk_fn(params, x1, x2=None)`: an unbiased sketch of the NTK.

  Same arguments, layout ([n1, n2, d1, d1', ...]) and trace conventions as
  `make_ntk_fn`. Each example's output Jacobian J(x) [*out, P] is projected on
  k = sketch_dim random directions of parameter space, Z(x) = J(x) S [*out, k],
  and

      Theta_hat(x1, x2) = Z(x1) Z(x2)^T    (traced axes contracted as in make_ntk_fn),

  with S [P, k] random, E[S S^T] = I_P, so E[Theta_hat] = J1 E[S S^T] J2^T =
  Theta exactly (unbiased for every k). S is drawn per parameter leaf (keyed by
  the leaf's index in the full params pytree) and never materialised:

    "countsketch": each parameter p goes to one bucket h(p) in [k] with a
      random sign (one nonzero per row of S): O(P) work per example and no
      k x P draw at all -- the choice for LLM-sized models;
    "rademacher" / "gaussian": dense S with iid +-1 / N(0, 1) entries, scaled by
      1/sqrt(k) (the TRAK-style projection); O(P k) work per example, drawn
      `chunk_size` directions at a time.

  Error (Theta's entries as inner products <u, v> of Jacobian rows u = J_a,
  v = J_b; derivation: fourth moments of S; the countsketch value follows
  from the pairings of its signs and bucket collisions). For one entry,

      gaussian:                 Var = (|u|^2 |v|^2 + <u, v>^2) / k
                                    = (Theta_aa Theta_bb + Theta_ab^2) / k,
      rademacher, countsketch:  Var = (|u|^2 |v|^2 + <u, v>^2 - 2 sum_p u_p^2 v_p^2) / k,

  (no larger than the Gaussian one), hence for the whole kernel of a scalar
  output (or untraced outputs, flattened by `kernel_to_matrix`)

      E ||Theta_hat - Theta||_F^2 <= ((tr Theta)^2 + ||Theta||_F^2) / k,

  with equality for "gaussian" (`sketch_rms_error`). The relative error is
  thus at most sqrt((r + 1) / k), r = (tr Theta)^2 / ||Theta||_F^2 <= n the
  kernel's effective rank. With a traced axis (mean over V outputs) an entry is
  a quadratic form s^T M s, M = (1/V) sum_v u_v v_v^T, and Var = (||M||_F^2 +
  tr M^2) / k for Gaussian S (bounded by that for the others).

  Test loss: for x2=None Theta_hat is PSD (a Gram matrix), so F(Theta_hat, t)
  and F(Theta, t) both lie in [0, ||r0||^2], and since exp(-2 eta t lambda) is
  2 eta t-Lipschitz on lambda >= 0 (and a Lipschitz function of symmetric
  matrices is Lipschitz in Frobenius norm with the same constant),

      |F(Theta_hat, t) - F(Theta, t)| <= ||r0||^2 min(1, 2 eta t ||Theta_hat - Theta||_F)

  (`ntk_test_loss_error_bound`); its expectation is bounded with the line above.

  Memory: the per-example Jacobians of one block of `block_size` examples
  ([block, *out, P]) plus the features [n, *out, k] (and, dense sketches, one
  [chunk_size, leaf size] draw) -- O(n k + block), never n x P or P x k.

  Args:
    apply_fn: as for `make_ntk_fn`; examples must be independent (the
      per-example Jacobian is taken with `vmap` over examples).
    sketch_dim: k >= 1.
    key: PRNG key of S (the same key gives the same S for every input).
    trace_axes, trace_reduction, param_mask: as for `make_ntk_fn`.
    sketch: one of SKETCHES.
    block_size: examples per Jacobian block (None: all n at once).
    chunk_size: directions drawn at a time by the dense sketches.

  Returns:
    `ntk_fn(params, x1, x2=None, key=None) -> Theta_hat [n1, n2, ...]`,
    float32 (key: another sketch than the default `key`, e.g. vmapped over
    seeds). The features are `ntk_fn.features(params, x, key=None) -> Z [n,
    *out, k]` (Theta_hat = Z1 Z2^T, for streaming or sharding over examples).
  """
  if sketch_dim < 1:
    raise ValueError(f"sketch_dim={sketch_dim}: must be >= 1")
  if sketch not in SKETCHES:
    raise ValueError(f"sketch={sketch!r}: expected one of {SKETCHES}")
  if trace_reduction not in ("mean", "sum"):
    raise ValueError(f"trace_reduction={trace_reduction!r}: expected 'mean' or 'sum'")
  if block_size is not None and block_size < 1:
    raise ValueError(f"block_size={block_size}: must be >= 1")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
  trace_axes = tuple(trace_axes)

  default_key = key

  def features(params, x, key=None):
    key = default_key if key is None else key
    leaf_ids, sel, merge = _split_selected(params, param_mask)

    def one(sel_leaves, xi):  # one example -> its output [*out]
      return apply_fn(merge(sel_leaves), jax.tree.map(lambda a: a[None], xi))[0]

    n = _leading_size(x, "x")
    block = n if block_size is None else min(block_size, n)
    xb, _ = _to_blocks(x, n, block)
    out_shape = jax.eval_shape(one, sel, jax.tree.map(lambda a: a[0], x)).shape
    rows = block * math.prod(out_shape)

    def block_features(xblock):
      jac = jax.vmap(jax.jacrev(one), in_axes=(None, 0))(sel, xblock)  # [block, *out, *leaf]
      z = jnp.zeros((rows, sketch_dim), jnp.float32)
      for leaf_index, g in zip(leaf_ids, jac, strict=True):
        g = g.reshape(rows, -1).astype(jnp.float32)
        z = z + _leaf_sketch(key, leaf_index, g, sketch, sketch_dim, chunk_size)
      return z.reshape((block,) + out_shape + (sketch_dim,))

    z = jax.lax.map(block_features, xb)  # one block's Jacobians in memory at a time
    return z.reshape((-1,) + out_shape + (sketch_dim,))[:n]

  def ntk_fn(params, x1, x2=None, key=None):
    z1 = features(params, x1, key)
    z2 = z1 if x2 is None else features(params, x2, key)
    out_ndim = z1.ndim - 1
    axes = _normalise_axes(trace_axes, out_ndim, "trace_axes")
    theta = jnp.einsum(_contraction_spec(out_ndim, axes), z1, z2)
    if trace_reduction == "mean":
      theta = theta / math.prod(z1.shape[a] for a in axes)
    return theta

  fn = jax.jit(ntk_fn)
  fn.features = jax.jit(features)
  return fn


def sketch_rms_error(theta: jax.Array, sketch_dim: int) -> float:
  """sqrt(((tr Theta)^2 + ||Theta||_F^2) / k): the RMS Frobenius error
  sqrt(E ||Theta_hat - Theta||_F^2) of a Gaussian sketch of the [n, n] kernel
  Theta (an upper bound for the Rademacher and count sketches); float64."""
  theta = np.asarray(theta, np.float64)
  if theta.ndim != 2 or theta.shape[0] != theta.shape[1]:
    raise ValueError(f"theta must be a square [n, n] matrix, got shape {theta.shape}")
  return float(np.sqrt((np.trace(theta) ** 2 + np.sum(theta ** 2)) / sketch_dim))


def ntk_test_loss_error_bound(kernel_error: float, r0: jax.Array, eta, t) -> np.ndarray:
  """||r0||^2 min(1, 2 eta t ||Theta_hat - Theta||_F): a bound on
  |F(Theta_hat, t) - F(Theta, t)| for PSD kernels (see `make_sketched_ntk_fn`).

  Args:
    kernel_error: ||Theta_hat - Theta||_F (or its RMS, `sketch_rms_error`, for
      the bound on the expected error).
    r0: [n] residual; eta: learning rate; t: times [...].

  Returns:
    The bound with the shape of t, float64.
  """
  r0_sq = float(np.sum(np.asarray(r0, np.float64) ** 2))
  t = np.asarray(t, np.float64)
  return r0_sq * np.minimum(1.0, 2.0 * float(eta) * t * float(kernel_error))
