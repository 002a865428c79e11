"""Data-parallel sharding with `jax.sharding` (room for FSDP), multi-host init.

Mesh convention: a 2-D `Mesh` of shape [data, fsdp] with axis names
("data", "fsdp"). Batches (leading axis = examples) are split over both axes,
P(("data", "fsdp")); parameters and optimiser state are replicated when
fsdp == 1 (pure data parallelism, the default). With fsdp > 1,
`param_shardings` splits each parameter's largest divisible axis over
"fsdp" (ZeRO-3 style): `jax.jit` then inserts the all-gathers and
reduce-scatters, and the same train step runs unchanged.

Under `jax.jit`, computations follow their arguments' shardings, so the train
and eval steps of `lensllm_jax.training` need no sharding code: put params on
`replicate(...)` / `param_shardings(...)` and batches on `shard_batch(...)`.
Gradients of a loss summed over a sharded batch are reduced across devices by
XLA (an all-reduce), which is what makes data parallelism exact.

Multi-host: call `initialize_distributed(True)` (the binaries' --distributed
flag; docs/scale.md lists the environment of SLURM, GPU hosts and TPU pods)
before touching devices; each process then feeds its own slice of the
global batch to `shard_batch` (`jax.make_array_from_process_local_data`), or
the whole global batch to `shard_global_batch`, which slices it (what
`lensllm_jax.training` does).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def make_mesh(num_data: int | None = None, num_fsdp: int = 1, *,
              devices: list | None = None) -> Mesh:
  """A [data, fsdp] device mesh.

  Args:
    num_data: devices on the "data" axis (default: all devices / num_fsdp).
    num_fsdp: devices on the "fsdp" axis (1 = parameters replicated).
    devices: devices to use (default `jax.devices()`, all processes).

  Returns:
    Mesh with axis names ("data", "fsdp").
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_data is None:
    if len(devices) % num_fsdp:
      raise ValueError(f"num_fsdp={num_fsdp} does not divide the {len(devices)} devices")
    num_data = len(devices) // num_fsdp
  if num_data * num_fsdp > len(devices):
    raise ValueError(f"mesh {num_data}x{num_fsdp} needs more than the {len(devices)} devices")
  grid = np.array(devices[:num_data * num_fsdp], dtype=object).reshape(num_data, num_fsdp)
  return Mesh(grid, DATA_AXES)


def num_batch_shards(mesh: Mesh) -> int:
  """Number of pieces a batch is split into (data * fsdp)."""
  return int(np.prod([mesh.shape[a] for a in DATA_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of arrays whose leading axis is the example axis."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding."""
  return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Puts a pytree of host arrays [B_local, ...] on the mesh, split on axis 0.

  On one process B_local is the global batch; with several processes each
  passes its own slice and the global batch is their concatenation.
  Raises if the global batch size is not divisible by the number of shards.
  """
  sharding = batch_sharding(mesh)
  shards = num_batch_shards(mesh)

  def put(x):
    x = np.asarray(x)
    global_b = x.shape[0] * jax.process_count()
    if global_b % shards:
      raise ValueError(f"global batch size {global_b} is not divisible by the {shards} "
                       f"data shards of the mesh {dict(mesh.shape)}")
    return jax.make_array_from_process_local_data(sharding, x, (global_b,) + x.shape[1:])

  return jax.tree.map(put, batch)


def shard_global_batch(batch: Any, mesh: Mesh) -> Any:
  """Like `shard_batch`, for a GLOBAL batch that every process holds in full.

  Each process keeps its contiguous slice of rows [p B / P, (p + 1) B / P)
  (the rows its devices hold under `batch_sharding`, devices being ordered by
  process in `make_mesh`) and passes it to `shard_batch`. On one process this
  is `shard_batch`.
  """
  n_proc = jax.process_count()
  if n_proc == 1:
    return shard_batch(batch, mesh)
  p = jax.process_index()

  def local(x):
    x = np.asarray(x)
    if x.shape[0] % n_proc:
      raise ValueError(f"global batch size {x.shape[0]} is not divisible by the "
                       f"{n_proc} processes")
    k = x.shape[0] // n_proc
    return x[p * k:(p + 1) * k]

  return shard_batch(jax.tree.map(local, batch), mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies a pytree of arrays onto every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def param_shardings(params: Any, mesh: Mesh) -> Any:
  """Per-leaf NamedSharding: replicated, or FSDP-split when mesh has fsdp > 1.

  With fsdp > 1, a leaf is split on its largest axis divisible by the fsdp
  size (leaves with no such axis stay replicated).
  """
  k = mesh.shape["fsdp"]

  def spec(x):
    shape = np.shape(x)
    if k == 1 or not shape:
      return replicated(mesh)
    axes = [i for i in np.argsort(shape)[::-1] if shape[i] % k == 0]
    if not axes:
      return replicated(mesh)
    parts = [None] * len(shape)
    parts[int(axes[0])] = "fsdp"
    return NamedSharding(mesh, P(*parts))

  return jax.tree.map(spec, params)


def put_params(tree: Any, mesh: Mesh) -> Any:
  """Places params (or optimiser state) per `param_shardings`."""
  return jax.device_put(tree, param_shardings(tree, mesh))


def initialize_distributed(enabled: bool, *, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` when `enabled` (multi-host runs).

  Must run before any other JAX call touches devices. Unset arguments come
  from the environment: JAX_COORDINATOR_ADDRESS ("host:port" of process 0;
  read by JAX itself), JAX_NUM_PROCESSES and JAX_PROCESS_ID (read here), and
  otherwise from JAX's cluster detection (SLURM, Open MPI, Kubernetes, Cloud
  TPU pods), which fills in whatever is still missing. On CPU the cross-
  process collectives use gloo (set here; the CPU backend has none by
  default). Returns whether it initialised.

  Raises:
    ValueError: if JAX_NUM_PROCESSES / JAX_PROCESS_ID is not an integer.
  """
  if not enabled:
    return False
  for name, value in (("JAX_NUM_PROCESSES", num_processes), ("JAX_PROCESS_ID", process_id)):
    text = os.environ.get(name)
    if value is None and text:
      try:
        int(text)
      except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {k: v for k, v in (("coordinator_address", coordinator_address),
                              ("num_processes", num_processes),
                              ("process_id", process_id)) if v is not None}
  jax.distributed.initialize(**kwargs)
  return True


def is_primary() -> bool:
  """True on the process that writes shared files (process 0; the only one
  without jax.distributed)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op on one process).

  Used around files that process 0 writes and the others then read.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def host_copy(tree: Any) -> Any:
  """numpy copy of a pytree of (possibly multi-process) arrays, the same on every process.

  Replicated or sharded global arrays are gathered across processes
  (`multihost_utils.process_allgather`); one process: `np.asarray`.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils

  return jax.tree.map(
      lambda x: np.asarray(x) if isinstance(x, np.ndarray) or x.is_fully_addressable
      or x.is_fully_replicated else np.asarray(multihost_utils.process_allgather(x, tiled=True)),
      tree)
