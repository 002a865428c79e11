"""Shared pytest fixtures and helpers."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The public curve files (flan, gigaword) ship inside the package.
SHARED_BENCHMARKS = REPO_ROOT / "lensllm_jax" / "data"


@pytest.fixture(scope="session")
def shared_benchmarks() -> pathlib.Path:
  """Directory of the public curve files packaged with the library (lensllm_jax/data)."""
  if not (SHARED_BENCHMARKS / "flan.csv").exists():
    pytest.fail(f"public curves not found at {SHARED_BENCHMARKS}")
  return SHARED_BENCHMARKS


def run_with_host_devices(code: str, num_devices: int = 4, timeout: float = 300) -> str:
  """Runs `code` in a fresh Python with `num_devices` fake CPU devices.

  XLA reads `--xla_force_host_platform_device_count` only before JAX starts,
  so multi-device tests run in a subprocess. Returns its stdout; raises with
  the child's stderr if it fails.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={num_devices}").strip()
  env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc.stdout
