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


def pytest_collection_modifyitems(config, items):
  # Modules holding `slow` tests (end-to-end runs, subprocesses: the long ones) run
  # first, each group in collection order. Under pyproject's `-n 2 --dist loadfile
  # --no-loadscope-reorder` a worker takes whole modules in this order, so the long
  # ones start early and the short ones fill in at the end; xdist's default order
  # (most tests first) put the one-test subprocess modules last, on one worker.
  slow = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow)  # stable


@pytest.fixture(scope="session")
def compilation_cache_dir(tmp_path_factory) -> pathlib.Path:
  """A JAX compilation cache for the binaries the tests run (`--compilation_cache_dir=`).

  The tests run the binaries many times on the same tiny shapes: with the cache, a
  program compiled once in this session (by any run, or earlier in the same run) is
  loaded instead of compiled again (the same program, hence the same numbers).
  A test of code generation under other XLA flags (test_isa_stability) leaves it off.
  """
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def shared_benchmarks() -> pathlib.Path:
  """Directory of the public curve files packaged with the library (lensllm_jax/data)."""
  if not (SHARED_BENCHMARKS / "flan.csv").exists():
    pytest.fail(f"public curves not found at {SHARED_BENCHMARKS}")
  return SHARED_BENCHMARKS
