"""Hessian-based PAC-Bayes quantities per layer block (Ju et al., ICML 2022).

For fine-tuned weights `w_hat`, pre-trained weights `w0` and a partition of
the parameters into layer blocks i, with `v_i = w_hat_i - w0_i` and `H_i` the
diagonal block of the loss Hessian at `w_hat` for block i (other blocks held
fixed), the bound of docs/pac_bayes.md reads

    L(f_w_hat) <= (1 + eps) L_hat(f_w_hat) + (1 + eps) sum_i sqrt(C H_i / n)
                  + O(n^(-3/4)),
    H_i = max over training examples (x, y) of v_i^T H_i^+[loss(x, y)] v_i,

with `H_i^+` the positive part of the per-example block Hessian (its
eigen-decomposition with negative eigenvalues set to 0).

Positive-part quadratic form. Run m Lanczos steps on `H_i` started at
`q0 = v / ||v||`, giving `T = S diag(theta) S^T` (tridiagonal, m x m). Then

    v^T H^+ v  ~=  ||v||^2 e1^T max(T, 0) e1 = ||v||^2 sum_j max(theta_j, 0) S[0, j]^2,

the m-point Gauss quadrature of the spectral measure of H seen from v
(`hessian.QuadratureResult`). It is EXACT once the Krylov space
`K = span{v, Hv, H^2 v, ...}` is exhausted (m >= dim K, at most the block
size): K is invariant, `v = ||v|| Q^T e1` and `H Q^T = Q^T T`, so
`H^+ v = ||v|| Q^T max(T, 0) e1`. The plain form `v^T H v = ||v||^2 T[0, 0]`
is exact for every m >= 1. Reported diagnostics: the change of the
positive-part value between m - 1 and m steps.

Costs: the per-example maximum needs one m-step Lanczos per training
example and block (n * m HVPs of single examples per block). All blocks
share ONE compiled program (`lax.map` over examples): the block enters as a
0/1 mask M on the flat parameter vector and the block Hessian acts as
`M H M` (see `_FormsProgram`), so each product costs one full-model HVP. The mean over examples of `v^T H v` is
`v^T (mean H) v` (linear). The positive part of the MEAN Hessian
(`vhpv_batch`, one Lanczos over all examples) is cheaper and reported
beside it; note `mean_x (v^T H_x^+ v) >= v^T (mean_x H_x)^+ v`.

Layer blocks: by default one block per top-level key of the parameter dict
(one per top-level Flax module: "wte", "h_0", ..., "ln_f" for our models);
custom partitions by path prefixes or a function of the leaf path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from lensllm_jax.theory import hessian

Array = jax.Array
PyTree = Any
Partition = Mapping[str, Sequence[str]] | Callable[[str], str | None] | None


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_paths(params: PyTree) -> list[str]:
  """Paths "a/b/c" of the leaves of `params`, in `tree_leaves` order."""
  with_path, _ = jax.tree_util.tree_flatten_with_path(params)
  return ["/".join(_key_name(e) for e in path) for path, _ in with_path]


def layer_blocks(params: PyTree, partition: Partition = None) -> dict[str, tuple[int, ...]]:
  """Partitions the parameter leaves into named layer blocks.

  Args:
    params: the parameter pytree (the "params" collection, not the whole
      `variables` dict).
    partition:
      None: one block per top-level key of `params` (top-level Flax module);
      a mapping block name -> path prefixes ("h_0", "h_0/attn"): a leaf
      belongs to the block of the prefix it starts with (leaves matching no
      prefix are left out, a leaf matching two blocks is an error);
      a callable leaf path -> block name (None leaves the leaf out).

  Returns:
    dict block name -> leaf indices (into `jax.tree_util.tree_leaves`), in
    the order the blocks first appear.
  """
  paths = leaf_paths(params)
  if partition is None:
    if not isinstance(params, Mapping):
      raise ValueError("layer_blocks: default partition needs a dict of parameters "
                       f"(got {type(params).__name__}); pass partition=...")
    if set(params.keys()) == {"params"}:
      raise ValueError("layer_blocks: got the whole Flax variables dict; pass "
                       "variables['params'] instead")
    assign = lambda p: p.split("/")[0]  # noqa: E731
  elif isinstance(partition, Mapping):
    def assign(p):
      hits = [name for name, prefixes in partition.items()
              for pre in prefixes if p == pre or p.startswith(pre.rstrip("/") + "/")]
      if len(set(hits)) > 1:
        raise ValueError(f"layer_blocks: leaf {p!r} matches several blocks {sorted(set(hits))}")
      return hits[0] if hits else None
  elif callable(partition):
    assign = partition
  else:
    raise ValueError(f"layer_blocks: partition must be None, a mapping or a callable, "
                     f"got {type(partition).__name__}")
  blocks: dict[str, list[int]] = {}
  for i, p in enumerate(paths):
    name = assign(p)
    if name is not None:
      blocks.setdefault(str(name), []).append(i)
  if not blocks:
    raise ValueError(f"layer_blocks: the partition selects no leaves (paths: {paths[:5]}...)")
  return {k: tuple(v) for k, v in blocks.items()}


class ExampleForms(NamedTuple):
  """Per-example quadratic forms of one block (all arrays [n]).

  Attributes:
    vhv: `v^T H_x v` (exact).
    vhpv: `v^T H_x^+ v` (Lanczos quadrature, m steps).
    change: |positive-part value(m) - value(m - 1)|, convergence diagnostic.
    num_breakdowns: Lanczos restarts (Krylov space exhausted) per example.
  """

  vhv: Array
  vhpv: Array
  change: Array
  num_breakdowns: Array


def _block_mask(params: PyTree, block: Sequence[int] | None, dtype) -> np.ndarray:
  """[P] 0/1 mask of the block's coordinates in `ravel_pytree(params)` order."""
  leaves = jax.tree_util.tree_leaves(params)
  ids = set(range(len(leaves))) if block is None else set(block)
  if not ids or min(ids) < 0 or max(ids) >= len(leaves):
    raise ValueError(f"block leaf indices {sorted(ids)} invalid for {len(leaves)} leaves")
  return np.concatenate([np.full(leaf.size, float(i in ids), dtype)
                         for i, leaf in enumerate(leaves)])


