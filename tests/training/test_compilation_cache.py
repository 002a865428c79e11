"""experiments.common's --compilation_cache_dir: default location, off switch, cache written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from experiments import common
from helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # binaries run as subprocesses

_PROGRAM = """
import sys
import jax
import jax.numpy as jnp
from absl import app
from experiments import common

def main(argv):
  del argv
  print(jax.config.jax_compilation_cache_dir)
  jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.arange(5.0)).block_until_ready()

app.run(main)
"""


def test_default_directory(monkeypatch):
  monkeypatch.delenv(common.CACHE_DIR_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", "/some/cache")
  assert common.default_compilation_cache_dir() == "/some/cache/lensllm_jax/jax_cache"
  monkeypatch.setenv(common.CACHE_DIR_ENV, "")
  assert common.default_compilation_cache_dir() == ""  # explicitly off
  assert common.enable_compilation_cache("") is None


def _run(*flags):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  proc = subprocess.run([sys.executable, "-c", _PROGRAM, *flags], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.strip().splitlines()[-1]


def test_binary_writes_the_cache_only_where_told(tmp_path):
  cache = tmp_path / "jax_cache"
  assert _run(f"--compilation_cache_dir={cache}") == str(cache)
  assert any(cache.iterdir()), "no compiled program was cached"


def test_tests_leave_the_user_cache_alone():
  # conftest empties $LENSLLM_COMPILATION_CACHE_DIR before the flag's default is read,
  # and binaries run by tests inherit it.
  from absl import flags
  assert flags.FLAGS["compilation_cache_dir"].default == ""
  assert os.environ[common.CACHE_DIR_ENV] == ""
