"""Empirical neural tangent kernels, the NTK test loss F(Theta, t), NTK evolution.

Kernel. For a model output f(w, x) with per-example outputs of shape
[n, *out] and a selected subset w_S of the parameters (the others held fixed),
the empirical NTK is

    Theta(x1, x2) = J(x1) J(x2)^T,   J = d f / d w_S,

of shape [n1, n2, d1, d1', d2, d2', ...]: the example axes first, then one
pair per output axis that is not traced (neural-tangents' `zip` layout). A
traced output axis (e.g. the vocabulary of logits) is contracted:

    trace_reduction="mean":  Theta = (1/V) sum_v J_v(x1) J_v(x2)^T
                             (neural-tangents' convention, the default);
    trace_reduction="sum":   Theta = sum_v J_v(x1) J_v(x2)^T (the true trace).

"mean" is the per-output kernel under the usual assumption that the V
outputs share one kernel (Theta_full = Theta (x) I_V); that is the kernel to
put into F(Theta, t) when each output is treated as an independent
regression target. Per-example scalar outputs (the mean token log-likelihood
of a sequence, a per-example loss) need no trace: Theta is [n1, n2].

Large n. `make_blocked_ntk_fn` assembles the [n, n] kernel from blocks of
`block_size` examples: only the upper-triangle block pairs are computed and
mirrored, so peak memory holds the Jacobians of two blocks, not of all n
examples. Block pairs are sharded over the given devices with
`jax.shard_map` on a one-axis `jax.sharding.Mesh`.

Test loss. Under linearised gradient flow with learning rate eta the residual
r(t) = f_t(X) - Y is expm(-eta Theta t) r0, and (docs/ntk.md)

    F(Theta, t) = || expm(-eta Theta t) r0 ||^2
                = sum_k exp(-2 eta lambda_k t) proj_k^2,   proj = U^T r0,

with Theta = U diag(lambda) U^T. `ntk_test_loss(eigvals, proj, eta, t)` is this
sum; `ntk_f_term(t, aux)` with aux = (eigvals, proj, eta) is the
`f_term` for `lensllm_jax.laws.lensllm_law`.

Evolution. `kernel_distance(a, b) = 1 - <A, B>_F / (||A||_F ||B||_F)` and
`NTKRecorder`, which records the kernel on a fixed probe set at chosen steps.

neural-tangents is imported through `lensllm_jax.theory.nt_compat` only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from lensllm_jax import progress as progress_lib
from lensllm_jax.theory import nt_compat

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree], jax.Array]
NTKFn = Callable[..., jax.Array]

# "jacrev" is the naive reference: one jax.jacrev of the whole batch output
# and an explicit contraction (it materialises [n, *out, P]).
IMPLEMENTATIONS = ("jacobian_contraction", "ntk_vector_products", "jacrev")
# Chosen from experiments/bench_ntk_speed.py (see README, NTK section): on the
# small transformers here JACOBIAN_CONTRACTION is the fastest on CPU.
DEFAULT_IMPLEMENTATION = "jacobian_contraction"
_NT_IMPLEMENTATION = {"jacobian_contraction": 1, "ntk_vector_products": 2}


# ----------------------------------------------------------------------------
# Parameter subsets.


def _path_str(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def param_mask_from_names(params: PyTree, names: Iterable[str]) -> PyTree:
  """Boolean mask selecting the leaves whose path starts with one of `names`.

  Paths are "/"-joined pytree keys, e.g. "h_1/attn/c_attn/kernel" for a Flax
  parameter dict; `names=("h_1", "lm_head")` selects the last block of a
  2-layer model and the head.

  Args:
    params: the parameter pytree.
    names: path prefixes (whole components: "h_1" does not match "h_10").

  Returns:
    A pytree of Python bools with the structure of `params`.

  Raises:
    ValueError: if a name matches no leaf (the message lists the paths).
  """
  names = tuple(names)
  paths = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

  def matches(path: str, name: str) -> bool:
    name = name.strip("/")
    return path == name or path.startswith(name + "/")

  for name in names:
    if not any(matches(p, name) for p in paths):
      raise ValueError(f"param_mask_from_names: name {name!r} matches no parameter; "
                       f"paths are {paths}")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(matches(_path_str(p), n) for n in names), params)


def _mask_leaves(param_mask: PyTree | None, params: PyTree) -> tuple[bool, ...]:
  leaves, treedef = jax.tree.flatten(params)
  if param_mask is None:
    return (True,) * len(leaves)
  mask_leaves, mask_def = jax.tree.flatten(param_mask)
  if mask_def != treedef:
    raise ValueError("param_mask must have the structure of params; got "
                     f"{mask_def} for params {treedef}")
  mask = tuple(bool(m) for m in mask_leaves)
  if not any(mask):
    raise ValueError("param_mask selects no parameter")
  return mask


def split_params(params: PyTree, param_mask: PyTree | None):
  """Splits params into (selected leaves, merge function).

  Returns:
    selected: list of the selected leaves (the NTK's parameters).
    merge: merge(selected) -> the full params pytree, the other leaves fixed.
  """
  leaves, treedef = jax.tree.flatten(params)
  mask = _mask_leaves(param_mask, params)
  selected = [leaf for leaf, m in zip(leaves, mask, strict=True) if m]

  def merge(sel):
    it = iter(sel)
    return jax.tree.unflatten(treedef, [next(it) if m else leaf for leaf, m in zip(leaves, mask, strict=True)])

  return selected, merge


# ----------------------------------------------------------------------------
# Kernels.


def _normalise_axes(axes: Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"{what}: axis {a} out of range for outputs of rank {ndim}")
    a = a % ndim
    if a == 0:
      raise ValueError(f"{what}: axis 0 is the example axis and cannot be traced")
    out.append(a)
  return tuple(sorted(set(out)))


def _contraction_spec(out_ndim: int, trace_axes: tuple[int, ...]) -> str:
  """einsum spec of sum_p A[n1, *out, p] B[n2, *out', p] in the zip layout.

  Traced output axes share one index (summed); the others become pairs
  (d, d') after the example axes: [n1, n2, d1, d1', ...].
  """
  letters = "abcdefghijklmnopqrstuvwxyz"
  a_ix = list(letters[:out_ndim])
  b_ix = list(letters[out_ndim:2 * out_ndim])
  for ax in trace_axes:
    b_ix[ax] = a_ix[ax]
  keep = [ax for ax in range(out_ndim) if ax not in trace_axes]
  out_ix = "".join(a_ix[ax] + b_ix[ax] for ax in keep)
  return f"{''.join(a_ix)}Z,{''.join(b_ix)}Z->{out_ix}"


def _jacrev_ntk(f, sel, x1, x2, trace_axes):
  """Naive kernel: full jax.jacrev of each batch, explicit einsum contraction."""
  j1 = jax.jacrev(f)(sel, x1)
  j2 = j1 if x2 is None else jax.jacrev(f)(sel, x2)
  out_ndim = jax.eval_shape(f, sel, x1).ndim
  spec = _contraction_spec(out_ndim, trace_axes)
  total = 0.
  for a, b in zip(jax.tree.leaves(j1), jax.tree.leaves(j2), strict=True):
    a = a.reshape(a.shape[:out_ndim] + (-1,))
    b = b.reshape(b.shape[:out_ndim] + (-1,))
    total = total + jnp.einsum(spec, a, b)
  return total


def make_ntk_fn(
    apply_fn: ApplyFn,
    *,
    trace_axes: Sequence[int] = (),
    trace_reduction: str = "mean",
    param_mask: PyTree | None = None,
    implementation: str = DEFAULT_IMPLEMENTATION,
    vmap_axes: Any = 0,
) -> NTKFn:
  """Returns a jitted `ntk_fn(params, x1, x2=None)`: the empirical NTK.

  Args:
    apply_fn: `apply_fn(params, x) -> [n, *out]`; `x` is an array or pytree
      whose leaves have the example axis first. For a Flax module use
      `lambda p, x: model.apply({"params": p}, x)`.
    trace_axes: output axes (not 0) to contract, e.g. `(-1,)` for logits over
      the vocabulary; `()` keeps every output axis.
    trace_reduction: "mean" (neural-tangents' convention: divide by the
      product of the traced sizes) or "sum" (the true trace).
    param_mask: pytree of bools with the structure of params: the NTK is taken
      w.r.t. the True leaves only, the others are closed over as constants.
      None: all parameters. See `param_mask_from_names`.
    implementation: "jacobian_contraction" | "ntk_vector_products" (the
      neural-tangents implementations) | "jacrev" (naive reference).
      neural-tangents' STRUCTURED_DERIVATIVES does not run on the pinned JAX.
    vmap_axes: neural-tangents' `vmap_axes` (0: examples are independent, as
      in a transformer without batch statistics; None: no such assumption).

  Returns:
    `ntk_fn(params, x1, x2=None) -> Theta [n1, n2, d1, d1', ...]` (x2=None
    means x1 again), float32 like the model outputs.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
  if trace_reduction not in ("mean", "sum"):
    raise ValueError(f"trace_reduction={trace_reduction!r}: expected 'mean' or 'sum'")
  nt = nt_compat.import_neural_tangents() if implementation != "jacrev" else None
  trace_axes = tuple(trace_axes)

  def ntk_fn(params, x1, x2=None):
    sel, merge = split_params(params, param_mask)

    def f(sel_leaves, x):
      return apply_fn(merge(sel_leaves), x)

    out_shape = jax.eval_shape(f, sel, x1).shape
    axes = _normalise_axes(trace_axes, len(out_shape), "trace_axes")
    traced_size = math.prod(out_shape[a] for a in axes)
    if implementation == "jacrev":
      theta = _jacrev_ntk(f, sel, x1, x2, axes)  # sums over traced axes
      return theta / traced_size if trace_reduction == "mean" else theta
    else:
      kernel_fn = nt.empirical_ntk_fn(
          f, trace_axes=axes, diagonal_axes=(), vmap_axes=vmap_axes,
          implementation=_NT_IMPLEMENTATION[implementation])
      theta = kernel_fn(x1, x2, sel)
    # neural-tangents averages over traced axes.
    return theta * traced_size if trace_reduction == "sum" else theta

  return jax.jit(ntk_fn)


# ----------------------------------------------------------------------------
# Sketched kernels: memory O(n k + block) instead of O(n P).

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
    sel, merge = split_params(params, param_mask)
    leaf_ids = [i for i, m in enumerate(_mask_leaves(param_mask, params)) if m]

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


def kernel_to_matrix(theta: jax.Array) -> jax.Array:
  """[n1, n2, d1, d1', ..., dk, dk'] -> [n1*d1*...*dk, n2*d1'*...*dk'].

  The row index is (example, d1, ..., dk) in C order; use it with a residual
  r0 of shape [n, d1, ..., dk] flattened the same way.
  """
  extra = theta.ndim - 2
  if extra % 2:
    raise ValueError(f"kernel of rank {theta.ndim} is not [n1, n2, (d, d')...]")
  rows = (0,) + tuple(range(2, theta.ndim, 2))
  cols = (1,) + tuple(range(3, theta.ndim, 2))
  t = jnp.transpose(theta, rows + cols)
  nr = math.prod(theta.shape[a] for a in rows)
  return t.reshape(nr, -1)


def _block_transpose_perm(ndim: int) -> tuple[int, ...]:
  perm = [1, 0]
  for a in range(2, ndim, 2):
    perm += [a + 1, a]
  return tuple(perm)


def _leading_size(x: PyTree, what: str) -> int:
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(x)}
  if len(sizes) != 1:
    raise ValueError(f"{what}: leaves disagree on the example axis: sizes {sorted(sizes)}")
  return sizes.pop()