def _masked_hvp(loss_fn, unravel, flat, mask, batch, x):
  """`M H M x` with M = diag(mask): the block Hessian embedded in R^P."""
  def f(w):
    return loss_fn(unravel(w), batch)

  return mask * jax.jvp(jax.grad(f), (flat,), (mask * x,))[1]


class _FormsProgram:
  """One compiled program for every block: the block is a [P] mask argument.

  The block Hessian `H_ii` acts on the block's coordinates of the full flat
  vector as `M H M` (zero elsewhere); Lanczos started at `v = M (w_hat - w0)`
  stays in the block (restarts after breakdown may leave it, but those
  directions are decoupled from e1 and do not change the quadrature). Blocks
  of different sizes then share one compilation.
  """

  def __init__(self, loss_fn, params, num_iters, dtype, batch_form=True):
    self.batch_form = batch_form
    flat, self.unravel = ravel_pytree(params)
    self.dtype = np.dtype(dtype or flat.dtype)
    self.dim = int(flat.shape[0])
    self.m = int(min(num_iters, self.dim))
    self.hvp = jax.jit(functools.partial(_masked_hvp, loss_fn, self.unravel))
    self.run = jax.jit(self._run)

  def _op(self, flat, mask, batch):
    return hessian.LinearOperator(jax.tree_util.Partial(self.hvp, flat, mask, batch), self.dim,
                                  self.dtype)

  def _run(self, flat, mask, v, examples, key):
    def one(example):
      batch = jax.tree_util.tree_map(lambda a: a[None], example)
      res = hessian.lanczos(self._op(flat, mask, batch), key, self.m, v0=v)
      quad = hessian.quadrature_from_lanczos(res, hessian.positive_part)
      return quad.norm_sq * res.alphas[0], quad.value, quad.change, res.num_breakdowns

    forms = ExampleForms(*lax.map(one, examples))
    if not self.batch_form:
      return forms, jnp.asarray(jnp.nan, self.dtype)
    res = hessian.lanczos(self._op(flat, mask, examples), key, self.m, v0=v)
    return forms, hessian.quadrature_from_lanczos(res, hessian.positive_part).value

  def __call__(self, params, params0, block, examples, key):
    mask = _block_mask(params, block, self.dtype)
    flat = ravel_pytree(params)[0].astype(self.dtype)
    v = mask * (flat - ravel_pytree(params0)[0].astype(self.dtype))
    return self.run(flat, jnp.asarray(mask), v, examples, key), int(mask.sum()), v


