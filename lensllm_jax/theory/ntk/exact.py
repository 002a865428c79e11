"""The exact empirical NTK Theta(x1, x2) = J(x1) J(x2)^T of a parameter subset: `make_ntk_fn`.

Layout, trace reduction and implementations: `lensllm_jax.theory.ntk`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lensllm_jax import xla_workarounds
from lensllm_jax.theory import hessian, nt_compat

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


def _split_selected(params: PyTree, param_mask: PyTree | None):
  """The NTK's parameters: `hessian.partition_leaves` of the leaves `param_mask` selects
  (None: all), the others held fixed.

  Returns:
    (leaf ids of the selected leaves, the selected leaves in tree order,
     merge(selected) -> the full params pytree).
  """
  ids = [i for i, m in enumerate(_mask_leaves(param_mask, params)) if m]
  selected, rest, merge = hessian.partition_leaves(params, ids)
  return ids, selected, lambda sel: merge(sel, rest)


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
    means x1 again), float32 like the model outputs. For "jacobian_contraction"
    with vmap_axes=0 it carries `ntk_fn.stages = (jacobian, contract)`, the
    kernel in two halves (`_jacobian_stages`; used by `make_blocked_ntk_fn`).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
  if trace_reduction not in ("mean", "sum"):
    raise ValueError(f"trace_reduction={trace_reduction!r}: expected 'mean' or 'sum'")
  nt = nt_compat.import_neural_tangents() if implementation != "jacrev" else None
  trace_axes = tuple(trace_axes)

  def ntk_fn(params, x1, x2=None):
    _, sel, merge = _split_selected(params, param_mask)

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

  fn = xla_workarounds.jit(ntk_fn, program="ntk_kernel")
  if implementation == "jacobian_contraction" and vmap_axes == 0:
    fn.stages = _jacobian_stages(apply_fn, param_mask, trace_axes, trace_reduction)
  return fn


def _jacobian_stages(apply_fn: ApplyFn, param_mask: PyTree | None, trace_axes: tuple[int, ...],
                     trace_reduction: str) -> tuple[Callable, Callable]:
  """The two halves of the "jacobian_contraction" kernel, for callers that reuse a Jacobian.

  jacobian(params, x) -> J: per selected leaf, [n, *out, *leaf.shape], the Jacobian of
  each example's output (one example at a time, vmapped: examples are independent).
  contract(params, j1, j2) -> Theta [n1, n2, d1, d1', ...]: sum over the leaves of the
  contraction of the traced output axes and the parameter axes (each leaf's term divided
  by the traced size, the zip layout), times the traced size for trace_reduction="sum".

  These are the operations of neural-tangents' JACOBIAN_CONTRACTION with vmap_axes=0, in
  its order, so contract(jacobian(x1), jacobian(x2)) gives ntk_fn(params, x1, x2) to the
  bit on the models tested (tests/theory/test_ntk.py); `make_blocked_ntk_fn` uses them
  to compute the two Jacobians of a block pair with one traced (and compiled) Jacobian.
  params is read for its selected leaves' shapes only.
  """
  def jacobian(params, x):
    _, sel, merge = _split_selected(params, param_mask)

    def one(xi):  # one example, given a batch axis of 1: its output [*out]
      xi = jax.tree.map(lambda a: jnp.expand_dims(a, 0), xi)
      return jax.jacobian(lambda s: jnp.squeeze(apply_fn(merge(s), xi), (0,)))(sel)

    return jax.vmap(one)(x)

  def contract(params, j1, j2):
    _, sel, _ = _split_selected(params, param_mask)
    out_ndim = j1[0].ndim - 1 - sel[0].ndim  # example axis, output axes, parameter axes
    axes = _normalise_axes(trace_axes, out_ndim + 1, "trace_axes")
    traced_size = math.prod(j1[0].shape[a] for a in axes)
    keep = len([a for a in range(1, out_ndim + 1) if a not in axes])
    zip_perm = tuple(i for k in range(keep + 1) for i in (k, keep + 1 + k))
    theta = None
    for a, b, leaf in zip(j1, j2, sel, strict=True):
      dims = axes + tuple(range(out_ndim + 1, out_ndim + 1 + leaf.ndim))
      term = jax.lax.dot_general(a, b, ((dims, dims), ((), ())))  # [n1, *kept, n2, *kept']
      term = jnp.transpose(term, zip_perm) / traced_size  # [n1, n2, d1, d1', ...]
      theta = term if theta is None else theta + term
    return theta * traced_size if trace_reduction == "sum" else theta

  return jacobian, contract
