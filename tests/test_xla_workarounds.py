"""The XLA:CPU YNNPACK workaround (lensllm_jax.xla_workarounds), in fresh processes.

References are numpy (float64) for the fusion repro and forward-mode jacfwd for
the Llama Jacobian; both were off by O(1) before the workaround.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

_REPRO = r"""
import jax, jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
c = rng.normal(size=16).astype(np.float32)
w = rng.normal(size=(16, 16)).astype(np.float32)
b = rng.normal(size=(256, 16, 16)).astype(np.float32)
f = lambda b, c, w: b * c[None, :, None] + jnp.sum(w * b, axis=2)[:, :, None]
ref = b.astype(np.float64) * c[None, :, None] + np.sum(w * b.astype(np.float64), axis=2)[:, :, None]
err = np.abs(np.asarray(jax.jit(f)(b, c, w)) - ref).max()
assert err < 1e-4, err

from lensllm_jax import models
cfg = models.presets["tiny-llama"].replace(vocab_size=64, max_len=16, d_model=16, n_heads=2,
                                           n_kv_heads=2, d_ff=32)
params = models.init_params(cfg, jax.random.key(0))
flat, unravel = jax.flatten_util.ravel_pytree(params)
ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
out = lambda p: models.CausalLM(cfg).apply({"params": unravel(p)}, ids).reshape(-1)  # 1024 rows
rev = np.asarray(jax.jit(jax.jacrev(out))(flat))
fwd = np.asarray(jax.jacfwd(out)(flat))
err = np.abs(rev - fwd).max()
assert err < 1e-4, err
print("ok")
"""


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_import_applies_the_workaround_and_jitted_results_are_exact():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("import jax, jax.flatten_util\nimport lensllm_jax, os\n"
          "assert '--xla_cpu_experimental_ynn_fusion_type=-reduce' in os.environ['XLA_FLAGS']\n"
          + _REPRO)
  proc = _python(code, env)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


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
          "assert any('could not be applied' in str(x.message) for x in w)\n")
  proc = _python(code, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
