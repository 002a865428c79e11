"""Tests of the leave-one-dataset-out protocol (lensllm_jax/plus/protocol.py)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from lensllm_jax.curves import benchmarks
from lensllm_jax.plus import protocol
from lensllm_jax.selection import pooled

# One setting per kind of option of the default grid: fixed / empirical-Bayes /
# backtest strength, every pooled set, covariates, phase weight, relative Huber.
GRID = [pooled.PooledConfig(strength=0.0, pooled=()),
        pooled.PooledConfig(strength=1e-2, pooled=("beta",), pre_power_weight=0.1),
        pooled.PooledConfig(strength=1.0, pooled=("beta", "E", "Dt"), empirical_bayes=True,
                            covariates="size_zero_shot", huber_delta=1.345,
                            huber_relative=True),
        pooled.PooledConfig(backtest=2, pooled=("beta", "E"))]
OPTIONS = protocol.ProtocolOptions(ratios=(16, 128), num_restarts=2, num_steps=20)


def _subset(curves, rows, name):
  return dataclasses.replace(curves, name=name, models=tuple(curves.models[i] for i in rows),
                             sizes=curves.sizes[rows], families=tuple(
                                 curves.families[i] for i in rows), losses=curves.losses[rows])


def _write(curves, path):
  benchmarks.write_curves(curves, path)
  return benchmarks.load_curves(str(path))


def _short(curves, name, last=25600.0):
  """The columns D <= last of a CurveSet (a short file like the study's)."""
  keep = curves.data_sizes <= last
  return dataclasses.replace(curves, name=name, data_sizes=curves.data_sizes[keep],
                             losses=curves.losses[:, keep])


def test_held_out_file_never_influences_its_setting(shared_benchmarks, tmp_path):
  """Poisoning the held-out file's losses leaves the setting chosen for it unchanged.

  With a training-only file (a short curve file, scored on its own ratios) in
  every fold, and a grid with every kind of option.
  """
  flan = benchmarks.load_curves(str(shared_benchmarks / "flan.csv"))
  giga = benchmarks.load_curves(str(shared_benchmarks / "gigaword.csv"))
  rows = np.arange(0, 30, 3)  # 10 models each: fast
  (tmp_path / "clean").mkdir()
  (tmp_path / "poisoned").mkdir()
  a = _write(_subset(flan, rows, "a"), tmp_path / "clean" / "a.csv")
  b = _write(_subset(giga, rows, "b"), tmp_path / "clean" / "b.csv")
  c = _write(_short(_subset(giga, np.arange(1, 30, 3), "c"), "c"), tmp_path / "clean" / "c.csv")
  rng = np.random.default_rng(0)
  garbage = rng.permutation(b.losses.reshape(-1)).reshape(b.losses.shape)
  garbage = garbage * rng.uniform(0.5, 2.0, garbage.shape)
  b_bad = _write(dataclasses.replace(b, losses=garbage), tmp_path / "poisoned" / "b.csv")
  assert not np.allclose(b_bad.losses, b.losses)

  read, cache = [], {}

  def spy(curves, configs, *, key, options):
    # Records the reads; the second run reuses the tables of files it shares
    # with the first (same file, same key: evaluate_grid is deterministic).
    k = (curves.source, options.ratios)
    if k not in cache:
      read.append((curves.name, k[1]))
      cache[k] = protocol.evaluate_grid(curves, configs, key=key, options=options)
    return cache[k]

  key = jax.random.key(0)
  folds, tables = protocol.leave_one_out([a, b], GRID, key=key, evaluate=spy, train_only=[c],
                                         options=OPTIONS)
  first_reads = list(read)
  folds_bad, tables_bad = protocol.leave_one_out([a, b_bad], GRID, key=key, evaluate=spy,
                                                 train_only=[c], options=OPTIONS)
  # Only the reported files get folds; the training-only file is in both.
  assert [f.held_out for f in folds] == ["a", "b"]
  assert folds[0].trained_on == ("b", "c") and folds[1].trained_on == ("a", "c")
  # The fold that holds out b chose on a and c only, and the same setting either way.
  assert folds_bad[1].config == folds[1].config
  assert folds_bad[1].train_criterion == pytest.approx(folds[1].train_criterion, abs=1e-12)
  assert folds_bad[1].nested == folds[1].nested and set(folds[1].nested) == {"a", "c"}
  # Each file was read once; c on its own ratios (128 leaves one point below 25600).
  assert first_reads == [("b", (16, 128)), ("c", (16,)), ("a", (16, 128))]
  assert read[3:] == [("b", (16, 128))]  # the poisoned b (a different file)
  assert tables["c"][GRID[0].name]["RelAcc"].shape == (1,)
  # The poison did change b's own scores (so the check above is not vacuous).
  changed = [not np.allclose(tables["b"][g.name][k], tables_bad["b"][g.name][k], equal_nan=True)
             for g in GRID for k in ("PearCorr", "RelAcc")]
  assert any(changed)


def test_training_ratios_need_two_fine_tuning_points(shared_benchmarks):
  """Closed form on the 25600-long grid: D*/r must keep 200 and 400 (r <= 64)."""
  giga = benchmarks.load_curves(str(shared_benchmarks / "gigaword.csv"))
  short = _short(giga, "short")
  assert protocol.training_ratios(short) == [8, 16, 32, 64]
  assert protocol.training_ratios(short, min_points=4) == [8, 16]
  assert protocol.training_ratios(giga) == list(protocol.DEFAULT_RATIOS)
  with pytest.raises(ValueError, match="no ratio"):
    protocol.training_ratios(short, (256, 512))


def test_default_grid_is_a_full_factorial_over_every_option():
  """Every structural option is an axis; settings are distinct; independent fits first."""
  grid = protocol.default_grid()
  names = [c.name for c in grid]
  assert len(set(names)) == len(grid) == 4 + 3 * 2 * 2 * 2 * 6
  assert all(c.strength == 0 and not c.backtest for c in grid[:4])
  rest = grid[4:]

  def axis(c):
    rule = ("bt" if c.backtest else "eb" if c.empirical_bayes else "fixed", c.strength)
    return (c.pooled, c.covariates, c.pre_power_weight, c.huber_delta, c.huber_relative, rule)

  values = [set(x) for x in zip(*map(axis, rest), strict=True)]
  assert values[0] == {("beta",), ("beta", "E"), ("beta", "E", "Dt")}
  assert values[1] == {"none", "size_zero_shot"}
  assert values[2] == {1.0, 0.1}
  assert values[3] == {None, 1.345} and values[4] == {False, True}
  assert len(values[5]) == 6
  # Full factorial: every combination of the axes occurs exactly once.
  assert len({axis(c) for c in rest}) == np.prod([len(v) for v in values]) // 2
  assert all(c.floor_prior == 0 for c in grid)


def test_leave_one_out_train_only_files_are_never_reported():
  """A fake evaluator: the choice for each file uses exactly the other files' tables."""
  cfgs = [pooled.PooledConfig(strength=s) for s in (0.0, 0.1)]
  # File "x" prefers setting 0, files "y" and "t" prefer setting 1.
  pref = {"x": 0, "y": 1, "t": 1}

  def fake(curves, configs, *, key, options):
    del key
    n = len(options.ratios)
    return {c.name: {"PearCorr": np.full(n, float(k == pref[curves.name])),
                     "RelAcc": np.ones(n)} for k, c in enumerate(configs)}, None

  def cs(name, last):
    return type("C", (), {"name": name, "source": name, "data_sizes": np.array(
        [0.0] + [200.0 * 2**k for k in range(int(np.log2(last / 200)) + 1)])})()

  folds, tables = protocol.leave_one_out([cs("x", 1638400), cs("y", 1638400)], cfgs,
                                         key=jax.random.key(0), evaluate=fake,
                                         train_only=[cs("t", 25600)])
  # Holding out x: y and t both prefer setting 1. Holding out y: x and t
  # disagree, a tie (1.5 each), which goes to the earlier setting.
  assert [f.config for f in folds] == [cfgs[1], cfgs[0]]
  assert folds[0].train_criterion == pytest.approx(2.0)
  assert folds[1].train_criterion == pytest.approx(1.5)
  # Nested: each training file's setting chosen on the fold's other training files.
  assert folds[0].nested == {"y": (cfgs[1], 2.0), "t": (cfgs[1], 2.0)}
  assert folds[1].nested == {"x": (cfgs[1], 2.0), "t": (cfgs[0], 2.0)}
  assert set(tables) == {"x", "y", "t"}
  with pytest.raises(ValueError, match="duplicate"):
    protocol.leave_one_out([cs("x", 1638400)], cfgs, key=jax.random.key(0), evaluate=fake,
                           train_only=[cs("x", 25600)])


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