def _to_blocks(x: PyTree, n: int, block_size: int) -> tuple[PyTree, int]:
  nb = -(-n // block_size)
  # Pad with copies of example 0 (a valid input); padded rows are cropped.
  idx = np.concatenate([np.arange(n), np.zeros(nb * block_size - n, np.int64)])
  return jax.tree.map(lambda a: jnp.asarray(a)[idx].reshape((nb, block_size) + a.shape[1:]),
                      x), nb


def make_blocked_ntk_fn(
    ntk_fn: NTKFn,
    *,
    block_size: int,
    devices: Sequence[jax.Device] | None = None,
    pairs_per_call: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Callable[..., jax.Array]:
  """Wraps `ntk_fn` to assemble Theta from blocks of `block_size` examples.

  For x2=None only the block pairs (i, j), i <= j, are computed and the lower
  triangle is filled with the transposed blocks; otherwise every pair. Each
  call of the inner jitted function evaluates `pairs_per_call` pairs per
  device with `lax.map` (one pair's Jacobians in memory at a time per device),
  the pairs split over `devices` with `jax.shard_map`. n need not be a
  multiple of `block_size` (the last block is padded and cropped).

  Args:
    ntk_fn: from `make_ntk_fn`.
    block_size: examples per block (memory ~ the Jacobians of 2 blocks).
    devices: devices to shard block pairs over; None: `jax.local_devices()`.
      With several processes (jax.distributed), `jax.devices()` shares the
      pairs among every process' devices; every process calls the function
      and gets the whole kernel (read it with `sharding.host_copy`).
    pairs_per_call: block pairs per device per compiled call.
    progress: optional `progress(done_pairs, total_pairs)` callback.

  Returns:
    `blocked(params, x1, x2=None) -> Theta [n1, n2, ...]`, equal to
    `ntk_fn(params, x1, x2)`; `blocked.precompile(params, x1, x2=None)` compiles
    its program for those shapes ahead of the first call.
  """
  if block_size < 1:
    raise ValueError(f"block_size={block_size}: must be >= 1")
  devices = tuple(jax.local_devices() if devices is None else devices)
  mesh = Mesh(np.array(devices), ("blocks",))
  per_call = pairs_per_call * len(devices)

  def local_pairs(params, xb1, xb2, pairs):
    def one(ij):
      a = jax.tree.map(lambda t: t[ij[0]], xb1)
      b = jax.tree.map(lambda t: t[ij[1]], xb2)
      return ntk_fn(params, a, b)
    return jax.lax.map(one, pairs)

  rep = PartitionSpec()
  sharded = jax.jit(jax.shard_map(
      local_pairs, mesh=mesh, in_specs=(rep, rep, rep, PartitionSpec("blocks")),
      out_specs=PartitionSpec("blocks"), check_vma=False))

  def abstract_blocks(x):
    nb = -(-_leading_size(x, "x1") // block_size)
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((nb, block_size) + a.shape[1:], a.dtype), x)

  def precompile(params, x1, x2=None):
    """Compiles the block-pair program for these shapes (params and x may be
    `jax.ShapeDtypeStruct`s); a later call with arrays of the shapes compiles nothing."""
    xb1 = abstract_blocks(x1)
    xb2 = xb1 if x2 is None else abstract_blocks(x2)
    sharded.lower(params, xb1, xb2, jax.ShapeDtypeStruct((per_call, 2), jnp.int32)).compile()

  def blocked(params, x1, x2=None):
    symmetric = x2 is None
    n1 = _leading_size(x1, "x1")
    n2 = n1 if symmetric else _leading_size(x2, "x2")
    xb1, nb1 = _to_blocks(x1, n1, block_size)
    xb2, nb2 = (xb1, nb1) if symmetric else _to_blocks(x2, n2, block_size)
    pairs = [(i, j) for i in range(nb1) for j in range(nb2) if not symmetric or i <= j]
    total = len(pairs)
    pairs += [(0, 0)] * (-len(pairs) % per_call)
    pairs = np.asarray(pairs, np.int32)
    chunks = []
    for start in progress_lib.progress(range(0, len(pairs), per_call), desc="NTK blocks",
                                       unit="call"):
      chunks.append(sharded(params, xb1, xb2, jnp.asarray(pairs[start:start + per_call])))
      if progress is not None:
        progress(min(start + per_call, total), total)
    res = jnp.concatenate(chunks)[:total]  # [pairs, b, b, ...]
    pairs = pairs[:total]
    grid = jnp.zeros((nb1, nb2) + res.shape[1:], res.dtype)
    if symmetric:
      grid = grid.at[pairs[:, 1], pairs[:, 0]].set(
          jnp.transpose(res, (0,) + tuple(1 + a for a in _block_transpose_perm(res.ndim - 1))))
    grid = grid.at[pairs[:, 0], pairs[:, 1]].set(res)
    # [nb1, nb2, b, b, ...] -> [nb1, b, nb2, b, ...] -> [nb1*b, nb2*b, ...]
    grid = jnp.moveaxis(grid, 2, 1)
    theta = grid.reshape((nb1 * block_size, nb2 * block_size) + res.shape[3:])
    return theta[:n1, :n2]

  blocked.precompile = precompile
  return blocked


def empirical_ntk(apply_fn: ApplyFn, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                  block_size: int | None = None, devices: Sequence[jax.Device] | None = None,
                  **kwargs) -> jax.Array:
  """One-shot convenience: `make_ntk_fn(apply_fn, **kwargs)` (blocked if asked).

  Returns Theta [n1, n2, ...]; see `make_ntk_fn` for the kwargs and layout.
  Builds (and compiles) new functions at every call: in loops, keep the
  function from `make_ntk_fn` / `make_blocked_ntk_fn` instead.
  """
  fn = make_ntk_fn(apply_fn, **kwargs)
  if block_size is not None:
    fn = make_blocked_ntk_fn(fn, block_size=block_size, devices=devices)
  return fn(params, x1, x2)


LM_OUTPUTS = ("log_likelihood", "nll", "logits", "last_logits")


def lm_output_fn(model, output: str = "log_likelihood") -> ApplyFn:
  """`apply_fn(params, x)` for a `lensllm_jax.models.build(config)`.

  x is input_ids [B, T] or a dict with "input_ids" [B, T] and optionally
  "attention_mask" [B, T] (1 = real token) and "loss_mask" [B, T] (which
  next-token targets count; default: every pair of real tokens).
  An encoder-decoder (``model.config.is_encoder_decoder``) needs the dict
  with "targets" [B, T] too (`textdata.encode_examples(...,
  encoder_decoder=True)`): the encoder reads input_ids, the decoder the
  targets shifted right, and "log_likelihood" is each example's mean target
  log-likelihood over loss_mask (default: every target token).

  Args:
    model: a decoder-only `models.build(config)` module (e.g. `CausalLM`).
    output: "log_likelihood": [B] mean next-token log-likelihood of each
      sequence (`models.sequence_log_likelihood`); "nll": [B] per-example loss
      (its negative: the project's LM loss, `models.mean_token_nll`, of a
      batch of that one sequence); "logits": [B, T, V]; "last_logits": [B, V] at the last
      position (use trace_axes=(-1,) for a traced vocabulary kernel).

  Returns:
    apply_fn(params, x) with the example axis first.
  """
  from lensllm_jax import models  # local: ntk does not need models otherwise

  if output not in LM_OUTPUTS:
    raise ValueError(f"output={output!r}: expected one of {LM_OUTPUTS}")

  if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
    return _seq2seq_output_fn(model, output)

  def apply_fn(params, x):
    if isinstance(x, dict):
      ids, attn, loss_mask = x["input_ids"], x.get("attention_mask"), x.get("loss_mask")
    else:
      ids, attn, loss_mask = x, None, None
    logits = model.apply({"params": params}, ids, attention_mask=attn)
    if output == "logits":
      return logits
    if output == "last_logits":
      return logits[:, -1]
    targets, default_mask = models.next_token_targets(ids, attn)
    mask = default_mask if loss_mask is None else loss_mask
    ll = models.sequence_log_likelihood(logits, targets, mask)
    return ll if output == "log_likelihood" else -ll

  return apply_fn



def _seq2seq_output_fn(model, output: str) -> ApplyFn:
  from lensllm_jax import models  # local: ntk does not need models otherwise

  def apply_fn(params, x):
    if not isinstance(x, dict) or "targets" not in x:
      raise ValueError("an encoder-decoder's NTK input must be a dict with input_ids, "
                       "attention_mask, targets and loss_mask")
    mask = x.get("loss_mask")
    mask = jnp.ones(x["targets"].shape, jnp.float32) if mask is None else mask
    batch = {"input_ids": x["input_ids"], "attention_mask": x.get("attention_mask"),
             "targets": x["targets"], "target_mask": mask}
    logits = models.seq2seq_logits(model, params, batch)
    if output == "logits":
      return logits
    if output == "last_logits":
      return logits[:, -1]
    ll = models.sequence_log_likelihood(logits, x["targets"], mask)
    return ll if output == "log_likelihood" else -ll

  return apply_fn

# ----------------------------------------------------------------------------
# NTK-based test loss F(Theta, t).


class NTKSpectrum(NamedTuple):
  """Eigendecomposition of a kernel and a residual, float64.

  eigvals: [n] ascending, clipped at 0.
  eigvecs: [n, n] columns u_k.
  proj: [n] u_k^T r0.
  """
  eigvals: jax.Array
  eigvecs: jax.Array
  proj: jax.Array


def ntk_spectrum(theta: jax.Array, r0: jax.Array) -> NTKSpectrum:
  """float64 eigendecomposition of a symmetric PSD kernel and projections of r0.

  Theta = U diag(lambda) U^T via `jnp.linalg.eigh` on the symmetrised
  (Theta + Theta^T) / 2 in float64 (inside `jax.enable_x64`); eigenvalues
  below 0 (round-off of a PSD matrix) are clipped to 0.

  Args:
    theta: [n, n] kernel (e.g. `kernel_to_matrix` of an untraced kernel).
    r0: [n] initial residual f_0(X) - Y.

  Returns:
    NTKSpectrum(eigvals [n], eigvecs [n, n], proj [n]), float64.
  """
  with jax.enable_x64(True):
    theta = jnp.asarray(theta, jnp.float64)
    r0 = jnp.asarray(r0, jnp.float64)
    if theta.ndim != 2 or theta.shape[0] != theta.shape[1]:
      raise ValueError(f"theta must be a square [n, n] matrix, got shape {theta.shape}")
    if r0.shape != theta.shape[:1]:
      raise ValueError(f"r0 must have shape [{theta.shape[0]}], got {r0.shape}")
    eigvals, eigvecs = jnp.linalg.eigh(0.5 * (theta + theta.T))
    return NTKSpectrum(jnp.maximum(eigvals, 0.), eigvecs, eigvecs.T @ r0)


def ntk_mode_losses(eigvals: jax.Array, proj: jax.Array, eta, t) -> jax.Array:
  """Per-eigendirection terms of F: exp(-2 eta lambda_k t) proj_k^2.

  Args:
    eigvals: [n] kernel eigenvalues (>= 0).
    proj: [n] projections u_k^T r0.
    eta: learning rate (scalar).
    t: training time, any shape [...].

  Returns:
    [..., n] float64 (computed inside `jax.enable_x64`, also under jit);
    sums over the last axis to `ntk_test_loss`.
  """
  with jax.enable_x64(True):
    eigvals, proj, eta, t = (jnp.asarray(a, jnp.float64) for a in (eigvals, proj, eta, t))
    return jnp.exp(-2. * eta * t[..., None] * eigvals) * jnp.square(proj)


def ntk_test_loss(eigvals: jax.Array, proj: jax.Array, eta, t) -> jax.Array:
  """F(t) = sum_k exp(-2 eta lambda_k t) proj_k^2 = ||expm(-eta Theta t) r0||^2.

  float64 (inside `jax.enable_x64`). Jit-able, differentiable in t (and eta,
  eigvals, proj), vectorised over t.

  Args:
    eigvals: [n] eigenvalues of Theta (>= 0), e.g. `ntk_spectrum(...).eigvals`.
    proj: [n] projections U^T r0.
    eta: learning rate (scalar).
    t: time, any shape [...].

  Returns:
    F with the shape of t, float64.
  """
  with jax.enable_x64(True):
    return jnp.sum(ntk_mode_losses(eigvals, proj, eta, t), axis=-1)


def ntk_test_loss_from_kernel(theta: jax.Array, r0: jax.Array, eta, t) -> jax.Array:
  """Convenience: F(Theta, t) from the kernel [n, n] and residual [n]; float64."""
  spec = ntk_spectrum(theta, r0)
  return ntk_test_loss(spec.eigvals, spec.proj, eta, t)


def ntk_f_term(t, aux) -> jax.Array:
  """`f_term(t, aux)` for `lensllm_jax.laws.lensllm_law`: aux = (eigvals, proj, eta).

  aux is one curve's (eigvals [n], proj [n], eta []); `fit_curves(..., aux=...)`
  takes the same tuple with a leading [curves] axis on each entry.
  """
  eigvals, proj, eta = aux
  return ntk_test_loss(eigvals, proj, eta, t)


# ----------------------------------------------------------------------------
# NTK evolution.


def kernel_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """1 - <A, B>_F / (||A||_F ||B||_F), in [0, 2]; 0 for kernels equal up to scale.

  Args:
    a, b: kernels of equal shape (any rank; all entries are used).
  """
  a = jnp.asarray(a).ravel()
  b = jnp.asarray(b).ravel()
  if a.shape != b.shape:
    raise ValueError(f"kernel_distance: sizes differ ({a.shape[0]} vs {b.shape[0]})")
  return 1. - jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


@dataclasses.dataclass
class NTKRecorder:
  """Records Theta on a fixed probe set at chosen training steps.

  Usage in a training loop:

    rec = NTKRecorder(ntk_fn, probe_x, steps=(0, 100, 1000))
    for step in ...:
      rec.record(step, params)     # computes only when step is in `steps`
    rec.distances()                # kernel_distance to the first kernel

  Attributes:
    ntk_fn: `ntk_fn(params, x)` from `make_ntk_fn` or `make_blocked_ntk_fn`.
    probe_x: probe inputs (pytree, example axis first).
    steps: steps to record at; None records every call.
    kernels: dict step -> numpy kernel [n, n, ...] (filled by `record`).
  """
  ntk_fn: NTKFn
  probe_x: PyTree
  steps: Iterable[int] | None = None
  kernels: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.steps is not None:
      self.steps = frozenset(int(s) for s in self.steps)

  def record(self, step: int, params: PyTree) -> np.ndarray | None:
    """Computes and stores Theta(params) if `step` is a recording step."""
    step = int(step)
    if self.steps is not None and step not in self.steps:
      return None
    theta = np.asarray(jax.device_get(self.ntk_fn(params, self.probe_x)))
    self.kernels[step] = theta
    return theta

  def distances(self, reference_step: int | None = None) -> dict[int, float]:
    """kernel_distance of every recorded kernel to the one at `reference_step`.

    Args:
      reference_step: a recorded step; None: the earliest recorded step.
    """
    if not self.kernels:
      return {}
    ref = min(self.kernels) if reference_step is None else int(reference_step)
    if ref not in self.kernels:
      raise KeyError(f"reference_step={ref} was not recorded; have {sorted(self.kernels)}")
    return {s: float(kernel_distance(self.kernels[ref], k)) for s, k in sorted(self.kernels.items())}

  def consecutive_distances(self) -> dict[int, float]:
    """kernel_distance between each recorded kernel and the previous one."""
    steps = sorted(self.kernels)
    return {s: float(kernel_distance(self.kernels[p], self.kernels[s]))
            for p, s in zip(steps[:-1], steps[1:], strict=True)}
