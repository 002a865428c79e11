"""XLA settings of the project: workarounds for known XLA bugs that silently change
numbers, and the per-program compiler options of the CPU backend.

XLA:CPU in jaxlib 0.10.2 hands some element-wise + reduction fusions to
YNNPACK, and those compute wrong values once the leading dimension exceeds 128:
for b [129, 16, 16], c [16] and W [16, 16],

    jax.jit(lambda b: b * c[None, :, None] + jnp.sum(W * b, axis=2)[:, :, None])

is off by O(1) (correct up to 128 rows), and so is jax.jit(jax.jacrev(f)) of a
Llama model at >= 129 output rows (its vmapped transpose contains that
fusion). Eager execution, jvp and every other path we tested agree with each
other. Removing the REDUCE type from the YNNPACK fusions
(`--xla_cpu_experimental_ynn_fusion_type=-reduce`) restores exact results
(removing "dot" or "eltwise" does not); the flag only concerns the CPU backend.

Versions: the bug is present in jaxlib 0.10.2 (the lock's lower end) and
absent in 0.11.0, 0.11.2 and 0.12.0.1 (the same repro, default flags, checked
here), so the guard applies only to jaxlib < YNN_REDUCE_FIXED_IN, where it is
needed; newer jaxlib runs with XLA's defaults.

`disable_cpu_ynn_fusions` puts that flag first in XLA_FLAGS (XLA ignores every
flag after a bare token such as `intra_op_parallelism_threads=1`). XLA reads XLA_FLAGS
when the first backend is created, so `import lensllm_jax` applies it (after
`import jax` is fine, after the first computation is too late: it then warns).
A user who sets the flag in XLA_FLAGS themselves (any value) keeps their choice.
tests/test_xla_workarounds.py checks, on whichever jaxlib runs the tests, that
the bug is present without the flag exactly where `ynn_reduce_bug_expected()`
says so, and that results are exact after `import lensllm_jax`.

Per-program compiler options (`jit`, `cpu_compiler_options`): the one place where the
project sets XLA compiler options of its own programs. Most of a short CPU run's time
is XLA:CPU's LLVM code generation of each program (docs/speed.md, "Sweep fixed cost");
`CPU_COMPILER_OPTIONS` compiles the programs named there at a lower LLVM optimisation
level. They are passed to `jax.jit(..., compiler_options=...)` of those programs only,
and only when JAX's default backend is the CPU: a GPU or TPU run, and a user's own JAX
code in the same process, compile with XLA's defaults (no XLA_FLAGS change). The
persistent compilation cache keys on the options, so a program is never loaded from a
compilation made with others.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
WORKAROUND = f"{YNN_FUSION_FLAG}=-reduce"
# First jaxlib release whose XLA:CPU computes the YNNPACK reduce fusions correctly.
YNN_REDUCE_FIXED_IN = (0, 11, 0)


def jaxlib_version() -> tuple[int, ...] | None:
  """The installed jaxlib's version as integers, read without importing JAX (None if absent)."""
  try:
    text = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:4])


def ynn_reduce_bug_expected(version: tuple[int, ...] | None = None) -> bool:
  """Whether jaxlib `version` (default: the installed one) has the YNNPACK reduce bug."""
  version = jaxlib_version() if version is None else version
  return version is not None and version < YNN_REDUCE_FIXED_IN


def _backends_initialized() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # private, but the only way to ask

  return bool(xla_bridge.backends_are_initialized())


