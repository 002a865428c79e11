"""Workarounds for known XLA bugs that silently change numbers.

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
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import warnings

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
