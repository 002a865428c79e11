"""Tests of the leave-one-dataset-out protocol (lensllm_jax/protocol.py)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from lensllm_jax import benchmarks, pooled, protocol

GRID = [pooled.PooledConfig(strength=0.0),
        pooled.PooledConfig(strength=1e-2, pooled=("beta",), pre_power_weight=0.1),
        pooled.PooledConfig(strength=1.0, pooled=("beta", "E"))]
OPTIONS = {"ratios": (16, 128), "num_restarts": 2, "num_steps": 20}


def _subset(curves, rows, name):
  return dataclasses.replace(curves, name=name, models=tuple(curves.models[i] for i in rows),
                             sizes=curves.sizes[rows], families=tuple(
                                 curves.families[i] for i in rows), losses=curves.losses[rows])


def _write(curves, path):
  benchmarks.write_curves(curves, path)
  return benchmarks.load_curves(str(path))


def test_held_out_file_never_influences_its_setting(shared_benchmarks, tmp_path):
  """Poisoning the held-out file's losses leaves the setting chosen for it unchanged."""
  flan = benchmarks.load_curves(str(shared_benchmarks / "flan.csv"))
  giga = benchmarks.load_curves(str(shared_benchmarks / "gigaword.csv"))
  rows = np.arange(0, 30, 3)  # 10 models each: fast
  (tmp_path / "clean").mkdir()
  (tmp_path / "poisoned").mkdir()
  a = _write(_subset(flan, rows, "a"), tmp_path / "clean" / "a.csv")
  b = _write(_subset(giga, rows, "b"), tmp_path / "clean" / "b.csv")
  rng = np.random.default_rng(0)
  garbage = rng.permutation(b.losses.reshape(-1)).reshape(b.losses.shape)
  garbage = garbage * rng.uniform(0.5, 2.0, garbage.shape)
  b_bad = _write(dataclasses.replace(b, losses=garbage), tmp_path / "poisoned" / "b.csv")
  assert not np.allclose(b_bad.losses, b.losses)

  read = []

  def spy(curves, configs, **kw):
    read.append((curves.name, curves.source))
    return protocol.evaluate_grid(curves, configs, **kw)

  key = jax.random.key(0)
  folds, tables = protocol.leave_one_out([a, b], GRID, key=key, evaluate=spy, **OPTIONS)
  folds_bad, tables_bad = protocol.leave_one_out([a, b_bad], GRID, key=key, **OPTIONS)
  # The fold that holds out b chose on a only, and the same setting either way.
  assert folds[1].held_out == "b" and folds[1].trained_on == ("a",)
  assert folds_bad[1].config == folds[1].config
  assert folds_bad[1].train_criterion == pytest.approx(folds[1].train_criterion, abs=1e-12)
  # b was read once, as the training file of the fold that holds out a.
  assert [n for n, _ in read] == ["b", "a"]
  # The poison did change b's own scores (so the check above is not vacuous).
  name = GRID[0].name
  assert not np.allclose(tables["b"][name]["RelAcc"], tables_bad["b"][name]["RelAcc"]) or \
      not np.allclose(tables["b"][name]["PearCorr"], tables_bad["b"][name]["PearCorr"],
                      equal_nan=True)


def test_choose_maximises_mean_pearcorr_plus_relacc():
  """Independent computation of the argmax over a hand-made table."""
  cfgs = [pooled.PooledConfig(strength=s) for s in (0.0, 0.1, 1.0)]

  def tab(pc, ra):
    return {c.name: {"PearCorr": np.asarray(p, float), "RelAcc": np.asarray(r, float)}
            for c, p, r in zip(cfgs, pc, ra, strict=True)}

  t1 = tab([[0.5, 0.7], [0.9, np.nan], [0.6, 0.6]], [[1, 1], [1, 1], [1, 0.9]])
  t2 = tab([[0.1, 0.1], [0.2, 0.2], [0.9, 0.9]], [[1, 1], [1, 1], [1, 1]])
  # Config 1's nan PearCorr counts as -1: means 1.6, 0.95, 1.55 on t1.
  assert protocol.choose([t1], cfgs)[0] == cfgs[0]
  # Over both: (1.6 + 1.1) / 2, (0.95 + 1.2) / 2, (1.55 + 1.9) / 2.
  chosen, val = protocol.choose([t1, t2], cfgs)
  assert chosen == cfgs[2] and val == pytest.approx(1.725)
  with pytest.raises(ValueError, match="training file"):
    protocol.choose([], cfgs)


def test_leave_one_out_needs_two_files(shared_benchmarks):
  flan = benchmarks.load_curves(str(shared_benchmarks / "flan.csv"))
  with pytest.raises(ValueError, match="at least 2"):
    protocol.leave_one_out([flan], GRID, key=jax.random.key(0))
