"""NTK evolution during fine-tuning: `kernel_distance` and `NTKRecorder`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.theory.ntk.exact import NTKFn, PyTree


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
