"""LensLLM+ as a protocol-chosen predictor among candidates.

Candidates (each predicts L(D*) of every model from a budget view only):

  Pooled      the pooled LensLLM fit of `pooled.py` with the setting the
              leave-one-dataset-out grid chose (`protocol.leave_one_out`) on the
              training files of the fold;
  CurvePFN    the posterior mean of the prior-fitted network (`curve_pfn.py`),
              each model on its own;
  Spectral    LensLLM with a decaying F(D) = F0 (w_0 + w_1 e^(-D / D_1))
              (`dynamic_law.spectral_lensllm_law(1)`), independent fits;
  AtS         AtS itself (Lin et al. 2024);
  and blends  exp(w log L_AtS(D*) + (1 - w) log L_X(D*)) of AtS with each X
              above, w in BLEND_WEIGHTS (w = 0 is X itself).

Choice (`choose_candidate`): for each reported file, the candidate with the
best mean criterion (`protocol.criterion`: mean PearCorr + mean RelAcc over the
budget ratios) over the OTHER files (reported and training-only), exactly the
rule of `protocol.leave_one_out`; ties go to the earlier candidate of
`candidate_names()`. The held-out file's predictions are never read by the
choice. Simplification (stated): the Pooled candidate of a fold uses the
setting chosen on that fold's training files also when it is scored ON those
training files (in-sample for them), which can only favour Pooled in the
choice; the other candidates have no setting chosen on data.

Budgeted (`budgeted_pfn_selection`): the early-stopping rule of
`budgeted.py` with the PFN's own predictive mean and sd of log L(D*) in
place of a fitted law's Laplace sd.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from lensllm_jax import budgeted, curve_pfn, dynamic_law, pooled, protocol, selection

__all__ = [
  "BASES",
  "BLEND_WEIGHTS",
  "Candidate",
  "blend",
  "budgeted_pfn_selection",
  "candidate_names",
  "candidate_predictions",
  "choose_candidate",
  "score_table",
]

BASES = ("Pooled", "CurvePFN", "Spectral")
BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A candidate predictor: base X blended with AtS with weight w (X alone for w = 0)."""
  base: str
  ats_weight: float = 0.0

  @property
  def name(self) -> str:
    if self.base == "AtS":
      return "AtS"
    return self.base if self.ats_weight == 0 else f"{self.ats_weight:g}AtS+{self.base}"


def candidate_names() -> list[Candidate]:
  """All candidates, in tie-break order: each base alone, then its AtS blends; AtS last."""
  return [Candidate(b, w) for b in BASES for w in BLEND_WEIGHTS] + [Candidate("AtS", 1.0)]


def blend(ats_pred, other_pred, weight: float) -> np.ndarray:
  """exp(w log a + (1 - w) log b) [...]; where b is not finite, a is used."""
  a = np.asarray(ats_pred, np.float64)
  b = np.asarray(other_pred, np.float64)
  b = np.where(np.isfinite(b) & (b > 0), b, a)
  return np.exp(weight * np.log(a) + (1.0 - weight) * np.log(b))


