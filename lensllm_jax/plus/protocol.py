r"""Leave-one-dataset-out choice of the PooledLensLLM settings (hyper-parameters).

With reported benchmark files f_1..f_n and optional TRAINING-ONLY files
t_1..t_k (n + k >= 2), every setting of the pooled fit PooledLensLLM
(`pooled.PooledConfig`: pooled quantities, strength rule -- fixed,
empirical Bayes x multiplier, or per-view backtest --, covariates, phase
weight, robust loss) is chosen for file f_i using ONLY the other files:

    chosen_i = argmax_{c in grid} mean_{g in T_i} criterion(c, g),
    T_i = {f_j : j != i} + {t_1..t_k},
    criterion(c, g) = mean_r PearCorr_r(c, g) + mean_r RelAcc_r(c, g),

the means over the budget ratios r of file g (8 ... 512 by default, relative
to the file's own D*; a training-only file keeps the ratios that leave at
least 2 visible fine-tuning points, `training_ratios`), PearCorr and RelAcc
as in `metrics` (docs/selection.md); every training file weighs the same.
Ties go to the earlier setting of the grid (independent fits first). Then
chosen_i is reported on f_i; training-only files are never reported. The
chooser (`choose`) is a function of the training files' score tables only;
`leave_one_out` never passes the held-out file's scores to it, which
`tests/plus/test_protocol.py` checks by poisoning the held-out file (with a
training-only file present and a grid with every kind of option).

Nested choice (`nested_choices`, `Fold.nested`): to score a chosen setting on
one of its own training files t without the in-sample bias (LensLLM+ compares
candidates on the training files, `plus.candidates`), each fold also records,
for every t in T_i, the setting `choose` picks on T_i \ {t}:

    nested_{i,t} = argmax_{c in grid} mean_{g in T_i \ {t}} criterion(c, g),

same criterion and tie rule. With a single training file (T_i \ {t} empty)
there is nothing to choose on: the grid's first setting (the tie-break
default, independent fits in `default_grid`), criterion nan. Only the tables
of T_i are read, so the held-out file never reaches its fold's nested
settings either.

The grid (`default_grid`) is a full factorial over every structural option;
its docstring says how its values were fixed without reported numbers.
Scores of a file are computed once for the whole grid (`evaluate_grid`) and
reused in every fold where that file is a training file. The settings of a
run (ratios, D*, restarts, optimiser steps) are one `ProtocolOptions` record,
passed to `leave_one_out` and from there to every file's `evaluate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from lensllm_jax import selection
from lensllm_jax.progress import progress
from lensllm_jax.selection import metrics, pooled

__all__ = [
  "DEFAULT_OPTIONS",
  "DEFAULT_RATIOS",
  "Fold",
  "ProtocolOptions",
  "choose",
  "criterion",
  "default_grid",
  "evaluate_grid",
  "leave_one_out",
  "nested_choices",
  "score_results",
]

DEFAULT_RATIOS = (8, 16, 32, 64, 128, 256, 512)
METRICS = ("PearCorr", "RelAcc", "Spearman", "RMSE")


# The grid's axes (see `default_grid`); each value is fixed by its meaning.
POOLED_SETS = (("beta",), ("beta", "E"), ("beta", "E", "Dt"))
COVARIATE_SETS = ("none", "size_zero_shot")
PRE_POWER_WEIGHTS = (1.0, 0.1)
HUBER_SDS = (None, 1.345)
FIXED_STRENGTHS = (1e-2, 1.0)
EB_MULTIPLIERS = (0.1, 1.0, 10.0)
BACKTEST_FACTOR = 2


def strength_rules() -> list[dict]:
  """The prior-strength axis: keyword arguments of `pooled.PooledConfig`.

  Fixed strengths s^2 / tau^2 (FIXED_STRENGTHS), empirical-Bayes strengths
  times a multiplier kappa (EB_MULTIPLIERS, kappa = 1 is the plain estimate),
  and the per-view backtest (`PooledConfig.backtest` = BACKTEST_FACTOR: the
  strength is chosen among `pooled.BACKTEST_STRENGTHS` on the visible data of
  each view alone).
  """
  rules = [{"strength": s} for s in FIXED_STRENGTHS]
  rules += [{"strength": k, "empirical_bayes": True} for k in EB_MULTIPLIERS]
  rules.append({"backtest": BACKTEST_FACTOR})
  return rules


def default_grid() -> list[pooled.PooledConfig]:
  """The settings searched by the protocol: every structural choice is an axis.

  Full factorial (independent fits first, then pooled settings):

    independent fits (strength 0) x pre-power weight x Huber       (4)
    pooled quantities POOLED_SETS (beta; beta + E; beta + E + D_t)
      x covariates COVARIATE_SETS (across-model mean; regression on log
        size and log zero-shot loss)
      x pre-power weight PRE_POWER_WEIGHTS (1 = off; 0.1)
      x Huber HUBER_SDS (None = squared loss; 1.345 noise sds, relative)
      x strength rule `strength_rules()` (fixed 1e-2, 1; empirical Bayes
        x 0.1, 1, 10; per-view backtest)                           (144)

  148 settings. How it was formed, without looking at any reported number:
  each option of `pooled.PooledConfig` is an axis, and its values are fixed
  by their meaning: "off" (the published fit) plus one or two values a decade
  apart for weights and strengths; the Huber threshold is relative to the
  visible data's noise sd with the textbook constant 1.345 (95% Gaussian
  efficiency), so it is scale-free; the pooled quantities are the nested sets
  from the most to the least constrained shape quantity; the covariates are
  "none" or "all". The grid size was set by the time budget of the
  experiment binary (about 10 minutes on 2 cores), not by results.
  `PooledConfig.floor_prior` is held at 0 (off): it was dropped by earlier
  development runs that looked at both public files, the one choice here
  not made by the protocol. Ties in the protocol go to the earlier setting.
  """
  grid = [pooled.PooledConfig(strength=0.0, pooled=(), pre_power_weight=w, huber_delta=h,
                              huber_relative=h is not None)
          for w in PRE_POWER_WEIGHTS for h in HUBER_SDS]
  for rule in strength_rules():
    for pool in POOLED_SETS:
      for cov in COVARIATE_SETS:
        for w in PRE_POWER_WEIGHTS:
          for h in HUBER_SDS:
            grid.append(pooled.PooledConfig(pooled=pool, covariates=cov, pre_power_weight=w,
                                            huber_delta=h, huber_relative=h is not None,
                                            **rule))
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
  return {**metrics.selection_scores(r, truth), "RMSE": rmse}


def training_ratios(curves, ratios: Sequence[int] = DEFAULT_RATIOS, *, min_points: int = 2,
                    target_data_num: float | None = None) -> list[int]:
  """The ratios of a TRAINING-ONLY file: those leaving >= min_points visible D > 0 points.

  Ratios are relative to the file's own D* (default its largest D), as for
  the reported files; on a short file (e.g. D* = 25600) the large ratios leave
  one or no fine-tuning point and are dropped.
  """
  d = np.asarray(curves.data_sizes, np.float64)
  target = float(d.max()) if target_data_num is None else float(target_data_num)
  out = [int(r) for r in ratios if ((d > 0) & (d <= target / r)).sum() >= min_points]
  if not out:
    raise ValueError(f"{curves.source}: no ratio of {list(ratios)} leaves {min_points} "
                     f"fine-tuning points below D*={target:g}")
  return out


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


@dataclasses.dataclass(frozen=True)
class ProtocolOptions:
  """The settings of a leave-one-dataset-out run, the same on every file.

  Attributes:
    ratios: budget ratios D*/D_max of the reported files (a training-only file
      is scored on `training_ratios` of them, relative to its own D*).
    target_data_num: D* of the reported files (None: each file's largest D);
      a training-only file always uses its own largest D.
    num_restarts: random restarts of each law fit.
    num_steps: optimiser steps of each pooled fit.
  """
  ratios: tuple[int, ...] = DEFAULT_RATIOS
  target_data_num: float | None = None
  num_restarts: int = 8
  num_steps: int = 60

  def __post_init__(self):
    object.__setattr__(self, "ratios", tuple(int(r) for r in self.ratios))

  def for_training_file(self, curves) -> ProtocolOptions:
    """The options a training-only file is scored with: the ratios it can afford
    (`training_ratios`) relative to its own largest D."""
    return dataclasses.replace(self, ratios=training_ratios(curves, self.ratios),
                               target_data_num=None)


DEFAULT_OPTIONS = ProtocolOptions()


def evaluate_grid(curves, configs: Sequence[pooled.PooledConfig], *, key: jax.Array,
                  options: ProtocolOptions = DEFAULT_OPTIONS):
  """Scores of every setting on one file: table[config.name][metric] -> [ratios] array.

  The truth L(D*) is read here only to score; the predictions come from
  budget-limited views (`selection.visible_view`) at `options.ratios` of
  D* = `options.target_data_num`.

  Returns:
    (table, results): results[ratio index][config index] SelectionResults.
  """
  meta, truth, views = budget_views(curves, options.ratios, options.target_data_num)
  res = pooled.pooled_selection([v for _, v in views], meta, configs, key=key,
                                num_restarts=options.num_restarts, num_steps=options.num_steps)
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


def nested_choices(train_tables: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
                   configs: Sequence[pooled.PooledConfig]
                   ) -> dict[str, tuple[pooled.PooledConfig, float]]:
  """For each training file t of a fold: the setting `choose` picks on the OTHER training files.

  Args:
    train_tables: training file name -> `evaluate_grid` table (the fold's
      training files only, never its held-out file).
    configs: the grid, in tie-break order.

  Returns:
    t -> (setting chosen on the training files other than t, its mean
    criterion there); (configs[0], nan) when t is the only training file.
  """
  out = {}
  for t in train_tables:
    rest = [tab for name, tab in train_tables.items() if name != t]
    out[t] = choose(rest, configs) if rest else (configs[0], float("nan"))
  return out


@dataclasses.dataclass(frozen=True)
class Fold:
  """One leave-one-dataset-out fold.

  Attributes:
    held_out: name of the reported file.
    trained_on: names of the files the setting was chosen on.
    config: the chosen setting.
    train_criterion: its mean criterion on the training files.
    nested: training file t -> (setting chosen on the other training files,
      its mean criterion there) (`nested_choices`): the setting to score on t.
  """
  held_out: str
  trained_on: tuple[str, ...]
  config: pooled.PooledConfig
  train_criterion: float
  nested: Mapping[str, tuple[pooled.PooledConfig, float]] = dataclasses.field(
    default_factory=dict)


def leave_one_out(curve_sets, configs: Sequence[pooled.PooledConfig] | None = None, *,
                  key: jax.Array, options: ProtocolOptions = DEFAULT_OPTIONS,
                  evaluate: Callable | None = None,
                  train_only: Sequence = ()) -> tuple[list[Fold], dict]:
  """Chooses the setting of each file from the other files only.

  Args:
    curve_sets: the reported `benchmarks.CurveSet`s (distinct names).
    configs: the grid (default `default_grid()`).
    key: PRNG key (reported file i uses fold_in(key, i), training-only file j
      fold_in(key, len(curve_sets) + j)).
    options: the ratios, D* and fit settings each file is evaluated with.
    evaluate: optional replacement of `evaluate_grid` (same signature,
      returns (table, results)); tests use it to record which files are read.
    train_only: CurveSets used as training files in EVERY fold and never
      reported; each is evaluated with `options.for_training_file` (its own
      D* and the ratios it can afford).

  Returns:
    (folds, tables): one Fold per reported file, in order, and the per-file
    tables (name -> table) computed on the way; the table of reported file i
    is computed only if file i is a training file of another fold, and is
    never used to choose file i's setting nor its fold's nested settings.
  """
  sets = list(curve_sets)
  extra = list(train_only)
  names = [c.name for c in sets]
  all_names = names + [c.name for c in extra]
  if not sets:
    raise ValueError("leave_one_out: no file to report on")
  if len(sets) + len(extra) < 2:
    raise ValueError(f"leave_one_out needs at least 2 benchmark files, got {all_names}")
  if len(set(all_names)) != len(all_names):
    raise ValueError(f"leave_one_out: duplicate dataset names {all_names}")
  configs = default_grid() if configs is None else list(configs)
  evaluate = evaluate_grid if evaluate is None else evaluate
  tables: dict[str, dict] = {}

  def table_of(j):
    if all_names[j] not in tables:
      c = (sets + extra)[j]
      opts = options if j < len(sets) else options.for_training_file(c)
      tables[all_names[j]] = evaluate(c, configs, key=jax.random.fold_in(key, j),
                                      options=opts)[0]
    return tables[all_names[j]]

  folds = []
  for i in progress(range(len(sets)), desc="protocol folds", unit="fold"):
    train = [j for j in range(len(all_names)) if j != i]
    cfg, val = choose([table_of(j) for j in train], configs)
    nested = nested_choices({all_names[j]: table_of(j) for j in train}, configs)
    folds.append(Fold(names[i], tuple(all_names[j] for j in train), cfg, val, nested))
  return folds, tables
