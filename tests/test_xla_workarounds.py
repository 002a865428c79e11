"""The XLA:CPU YNNPACK workaround (lensllm_jax.xla_workarounds), in fresh processes.

References are numpy (float64) for the fusion repro and forward-mode jacfwd for
the Llama Jacobian; both are off by O(1) on jaxlib 0.10.2 without the
workaround. On every jaxlib the tests run on (CI: the lock and the newest end)
they show whether the bug is there with XLA's defaults, and that the guard is
applied exactly where it is.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT
from lensllm_jax import xla_workarounds

_REPRO = r"""
import jax, jax.flatten_util, jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
c = rng.normal(size=16).astype(np.float32)
w = rng.normal(size=(16, 16)).astype(np.float32)
b = rng.normal(size=(256, 16, 16)).astype(np.float32)
f = lambda b, c, w: b * c[None, :, None] + jnp.sum(w * b, axis=2)[:, :, None]
ref = b.astype(np.float64) * c[None, :, None] + np.sum(w * b.astype(np.float64), axis=2)[:, :, None]
fusion_err = np.abs(np.asarray(jax.jit(f)(b, c, w)) - ref).max()

from lensllm_jax import models
cfg = models.presets["tiny-llama"].replace(vocab_size=64, max_len=16, d_model=16, n_heads=2,
                                           n_kv_heads=2, d_ff=32)
params = models.init_params(cfg, jax.random.key(0))
flat, unravel = jax.flatten_util.ravel_pytree(params)
ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
out = lambda p: models.CausalLM(cfg).apply({"params": unravel(p)}, ids).reshape(-1)  # 1024 rows
rev = np.asarray(jax.jit(jax.jacrev(out))(flat))
fwd = np.asarray(jax.jacfwd(out)(flat))
jacobian_err = np.abs(rev - fwd).max()
print("errors", fusion_err, jacobian_err)
"""


def _errors(stdout: str) -> tuple[float, float]:
  """(fusion repro, Llama jacrev) max abs errors printed by _REPRO."""
  line = [x for x in stdout.splitlines() if x.startswith("errors ")][-1]
  fusion, jacobian = map(float, line.split()[1:])
  return fusion, jacobian


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_import_applies_the_workaround_where_needed_and_jitted_results_are_exact():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("import jax, jax.flatten_util\nimport lensllm_jax, os\n"
          "print('flags', repr(os.environ.get('XLA_FLAGS', '')))\n" + _REPRO)
  proc = _python(code, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  applied = "--xla_cpu_experimental_ynn_fusion_type=-reduce" in proc.stdout
  assert applied == xla_workarounds.ynn_reduce_bug_expected(), proc.stdout
  assert max(_errors(proc.stdout)) < 1e-4, proc.stdout


@pytest.mark.slow
def test_the_bug_is_present_with_xla_defaults_exactly_where_the_guard_says():
  # XLA's defaults: XLA_FLAGS (which `import lensllm_jax` may have set) is
  # removed before the first computation creates the backend.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("import os, jax, jax.flatten_util, lensllm_jax\nos.environ.pop('XLA_FLAGS', None)\n"
          + _REPRO)
  proc = _python(code, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  fusion, jacobian = _errors(proc.stdout)
  expected = xla_workarounds.ynn_reduce_bug_expected()
  # Wrong values are off by O(1); right ones agree to float32 rounding.
  assert (fusion > 1e-1) == expected and (jacobian > 1e-1) == expected, (
      xla_workarounds.jaxlib_version(), fusion, jacobian)
  if not expected:
    assert max(fusion, jacobian) < 1e-4, (fusion, jacobian)


def test_version_table():
  assert xla_workarounds.ynn_reduce_bug_expected((0, 10, 2))
  assert not xla_workarounds.ynn_reduce_bug_expected((0, 11, 0))
  assert not xla_workarounds.ynn_reduce_bug_expected((0, 12, 0, 1))


@pytest.mark.slow
def test_user_choice_is_kept_and_late_import_warns():
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=")
  code = ("import os, lensllm_jax\n"
          "assert os.environ['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type='\n")
  proc = _python(code, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("import warnings, jax, jax.numpy as jnp\njnp.zeros(1).block_until_ready()\n"
          "from lensllm_jax import xla_workarounds\n"
          "with warnings.catch_warnings(record=True) as w:\n"
          "  warnings.simplefilter('always')\n"
          "  assert xla_workarounds.disable_cpu_ynn_fusions() is False\n"
          "warned = any('could not be applied' in str(x.message) for x in w)\n"
          "assert warned == xla_workarounds.ynn_reduce_bug_expected(), w\n")
  proc = _python(code, env)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_workaround_goes_before_a_bare_token_that_ends_xla_flag_parsing(monkeypatch):
  # XLA ignores every flag after a bare token such as `intra_op_parallelism_threads=1`
  # (seen with jaxlib 0.10.2: a dump flag after it produced no dump), so the flag goes first.
  monkeypatch.setenv("XLA_FLAGS", "intra_op_parallelism_threads=1")
  monkeypatch.setattr(xla_workarounds, "ynn_reduce_bug_expected", lambda *a: True)
  monkeypatch.setattr(xla_workarounds, "_backends_initialized", lambda: False)
  assert xla_workarounds.disable_cpu_ynn_fusions() is True
  assert os.environ["XLA_FLAGS"] == f"{xla_workarounds.WORKAROUND} intra_op_parallelism_threads=1"