def candidate_predictions(curves, ratios: Sequence[int], *, key: jax.Array,
                          pooled_configs: Sequence[pooled.PooledConfig],
                          predictor: curve_pfn.CurvePFNPredictor, num_restarts: int = 8,
                          num_steps: int = 60, target_data_num: float | None = None):
  """Base predictions of L(D*) on every budget view of one file.

  Args:
    curves: a CurveSet; views are `protocol.budget_views(curves, ratios)`.
    ratios: budget ratios D*/D_max.
    key: PRNG key of the fits.
    pooled_configs: the Pooled settings to run (one per fold that needs this file).
    predictor: the CurvePFN.

  Returns:
    (truth [M], preds): preds[name] -> [R, M] predicted L(D*), names "AtS",
    "CurvePFN", "Spectral", "RectifiedFit" and "Pooled[<config name>]" per
    setting; plus preds["CurvePFN_sd"] [R, M], the PFN's sd of log L(D*), and
    "CurvePFN_q0.1" / "CurvePFN_q0.9" [R, M], its 10% / 90% quantiles of L(D*).
  """
  meta, truth, rv = protocol.budget_views(curves, ratios, target_data_num)
  views = [v for _, v in rv]
  preds = {"AtS": np.stack([selection.ats(v, meta).predicted for v in views])}
  pfn = [curve_pfn.curve_pfn_selection(v, meta, predictor=predictor) for v in views]
  preds["CurvePFN"] = np.stack([r.predicted for r in pfn])
  preds["CurvePFN_sd"] = np.stack([r.extras["sd_log"] for r in pfn])
  preds["CurvePFN_q0.1"] = np.exp(np.stack([r.extras["q0.1_log"] for r in pfn]))
  preds["CurvePFN_q0.9"] = np.exp(np.stack([r.extras["q0.9_log"] for r in pfn]))
  spec = selection.fit_law_views("Spectral", dynamic_law.spectral_lensllm_law(1), views, meta,
                                 key=key, use_zero_shot=True, num_restarts=num_restarts)
  preds["Spectral"] = np.stack([r.predicted for r in spec])
  rect = selection.run_fitted_batch("RectifiedFit", views, meta, key=key,
                                    num_restarts=num_restarts)
  preds["RectifiedFit"] = np.stack([r.predicted for r in rect])
  configs = list(dict.fromkeys(pooled_configs))
  if configs:
    res = pooled.pooled_selection(views, meta, configs, key=key, num_restarts=num_restarts,
                                  num_steps=num_steps)
    for j, c in enumerate(configs):
      preds[f"Pooled[{c.name}]"] = np.stack([res[i][j].predicted for i in range(len(views))])
  return truth, preds


def candidate_prediction(cand: Candidate, preds: Mapping[str, np.ndarray],
                         pooled_config: pooled.PooledConfig | None) -> np.ndarray:
  """[R, M] predictions of one candidate from the base predictions."""
  if cand.base == "AtS":
    return preds["AtS"]
  key = f"Pooled[{pooled_config.name}]" if cand.base == "Pooled" else cand.base
  return blend(preds["AtS"], preds[key], cand.ats_weight)


def score_table(prediction, truth) -> dict[str, np.ndarray]:
  """metric -> [R] (PearCorr, RelAcc, Spearman, RMSE at D*) of predictions [R, M]."""
  rows = []
  for p in np.asarray(prediction, np.float64):
    feature = np.where(np.isfinite(p), p, np.inf)
    res = selection.SelectionResult("candidate", feature, selection.rank_by(feature),
                                    predicted=p)
    rows.append(protocol.score_results(res, truth))
  return {k: np.array([r[k] for r in rows]) for k in protocol.METRICS}


def choose_candidate(train_tables: Sequence[Mapping[str, Mapping[str, np.ndarray]]],
                     candidates: Sequence[Candidate] | None = None) -> tuple[Candidate, float]:
  """The candidate with the best mean `protocol.criterion` over the training tables.

  train_tables: one dict candidate name -> score table per TRAINING file.
  """
  return protocol.choose(train_tables, candidate_names() if candidates is None else candidates)


def budgeted_pfn_selection(curves, levels: Sequence[float], *, predictor, max_data_num: float,
                           min_points: int = 4, target_data_num: float | None = None,
                           progress=None):
  """`budgeted.early_stopping_selection` with the PFN's predictive mean / sd of log L(D*).

  Step s reveals D_s for every active model; each model's log L(D*) has the
  PFN's posterior mean and sd (`curve_pfn.CurvePFNPredictor.predict`) from
  its revealed points; model m stops when log L_m - z sd_m > min_j (log L_j +
  z sd_j) once every model has `min_points` fine-tuning points.
  """
  grid = np.asarray(curves.data_sizes, np.float64)
  target = float(grid.max()) if target_data_num is None else float(target_data_num)

  def predict_views(views, step):
    del step
    out = []
    for v in views:
      y = np.log(np.where(v.mask, v.losses, 1.0))
      p = predictor.predict(v.data_sizes, y, v.mask, [target])
      out.append((p["mean"][:, 0], p["sd_log"][:, 0]))
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])

  return budgeted.early_stopping_selection(
    curves, levels, None, predict_views=predict_views, name=curve_pfn.METHOD_NAME,
    max_data_num=max_data_num, target_data_num=target, min_points=min_points,
    progress=progress)