def _forms_program(loss_fn, params, num_iters, dtype, batch_form=True) -> _FormsProgram:
  """The `_FormsProgram` of (loss_fn, parameter shapes, settings), built once.

  Repeated `layer_table` / `per_example_forms` calls with the same loss_fn
  and parameter structure then reuse one compilation instead of recompiling.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  specs = tuple((tuple(np.shape(x)), np.dtype(x.dtype).str) for x in leaves)
  dtype_key = None if dtype is None else np.dtype(dtype).str
  return _cached_forms_program(loss_fn, treedef, specs, int(num_iters), dtype_key, batch_form)


@functools.lru_cache(maxsize=32)
def _cached_forms_program(loss_fn, treedef, specs, num_iters, dtype, batch_form):
  template = jax.tree_util.tree_unflatten(treedef, [np.zeros(s, d) for s, d in specs])
  return _FormsProgram(loss_fn, template, num_iters, dtype, batch_form)


def per_example_forms(loss_fn: hessian.LossFn, params: PyTree, params0: PyTree,
                      examples: PyTree, key: Array, *, block: Sequence[int] | None = None,
                      num_iters: int = 20, dtype: Any = None) -> ExampleForms:
  """`v^T H_x v` and `v^T H_x^+ v` for each training example x, one block.

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar` for a batch; each example is
      passed as a batch of one (leading axis 1).
    params: the fine-tuned point w_hat (Hessians are taken here).
    params0: the pre-trained point w0 (same structure).
    examples: pytree of arrays with leading axis [n] (one row per example).
    key: PRNG key (Lanczos restarts).
    block: leaf indices of the block (None: all parameters).
    num_iters: Lanczos steps m (clipped to the number of parameters).
    dtype: optional dtype for the flat parameter vector (e.g. float64).

  Returns:
    `ExampleForms` with arrays [n]. One jit-compiled `lax.map` over examples.
  """
  program = _forms_program(loss_fn, params, num_iters, dtype, batch_form=False)
  (forms, _), _, _ = program(params, params0, block, examples, key)
  return forms


class LayerRow(NamedTuple):
  """One row of the per-layer PAC-Bayes table (`pandas.DataFrame(rows)`).

  Attributes:
    block: block name.
    num_params: parameters in the block.
    v_norm: `||v_i|| = ||w_hat_i - w0_i||`.
    vhv_mean: mean over examples of `v^T H_x v` (= `v^T (mean H) v`).
    vhv_max: max over examples of `v^T H_x v`.
    vhpv_mean: mean over examples of `v^T H_x^+ v`.
    vhpv_max: max over examples of `v^T H_x^+ v`: the H_i of the bound.
    vhpv_batch: `v^T (mean_x H_x)^+ v` (one Lanczos on the mean Hessian).
    argmax_example: index of the example attaining vhpv_max.
    num_iters: Lanczos steps m (num_iters clipped to the total parameter
      count; steps beyond the block's Krylov dimension only restart).
    max_change: max over examples of the m-1 -> m change of `v^T H^+ v`.
    sqrt_term: `sqrt(C vhpv_max / n)` when C and n were given, else nan.
  """

  block: str
  num_params: int
  v_norm: float
  vhv_mean: float
  vhv_max: float
  vhpv_mean: float
  vhpv_max: float
  vhpv_batch: float
  argmax_example: int
  num_iters: int
  max_change: float
  sqrt_term: float


def layer_table(loss_fn: hessian.LossFn, params: PyTree, params0: PyTree, examples: PyTree,
                key: Array, *, partition: Partition = None, num_iters: int = 20,
                dtype: Any = None, c: float | None = None,
                n: int | None = None) -> list[LayerRow]:
  """Per-layer PAC-Bayes table: quadratic forms of `v_i = w_hat_i - w0_i`.

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar`, the MEAN loss over a batch
      (so that the loss of all `examples` as one batch is the mean of the
      per-example losses).
    params: fine-tuned parameters w_hat (Hessians are taken here).
    params0: pre-trained parameters w0 (same structure).
    examples: training examples, pytree with leading axis [n_ex].
    key: PRNG key.
    partition: see `layer_blocks` (default: one block per top-level module).
    num_iters: Lanczos steps per quadratic form.
    dtype: optional dtype for the Hessian computations (e.g. float64).
    c, n: optional constant C and sample size n for the `sqrt_term` column
      (n defaults to the number of examples when only c is given).

  Returns:
    list of `LayerRow`, one per block.
  """
  struct, struct0 = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(params0)
  if struct != struct0:
    raise ValueError("layer_table: params and params0 have different structures:\n"
                     f"{struct}\nvs\n{struct0}")
  n_ex = jax.tree_util.tree_leaves(examples)[0].shape[0]
  if c is not None and n is None:
    n = n_ex
  program = _forms_program(loss_fn, params, num_iters, dtype)
  rows = []
  for b, (name, ids) in enumerate(layer_blocks(params, partition).items()):
    (forms, batch_value), size, v = program(params, params0, ids, examples,
                                            jax.random.fold_in(key, b))
    vhpv = np.asarray(forms.vhpv)
    hmax = float(vhpv.max())
    sqrt_term = float(np.sqrt(c * max(hmax, 0.0) / n)) if c is not None else float("nan")
    rows.append(LayerRow(
        block=name, num_params=size, v_norm=float(jnp.linalg.norm(v)),
        vhv_mean=float(np.mean(forms.vhv)), vhv_max=float(np.max(forms.vhv)),
        vhpv_mean=float(vhpv.mean()), vhpv_max=hmax, vhpv_batch=float(batch_value),
        argmax_example=int(vhpv.argmax()), num_iters=program.m,
        max_change=float(np.max(forms.change)), sqrt_term=sqrt_term))
  return rows


def pac_bayes_bound(h: Sequence[float] | Array, c: float, n: int) -> float:
  """The layer sum `sum_i sqrt(C H_i / n)` of the bound (docs/pac_bayes.md).

  Args:
    h: [L] the per-layer H_i (e.g. `[r.vhpv_max for r in rows]`); must be >= 0.
    c: the constant C > 0.
    n: the number of training samples n > 0.
  """
  h = np.asarray(h, dtype=np.float64)
  if c <= 0 or n <= 0:
    raise ValueError(f"pac_bayes_bound: need c > 0 and n > 0, got c={c}, n={n}")
  if np.any(h < 0) or not np.all(np.isfinite(h)):
    raise ValueError(f"pac_bayes_bound: H_i must be finite and >= 0, got {h}")
  return float(np.sum(np.sqrt(c * h / n)))


def generalization_bound(train_loss: float, h: Sequence[float] | Array, c: float, n: int,
                         eps: float = 0.0) -> float:
  """`(1 + eps) (L_hat + sum_i sqrt(C H_i / n))`, without the O(n^(-3/4)) term."""
  return float((1 + eps) * (train_loss + pac_bayes_bound(h, c, n)))


def table_columns(rows: Sequence[LayerRow]) -> dict[str, np.ndarray]:
  """Column dict of a table (`pandas.DataFrame(table_columns(rows))`)."""
  return {f: np.asarray([getattr(r, f) for r in rows]) for f in LayerRow._fields}