def disable_cpu_ynn_fusions() -> bool:
  """Puts `--xla_cpu_experimental_ynn_fusion_type=-reduce` first in XLA_FLAGS where the
  installed jaxlib has the bug, unless XLA_FLAGS names that flag already.

  Returns:
    True if the flag was added now (and will take effect), False if this
    jaxlib does not need it, XLA_FLAGS already names it or a JAX backend
    already exists (then a RuntimeWarning says the workaround could not be
    applied).
  """
  if not ynn_reduce_bug_expected():
    return False
  flags = os.environ.get("XLA_FLAGS", "")
  if YNN_FUSION_FLAG in flags:
    return False
  if _backends_initialized():
    warnings.warn(
        "lensllm_jax was imported after JAX created its backend, so the workaround for "
        f"wrong XLA:CPU YNNPACK fusions could not be applied; set XLA_FLAGS='{WORKAROUND}' "
        "before running (see lensllm_jax/xla_workarounds.py)",
        RuntimeWarning, stacklevel=2)
    return False
  # First, not last: XLA stops parsing XLA_FLAGS at a bare token such as
  # `intra_op_parallelism_threads=1` (no leading --), so flags after one are ignored.
  os.environ["XLA_FLAGS"] = f"{WORKAROUND} {flags}".strip()
  return True


# The project's jitted programs that take compiler options (`jit(fun, program=...)`).
PROGRAMS = ("init", "train_step", "eval_step", "state_init", "ntk_kernel", "ntk_output")

LLVM_OPT_LEVEL = "xla_backend_optimization_level"  # XLA's default: 3

# Options per program on the CPU backend; a program not named compiles with XLA's
# defaults. A lower LLVM level compiles a small model's programs 20-40 % faster; the
# init and state init give the same bits, the steps and NTK programs numbers within
# float32 rounding (and at level 2 LLVM still vectorises loops: the bench models' steps
# and a larger NTK kernel run as fast). Measured in docs/speed.md, "Sweep fixed cost".
CPU_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {
    "init": {LLVM_OPT_LEVEL: 1},
    "state_init": {LLVM_OPT_LEVEL: 1},
    "train_step": {LLVM_OPT_LEVEL: 2},
    "eval_step": {LLVM_OPT_LEVEL: 2},
    "ntk_kernel": {LLVM_OPT_LEVEL: 2},
    "ntk_output": {LLVM_OPT_LEVEL: 2},
}
# The programs above whose outputs are bit-identical to XLA's default compilation's (the
# others' within float32 rounding; tests/training/test_compiler_options.py checks both).
BIT_IDENTICAL = frozenset({"init", "state_init"})


def cpu_compiler_options(program: str) -> dict[str, Any] | None:
  """The XLA compiler options of one of the project's `PROGRAMS`: a copy of
  `CPU_COMPILER_OPTIONS[program]` when JAX's default backend is the CPU, else None
  (XLA's defaults). Asks JAX for its default backend (creating it if none exists yet)."""
  if program not in PROGRAMS:
    raise ValueError(f"program={program!r}: expected one of {PROGRAMS}")
  import jax

  if jax.default_backend() != "cpu":
    return None
  return dict(CPU_COMPILER_OPTIONS.get(program, {})) or None


def jit(fun: Callable, *, program: str, **kwargs) -> Callable:
  """`jax.jit(fun, **kwargs)` compiled with `cpu_compiler_options(program)` (read now: call
  it when the program is built, after the backend is chosen, not at import).

  JAX takes compiler options on a top-level jit only: called inside another trace (jit,
  eval_shape, vmap, grad), the function is the plain `jax.jit(fun, **kwargs)`, whose
  program becomes part of the enclosing one (compiled with that one's options).
  """
  options = cpu_compiler_options(program)
  import jax

  if options is None:
    return jax.jit(fun, **kwargs)
  return _TopLevelOptionsJit(jax.jit(fun, compiler_options=options, **kwargs),
                             jax.jit(fun, **kwargs))


def _inside_trace() -> bool:
  from jax._src import core  # private: JAX has no public "am I being traced" test

  return not core.trace_state_clean()


class _TopLevelOptionsJit:
  """A jitted function with compiler options at top level and `plain` inside a trace;
  other attributes (`eval_shape`, ...) are the top-level one's."""

  def __init__(self, top_level: Callable, plain: Callable):
    self._top_level, self._plain = top_level, plain

  def _pick(self) -> Callable:
    return self._plain if _inside_trace() else self._top_level

  def __call__(self, *args, **kwargs):
    return self._pick()(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._pick().lower(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._top_level, name)
