"""Shared pytest fixtures (helpers that tests import live in tests/helpers/)."""

from __future__ import annotations

import os
import pathlib

import pytest

import helpers
from helpers import SHARED_BENCHMARKS

# Binaries run by tests (subprocesses inherit this) leave the user's JAX
# compilation cache alone: off unless a test passes --compilation_cache_dir.
os.environ["LENSLLM_COMPILATION_CACHE_DIR"] = ""


def pytest_configure(config):
  # Whether this run's `-m` expression deselects the `torch` marker
  # (helpers.import_torch_and_transformers reads it).
  markexpr = config.getoption("markexpr", "") or ""
  if markexpr:
    from _pytest.mark.expression import Expression  # pytest's own `-m` parser

    helpers.TORCH_MARKER["deselected"] = not Expression.compile(markexpr).evaluate(
        lambda name, **_: name == "torch")


@pytest.fixture(scope="session")
def shared_benchmarks() -> pathlib.Path:
  """Directory of the public curve files packaged with the library (lensllm_jax/data)."""
  if not (SHARED_BENCHMARKS / "flan.csv").exists():
    pytest.fail(f"public curves not found at {SHARED_BENCHMARKS}")
  return SHARED_BENCHMARKS
