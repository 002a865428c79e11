"""Leave-one-dataset-out choice of the LensLLM+ settings (hyper-parameters).

With benchmark files f_1..f_n (n >= 2), every setting of the pooled predictor
(`pooled.PooledConfig`: prior strength, pooled quantities, covariates, phase
weight, robust loss) is chosen for file f_i using ONLY the other files:

    chosen_i = argmax_{c in grid} mean_{j != i} criterion(c, f_j),
    criterion(c, f) = mean_r PearCorr_r(c, f) + mean_r RelAcc_r(c, f),

the means over the budget ratios r (8 ... 512 by default), PearCorr and
RelAcc as in `metrics` (DESIGN.md sec. 6). Ties go to the earlier setting of
the grid (the grid is ordered from weak to strong pooling). Then chosen_i is
reported on f_i. The chooser (`choose`) is a function of the training
files' score tables only; `leave_one_out` never passes the held-out file's
scores to it, which `tests/test_protocol.py` checks by poisoning the
held-out file.

Scores of a file are computed once for the whole grid (`evaluate_grid`) and
reused in every fold where that file is a training file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from lensllm_jax import metrics, pooled, selection

__all__ = [
  "DEFAULT_RATIOS",
  "Fold",
  "choose",
  "criterion",
  "default_grid",
  "evaluate_grid",
  "leave_one_out",
  "score_results",
]

DEFAULT_RATIOS = (8, 16, 32, 64, 128, 256, 512)
METRICS = ("PearCorr", "RelAcc", "Spearman", "RMSE")


def default_grid() -> list[pooled.PooledConfig]:
  """The settings searched by the protocol (weakest pooling first).

  strength in {1e-3, 1e-2, 1e-1, 1} (pooled: beta) x covariates in {none,
  size_zero_shot} x pre-power weight in {1, 0.1} x Huber delta in {None,
  0.01}, after strength 0 (= independent fits, the published LensLLM curve
  mode). Options dropped during development (pooling E or D_t, empirical-
  Bayes strengths, a floor prior) are still available in `PooledConfig`.
  """
  grid = [pooled.PooledConfig(strength=0.0)]
  for s in (1e-3, 1e-2, 1e-1, 1.0):
    for cov in ("none", "size_zero_shot"):
      for w in (1.0, 0.1):
        for h in (None, 0.01):
          grid.append(pooled.PooledConfig(strength=s, pooled=("beta",), covariates=cov,
                                          pre_power_weight=w, huber_delta=h))
  return grid


def score_results(results, truth) -> dict[str, float]:
  """PearCorr, RelAcc, Spearman and RMSE at D* (loss units) of one SelectionResult each.

  Args:
    results: a `selection.SelectionResult` (predicted may be None: RMSE nan).
    truth: [M] true L(D*).
  """
  r = results
  pred = r.predicted
  rmse = (float(np.sqrt(np.mean((np.asarray(pred) - truth) ** 2)))
          if pred is not None and np.all(np.isfinite(pred)) else float("nan"))
  return {"PearCorr": metrics.pearson_corr(r.feature, truth),
          "RelAcc": metrics.relative_accuracy(r.chosen, truth),
          "Spearman": metrics.spearman_corr(r.feature, truth),
          "RMSE": rmse}


def budget_views(curves, ratios, target_data_num: float | None = None):
  """(metadata, truth [M], [(ratio, VisibleCurves)]) of a CurveSet."""
  d = np.asarray(curves.data_sizes, np.float64)
  target = float(d.max()) if target_data_num is None else float(target_data_num)
  if not np.any(d == target):
    raise ValueError(f"{curves.source}: D*={target:g} is not a column of the file")
  meta = selection.metadata_of(curves, target)
  views = []
  for r in ratios:
    dmax = target / r
    if not np.any((d > 0) & (d <= dmax)):
      raise ValueError(f"{curves.source}: ratio {r} leaves no fine-tuning point (D_max={dmax:g})")
    views.append((int(r), selection.visible_view(curves, dmax)))
  return meta, np.asarray(curves.column(target), np.float64), views


def evaluate_grid(curves, configs: Sequence[pooled.PooledConfig], *, key: jax.Array,
                  ratios: Sequence[int] = DEFAULT_RATIOS, target_data_num=None,
                  num_restarts: int = 8, num_steps: int = 60):
  """Scores of every setting on one file: table[config.name][metric] -> [ratios] array.

  The truth L(D*) is read here only to score; the predictions come from
  budget-limited views (`selection.visible_view`).

  Returns:
    (table, results): results[ratio index][config index] SelectionResults.
  """
  meta, truth, views = budget_views(curves, ratios, target_data_num)
  res = pooled.pooled_selection([v for _, v in views], meta, configs, key=key,
                                num_restarts=num_restarts, num_steps=num_steps)
  table = {}
  for j, cfg in enumerate(configs):
    rows = [score_results(res[i][j], truth) for i in range(len(views))]
    table[cfg.name] = {k: np.array([r[k] for r in rows]) for k in METRICS}
  return table, res


def criterion(scores: Mapping[str, np.ndarray]) -> float:
  """mean PearCorr + mean RelAcc over the ratios (nan PearCorr counts as -1)."""
  pc = np.where(np.isfinite(scores["PearCorr"]), scores["PearCorr"], -1.0)
  return float(np.mean(pc) + np.mean(scores["RelAcc"]))


def choose(train_tables: Sequence[Mapping[str, Mapping[str, np.ndarray]]],
           configs: Sequence[pooled.PooledConfig]) -> tuple[pooled.PooledConfig, float]:
  """The setting with the best mean criterion over the training files' tables.

  Args:
    train_tables: one `evaluate_grid` table per TRAINING file (never the
      held-out one).
    configs: the grid, in tie-break order.

  Returns:
    (chosen config, its mean training criterion).
  """
  if not train_tables:
    raise ValueError("choose: no training file (leave-one-out needs at least 2 files)")
  best, best_val = None, -np.inf
  for cfg in configs:
    val = float(np.mean([criterion(t[cfg.name]) for t in train_tables]))
    if val > best_val:
      best, best_val = cfg, val
  return best, best_val


@dataclasses.dataclass(frozen=True)
class Fold:
  """One leave-one-dataset-out fold.

  Attributes:
    held_out: name of the reported file.
    trained_on: names of the files the setting was chosen on.
    config: the chosen setting.
    train_criterion: its mean criterion on the training files.
  """
  held_out: str
  trained_on: tuple[str, ...]
  config: pooled.PooledConfig
  train_criterion: float


def leave_one_out(curve_sets, configs: Sequence[pooled.PooledConfig] | None = None, *,
                  key: jax.Array, evaluate: Callable | None = None, **evaluate_options
                  ) -> tuple[list[Fold], dict]:
  """Chooses the setting of each file from the other files only.

  Args:
    curve_sets: n >= 2 `benchmarks.CurveSet`s with distinct names.
    configs: the grid (default `default_grid()`).
    key: PRNG key (file i uses fold_in(key, i)).
    evaluate: optional replacement of `evaluate_grid` (same signature,
      returns (table, results)); tests use it to record which files are read.
    **evaluate_options: passed to `evaluate` (ratios, num_restarts, ...).

  Returns:
    (folds, tables): one Fold per file, in order, and the per-file tables
    (name -> table) computed on the way; the table of file i is computed only
    if file i is a training file of another fold, and is never used to choose
    file i's setting.
  """
  sets = list(curve_sets)
  names = [c.name for c in sets]
  if len(sets) < 2:
    raise ValueError(f"leave_one_out needs at least 2 benchmark files, got {names}")
  if len(set(names)) != len(names):
    raise ValueError(f"leave_one_out: duplicate dataset names {names}")
  configs = default_grid() if configs is None else list(configs)
  evaluate = evaluate_grid if evaluate is None else evaluate
  tables: dict[str, dict] = {}

  def table_of(i):
    if names[i] not in tables:
      tables[names[i]] = evaluate(sets[i], configs, key=jax.random.fold_in(key, i),
                                  **evaluate_options)[0]
    return tables[names[i]]

  folds = []
  for i in range(len(sets)):
    train = [j for j in range(len(sets)) if j != i]
    cfg, val = choose([table_of(j) for j in train], configs)
    folds.append(Fold(names[i], tuple(names[j] for j in train), cfg, val))
  return folds, tables
