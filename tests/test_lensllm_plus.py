"""End-to-end test of experiments/lensllm_plus.py on small files (tiny grid)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from configs import lensllm_plus as plus_config
from experiments import common, lensllm_plus
from lensllm_jax import benchmarks, pooled, protocol


def _small(curves, rows, name, last=None):
  keep = np.ones(curves.data_sizes.size, bool) if last is None else curves.data_sizes <= last
  return dataclasses.replace(curves, name=name, models=tuple(curves.models[i] for i in rows),
                             sizes=curves.sizes[rows],
                             families=tuple(curves.families[i] for i in rows),
                             data_sizes=curves.data_sizes[keep], losses=curves.losses[rows][:, keep])


def test_binary_reports_only_benchmarks_and_trains_on_train_only_files(
    shared_benchmarks, tmp_path, monkeypatch):
  """Training-only files are in every fold's training set, never in results.csv."""
  flan = benchmarks.load_curves(str(shared_benchmarks / "flan.csv"))
  giga = benchmarks.load_curves(str(shared_benchmarks / "gigaword.csv"))
  rows = np.arange(0, 30, 3)
  data = tmp_path / "data"
  data.mkdir()
  benchmarks.write_curves(_small(flan, rows, "a"), data / "a.csv")
  benchmarks.write_curves(_small(giga, rows, "b"), data / "b.csv")
  benchmarks.write_curves(_small(giga, rows + 1, "t", last=25600.0), data / "t.csv")
  grid = [pooled.PooledConfig(strength=0.0, pooled=()),
          pooled.PooledConfig(strength=1.0, empirical_bayes=True, pooled=("beta",),
                              huber_delta=1.345, huber_relative=True)]
  monkeypatch.setattr(protocol, "default_grid", lambda: grid)
  cfg = plus_config.get_config()
  cfg.update(benchmarks=("a", "b"), data_dir=str(data), ratios=(16, 128), num_restarts=2,
             num_steps=20, budgeted=False, train_only_benchmarks=(str(data / "t.csv"),))
  out = lensllm_plus.run(cfg, tmp_path / "out")
  chosen = common.read_rows(out / "chosen.csv")
  assert [c["held_out"] for c in chosen] == ["a", "b"]
  assert [c["trained_on"] for c in chosen] == ["b+t", "a+t"]
  assert {c["config"] for c in chosen} <= {g.name for g in grid}
  results = common.read_rows(out / "results.csv")
  assert {r["dataset"] for r in results} == {"a", "b"}
  inputs = {r["dataset"]: r for r in common.read_rows(out / "inputs.csv")}
  assert inputs["t"]["role"] == "train_only" and inputs["t"]["ratios"] == "16"
  grid_rows = common.read_rows(out / "grid.csv")
  assert {int(r["ratio"]) for r in grid_rows if r["dataset"] == "t"} == {16}
  md = (out / "lensllm_plus.md").read_text()
  assert "| t | train_only | 16 |" in md and "Target check" in md
  # A rerun with a changed training file refuses to reuse the cached rows.
  benchmarks.write_curves(_small(giga, rows + 2, "t", last=25600.0), data / "t.csv")
  from absl import app
  with pytest.raises(app.UsageError, match="changed"):
    lensllm_plus.run(cfg, out)


def test_binary_needs_two_reported_files(shared_benchmarks, tmp_path):
  from absl import app
  with pytest.raises(app.UsageError, match="at least 2"):
    cfg = plus_config.get_config("public")
    cfg.update(benchmarks=("flan",), data_dir=str(shared_benchmarks), ratios=(16,))
    lensllm_plus.run(cfg, tmp_path)
