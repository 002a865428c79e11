"""Selection metrics of Lin et al. (2024) / Zeng et al. (2025) (docs/selection.md).

All functions take numpy-compatible arrays over the M candidate models of one
dataset and return Python floats (or numpy arrays for per-model RMSE).

- PearCorr: Pearson correlation between a method's feature f [M] and the true
  losses y = L(D*) [M], exactly as published (no re-orientation):
      r = sum (f - mean f)(y - mean y) / sqrt(sum (f - mean f)^2 sum (y - mean y)^2).
- RelAcc: (L_worst - L_chosen) / (L_worst - L_best), worst/best over ALL models
  at D*, L_chosen the true L(D*) of the method's top-ranked model.
- Spearman: Pearson correlation of the average ranks (ties get mean ranks).
- Kendall tau-b.
- Curve RMSE: sqrt(mean over held-out points of (L_pred - L_true)^2) in loss
  units, per model and pooled over a dataset.

`selection_scores` applies the first three to a selection result. The
correlations need at least `MIN_MODELS` = 3 models: with 2 models any feature
that orders them gives a correlation of exactly +1 or -1, which says nothing.
"""

from __future__ import annotations

import numpy as np

MIN_MODELS = 3
# The names of `selection_scores`, in its order.
SCORES = ("PearCorr", "RelAcc", "Spearman")


# Relative spread (max - min) / max |x| below which a vector is constant to rounding: the
# mean of M identical floats differs from them by ~1e-16 relative, so an exact test misses it.
CONSTANT_TOLERANCE = 1e-12


def constant_to_rounding(x) -> bool:
  """True when x [M] is constant up to `CONSTANT_TOLERANCE` relative spread (or has < 2 entries)."""
  x = np.asarray(x, np.float64).reshape(-1)
  if x.size < 2:
    return True
  scale = float(np.max(np.abs(x)))
  return float(x.max() - x.min()) <= CONSTANT_TOLERANCE * scale


def undefined_reason(feature, target) -> str:
  """Why a correlation of feature [M] with target [M] is NaN ("" when it is defined)."""
  f, y = _as_pair(feature, target)
  if not np.all(np.isfinite(y)):
    return "the true losses L(D*) are not all finite"
  if not np.all(np.isfinite(f)):
    return "the method's feature is not finite for every model"
  if constant_to_rounding(y):
    return (f"the true losses L(D*) are constant to rounding (relative spread < "
            f"{CONSTANT_TOLERANCE:g}): no model is better")
  if constant_to_rounding(f):
    return (f"the method's feature is constant over the models (relative spread < "
            f"{CONSTANT_TOLERANCE:g}): it orders nothing")
  return ""


def _as_pair(feature, target):
  f = np.asarray(feature, np.float64).reshape(-1)
  y = np.asarray(target, np.float64).reshape(-1)
  if f.shape != y.shape:
    raise ValueError(f"feature has {f.size} entries but target has {y.size}")
  return f, y


def pearson_corr(feature, target) -> float:
  """Raw Pearson correlation of feature [M] with target [M]; nan if either is constant to
  rounding (`constant_to_rounding`) or any entry is non-finite (`undefined_reason` says
  which)."""
  f, y = _as_pair(feature, target)
  if undefined_reason(f, y):
    return float("nan")
  fc, yc = f - f.mean(), y - y.mean()
  den = np.sqrt((fc * fc).sum() * (yc * yc).sum())
  return float((fc * yc).sum() / den) if den > 0 else float("nan")


def average_ranks(x) -> np.ndarray:
  """1-based ranks of x [M] ascending; tied entries share their mean rank."""
  x = np.asarray(x, np.float64).reshape(-1)
  order = np.argsort(x, kind="stable")
  ranks = np.empty(x.size, np.float64)
  sorted_x = x[order]
  i = 0
  while i < x.size:
    j = i
    while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
      j += 1
    ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
    i = j + 1
  return ranks


def spearman_corr(feature, target) -> float:
  """Spearman rank correlation (Pearson on average ranks); nan as `pearson_corr`."""
  f, y = _as_pair(feature, target)
  if undefined_reason(f, y):  # the ranks of values equal to rounding are noise
    return float("nan")
  return pearson_corr(average_ranks(f), average_ranks(y))


def kendall_tau(feature, target) -> float:
  """Kendall tau-b: (concordant - discordant) / sqrt((n0 - ties_f)(n0 - ties_y)); nan as
  `pearson_corr`."""
  f, y = _as_pair(feature, target)
  if undefined_reason(f, y):
    return float("nan")
  sf = np.sign(f[:, None] - f[None, :])
  sy = np.sign(y[:, None] - y[None, :])
  iu = np.triu_indices(f.size, 1)
  s = (sf * sy)[iu].sum()
  nf = (sf[iu] != 0).sum()
  ny = (sy[iu] != 0).sum()
  return float(s / np.sqrt(nf * ny)) if nf > 0 and ny > 0 else float("nan")


def relative_accuracy(chosen: int, target) -> float:
  """(L_worst - L[chosen]) / (L_worst - L_best) with worst/best over all of target [M]."""
  y = np.asarray(target, np.float64).reshape(-1)
  if not 0 <= int(chosen) < y.size:
    raise ValueError(f"chosen={chosen} is not a model index in [0, {y.size})")
  worst, best = y.max(), y.min()
  if constant_to_rounding(y):  # every choice is the best one
    return 1.0
  return float((worst - y[int(chosen)]) / (worst - best))


def curve_rmse(predicted, observed, mask=None):
  """Root-mean-square error in loss units over held-out points.

  Args:
    predicted: [M, P] predicted losses.
    observed: [M, P] true losses.
    mask: optional [M, P] bool, True for the held-out points to score.

  Returns:
    (per_model [M] float64, nan where a model has no scored point;
     pooled float: RMSE over all scored points of all models).
  """
  pred = np.asarray(predicted, np.float64)
  obs = np.asarray(observed, np.float64)
  if pred.shape != obs.shape:
    raise ValueError(f"predicted {pred.shape} and observed {obs.shape} differ in shape")
  m = np.ones(pred.shape, bool) if mask is None else np.asarray(mask, bool)
  sq = np.where(m, (pred - obs) ** 2, 0.0)
  count = m.sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    per_model = np.sqrt(sq.sum(-1) / count)
  per_model = np.where(count > 0, per_model, np.nan)
  total = m.sum()
  pooled = float(np.sqrt(sq.sum() / total)) if total > 0 else float("nan")
  return per_model, pooled


def selection_scores(result, truth) -> dict[str, float]:
  """PearCorr, RelAcc and Spearman (fractions) of one selection result.

  Args:
    result: anything with `feature` [M] and `chosen` (a `selection.SelectionResult`).
    truth: [M] true losses L(D*).

  Raises:
    ValueError: fewer than `MIN_MODELS` models (the correlations would be +-1).
  """
  m = np.size(truth)
  if m < MIN_MODELS:
    raise ValueError(f"PearCorr / Spearman need at least {MIN_MODELS} models, got {m}: "
                     "with 2 models every correlation is +1 or -1")
  return {"PearCorr": pearson_corr(result.feature, truth),
          "RelAcc": relative_accuracy(result.chosen, truth),
          "Spearman": spearman_corr(result.feature, truth)}
