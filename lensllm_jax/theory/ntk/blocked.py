"""Blocked kernels: the [n, n] NTK from blocks of examples, sharded over devices.

Only the upper-triangle block pairs are computed and mirrored, so peak memory
holds the Jacobians of two blocks; block pairs are sharded with `jax.shard_map`.
A kernel from `make_ntk_fn`'s jacobian_contraction brings its two stages
(`ntk_fn.stages`): a pair's two Jacobians then come from one traced Jacobian
mapped over both blocks, so the compiled program holds one copy of it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lensllm_jax import progress as progress_lib
from lensllm_jax import xla_workarounds
from lensllm_jax.theory.ntk.exact import ApplyFn, NTKFn, PyTree, make_ntk_fn


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

  def blocks(a):
    shape = (nb, block_size) + a.shape[1:]
    if isinstance(a, np.ndarray):  # host inputs (a probe set): no device program to compile
      return a[idx].reshape(shape)
    return jnp.asarray(a)[idx].reshape(shape)

  return jax.tree.map(blocks, x), nb


def _block_pairs(nb1: int, nb2: int, symmetric: bool, per_call: int) -> tuple[np.ndarray, int]:
  """The (i, j) block pairs to compute, padded with (0, 0) to a multiple of per_call
  ([m, 2] int32), and how many are real."""
  pairs = [(i, j) for i in range(nb1) for j in range(nb2) if not symmetric or i <= j]
  total = len(pairs)
  pairs += [(0, 0)] * (-len(pairs) % per_call)
  return np.asarray(pairs, np.int32), total


@functools.partial(jax.jit, static_argnames=("grid_shape", "n1", "n2", "symmetric"))
def _assemble(chunks: list[jax.Array], pairs: jax.Array, *, grid_shape: tuple[int, int],
              n1: int, n2: int, symmetric: bool) -> jax.Array:
  """Theta [n1, n2, ...] from the block pairs' results, in one program per shape (done
  op by op it compiled a dozen small programs per kernel shape).

  chunks: the block-pair calls' outputs [per_call, b, b, ...] in order; pairs [m, 2]: the
  blocks (i, j) of the first m rows of their concatenation (the rest is padding).
  """
  res = jnp.concatenate(chunks)[:pairs.shape[0]]  # [m, b, b, ...]
  grid = jnp.zeros(grid_shape + res.shape[1:], res.dtype)
  if symmetric:
    grid = grid.at[pairs[:, 1], pairs[:, 0]].set(
        jnp.transpose(res, (0,) + tuple(1 + a for a in _block_transpose_perm(res.ndim - 1))))
  grid = grid.at[pairs[:, 0], pairs[:, 1]].set(res)
  # [nb1, nb2, b, b, ...] -> [nb1, b, nb2, b, ...] -> [nb1*b, nb2*b, ...]
  grid = jnp.moveaxis(grid, 2, 1)
  b = res.shape[1]
  theta = grid.reshape((grid_shape[0] * b, grid_shape[1] * b) + res.shape[3:])
  return theta[:n1, :n2]


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

  stages = getattr(ntk_fn, "stages", None)  # make_ntk_fn's jacobian_contraction

  def pair_kernel(params, a, b):
    if stages is None:
      return ntk_fn(params, a, b)
    # Both blocks' Jacobians by one traced Jacobian mapped over the two blocks: half the
    # program of two (compiled ~30 % faster), the same numbers, the same peak memory.
    jacobian, contract = stages
    js = jax.lax.map(lambda x: jacobian(params, x),
                     jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b))
    return contract(params, [j[0] for j in js], [j[1] for j in js])

  def local_pairs(params, xb1, xb2, pairs):
    def one(ij):
      a = jax.tree.map(lambda t: t[ij[0]], xb1)
      b = jax.tree.map(lambda t: t[ij[1]], xb2)
      return pair_kernel(params, a, b)
    return jax.lax.map(one, pairs)

  rep = PartitionSpec()
  blocks_sharding = NamedSharding(mesh, PartitionSpec("blocks"))
  sharded = xla_workarounds.jit(jax.shard_map(
      local_pairs, mesh=mesh, in_specs=(rep, rep, rep, PartitionSpec("blocks")),
      out_specs=PartitionSpec("blocks"), check_vma=False), program="ntk_kernel")

  def abstract_blocks(x):
    nb = -(-_leading_size(x, "x1") // block_size)
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((nb, block_size) + a.shape[1:], a.dtype), x)

  def plan(x1, x2):
    """(x1 blocks, x2 blocks, padded pairs, real pairs, assembly options) of a call;
    x1, x2 arrays or `jax.ShapeDtypeStruct`s."""
    symmetric = x2 is None
    n1 = _leading_size(x1, "x1")
    n2 = n1 if symmetric else _leading_size(x2, "x2")
    if isinstance(jax.tree.leaves(x1)[0], jax.ShapeDtypeStruct):
      xb1, xb2 = abstract_blocks(x1), None if symmetric else abstract_blocks(x2)
    else:
      xb1 = _to_blocks(x1, n1, block_size)[0]
      xb2 = None if symmetric else _to_blocks(x2, n2, block_size)[0]
    nb1 = jax.tree.leaves(xb1)[0].shape[0]
    nb2 = nb1 if symmetric else jax.tree.leaves(xb2)[0].shape[0]
    pairs, total = _block_pairs(nb1, nb2, symmetric, per_call)
    options = dict(grid_shape=(nb1, nb2), n1=n1, n2=n2, symmetric=symmetric)
    return xb1, xb1 if symmetric else xb2, pairs, total, options

  def precompile(params, x1, x2=None):
    """Compiles the block-pair program and the assembly of Theta for these shapes (params
    and x may be `jax.ShapeDtypeStruct`s); a later call with arrays of the shapes compiles
    nothing."""
    xb1, xb2, pairs, total, options = plan(x1, x2)
    call = jax.ShapeDtypeStruct((per_call, 2), jnp.int32)
    sharded.lower(params, xb1, xb2, call).compile()
    chunk = jax.eval_shape(sharded, params, xb1, xb2, call)  # placed as the calls' outputs:
    chunk = jax.ShapeDtypeStruct(chunk.shape, chunk.dtype, sharding=blocks_sharding)
    _assemble.lower([chunk] * (len(pairs) // per_call),
                    jax.ShapeDtypeStruct((total, 2), jnp.int32), **options).compile()

  def blocked(params, x1, x2=None):
    xb1, xb2, pairs, total, options = plan(x1, x2)
    chunks = []
    for start in progress_lib.progress(range(0, len(pairs), per_call), desc="NTK blocks",
                                       unit="call"):
      chunks.append(sharded(params, xb1, xb2, jnp.asarray(pairs[start:start + per_call])))
      if progress is not None:
        progress(min(start + per_call, total), total)
    return _assemble(chunks, pairs[:total], **options)

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
