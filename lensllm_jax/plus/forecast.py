r"""Which model to fine-tune: predicted L(D*) with an 80 % interval for every model.

Given measured fine-tuning curves (any sizes per model; a curve file's empty
cells are "not measured") and the user's data size D* (any D* at or beyond the
largest measured size, not necessarily a grid point), `forecast` predicts
every model's test loss after fine-tuning on D* with a named predictor and
ranks the models by it.

Predictors (`PREDICTORS`; `predictor_names()`):

  LensLLM+      the candidate the leave-one-dataset-out protocol chose
                (`experiments.lensllm_plus`), read from the package data
                `data/lensllm_plus_choice.json` together with the run that
                chose it (`recommended_candidate`), so a user's file is not
                re-scored against the public files;
  a candidate   any candidate of `candidates.all_candidates()` by name but the
                PooledLensLLM ones, which need a setting chosen on curve files
                (CurvePFN, 0.25AtS+CurvePFN, Spectral, ContextPFN, ...);
  AtS           Lin et al.'s power-phase line (no uncertainty: sd 0);
  VanillaFit, RectifiedFit, LensLLM   independent law fits, with the
                delta-method sd of `budgeted.laplace_log_sd`.

Uncertainty. Each predictor gives, per model, a mean prediction L_m(D*) and
the sd s_m of log L_m(D*) (its own: the PFN's predictive sd, the Laplace sd of
a law fit, (1 - w) s_X for a blend w AtS + (1 - w) X with AtS's line taken as
exact, as in `plus.candidates`). The 80 % interval is the PFN's own 10 % and
90 % quantiles of log L(D*) where the predictor has them (blended the same way),
else exp(log L_m +- 1.2816 s_m). The probability that model j beats model i
treats the two log predictions as independent normals:

    P(L_j < L_i) = Phi((log L_i - log L_j) / sqrt(s_i^2 + s_j^2)).

The zero-shot point and the D > 0 points are read; each model needs the
predictor's minimum number of measured points (`min_points`), else the
error names the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

from lensllm_jax import errors, selection
from lensllm_jax.laws import dynamic_law
from lensllm_jax.plus import candidates, pfn
from lensllm_jax.selection import budgeted, pooled

__all__ = [
  "CHOICE_FILE",
  "INTERVAL_Z",
  "RECOMMENDED",
  "Forecast",
  "choice_record",
  "forecast",
  "min_points",
  "predict_sizes",
  "predictor_inputs",
  "predictor_names",
  "recommended_candidate",
  "reranked",
]

RECOMMENDED = candidates.PLUS_NAME
CHOICE_FILE = pathlib.Path(__file__).resolve().parents[1] / "data" / "lensllm_plus_choice.json"
INTERVAL = 0.8  # central interval reported
INTERVAL_Z = 1.2815515655446004  # Phi^-1(0.9): the Gaussian 80 % central interval


def choice_record(chosen_rows: Sequence[dict], *, source: str, command: str) -> dict:
  """The stored LensLLM+ choice from the folds of a lensllm_plus run.

  Args:
    chosen_rows: rows of `candidates_chosen.csv` (held_out, trained_on,
      candidate, train_criterion), one per leave-one-dataset-out fold.
    source, command: where the rows come from and the command that wrote them.

  Returns:
    {"candidate", "rule", "run", "folds"}: the candidate every fold chose;
    if folds disagree, the one chosen by most folds, ties to the larger mean
    training criterion (a new file is held out from every fold).
  """
  if not chosen_rows:
    raise ValueError(f"{source}: no fold rows")
  votes: dict[str, list[float]] = {}
  for r in chosen_rows:
    votes.setdefault(r["candidate"], []).append(float(r["train_criterion"]))
  best = max(votes, key=lambda c: (len(votes[c]), float(np.mean(votes[c]))))
  return {
    "candidate": best,
    "rule": "the candidate chosen by the most leave-one-dataset-out folds (here: "
            f"{len(votes[best])} of {len(chosen_rows)}); ties to the larger mean training "
            "criterion (mean PearCorr + mean RelAcc over the budget ratios)",
    "run": {"command": command, "source": source},
    "folds": [{"held_out": r["held_out"], "trained_on": r["trained_on"].split("+"),
               "candidate": r["candidate"], "train_criterion": float(r["train_criterion"])}
              for r in chosen_rows],
  }


def recommended_candidate(path: str | pathlib.Path = CHOICE_FILE) -> candidates.Candidate:
  """The stored LensLLM+ candidate (`choice_record` of the committed lensllm_plus run)."""
  name = json.loads(pathlib.Path(path).read_text())["candidate"]
  return _candidate(name)


def _candidate(name: str) -> candidates.Candidate:
  for c in candidates.all_candidates():
    if c.name == name and c.base != pooled.METHOD_NAME:
      return c
  raise errors.ConfigError(f"unknown predictor {name!r}; known: "
                           f"{', '.join(predictor_names())}")


def predictor_names() -> list[str]:
  """Every predictor `forecast` takes by name (LensLLM+ first)."""
  cands = [c.name for c in candidates.all_candidates() if c.base != pooled.METHOD_NAME]
  return [RECOMMENDED, *cands, *(m for m in budgeted.BUDGET_METHODS if m not in cands)]


def predictor_inputs(predictor: str) -> dict[str, pathlib.Path]:
  """The files a predictor reads besides the curves, for a run's manifest (`rundir`): the
  stored LensLLM+ choice and the weights of the PFN its candidate uses ({} for a law fit)."""
  if predictor in selection.FITTED_LAWS:
    return {}
  out = {}
  if predictor == RECOMMENDED:
    out["predictor/choice"] = CHOICE_FILE
  cand = recommended_candidate() if predictor == RECOMMENDED else _candidate(predictor)
  weights = {"CurvePFN": pfn.CURVE_PFN_WEIGHTS, "ContextPFN": pfn.CONTEXT_PFN_WEIGHTS}
  if cand.base in weights:
    out[f"predictor/{cand.base}"] = weights[cand.base]
  return out


def min_points(predictor: str) -> tuple[int, bool]:
  """(measured points each model needs, whether the zero-shot point counts).

  AtS (alone or blended) draws a line through D > 0 points: 2. A law fit needs
  as many points as its parameters (the zero-shot point counts for the laws
  that use it). The PFNs read any number >= 1.
  """
  if predictor in selection.FITTED_LAWS:
    factory, zero = selection.FITTED_LAWS[predictor]
    return factory().num_params, zero
  cand = recommended_candidate() if predictor == RECOMMENDED else _candidate(predictor)
  if cand.ats_weight > 0 or cand.base == "AtS":
    return 2, False
  if cand.base == "Spectral":
    return dynamic_law.spectral_lensllm_law(1).num_params, True
  return 1, True


@dataclasses.dataclass(frozen=True)
class SizePrediction:
  """Predictions at query sizes [Q] for M models.

  Attributes:
    sizes: [Q] data sizes.
    predicted: [M, Q] mean prediction of L.
    sd_log: [M, Q] sd of log L (0: no uncertainty, inf: not estimable).
    lower, upper: [M, Q] the central 80 % interval of L.
    status: [M] status (`laws.STATUS_NAMES`) of each model's law fit; None for a
      predictor that fits no law.
  """
  sizes: np.ndarray
  predicted: np.ndarray
  sd_log: np.ndarray
  lower: np.ndarray
  upper: np.ndarray
  status: np.ndarray | None = None


def _gaussian_interval(pred, sd):
  logp = np.log(np.where(np.isfinite(pred) & (pred > 0), pred, np.nan))
  return np.exp(logp - INTERVAL_Z * sd), np.exp(logp + INTERVAL_Z * sd)


def _law_sizes(name: str, view, meta, sizes, key) -> SizePrediction:
  res = selection.run_fitted_batch(name, [view], meta, key=key)[0]
  pred = res.predictor.predict(sizes)
  ylog = np.log(np.where(view.mask, view.losses, 1.0))
  # The Laplace sd's target is a compile-time constant: one call per size.
  sd = np.stack([budgeted.laplace_log_sd(res.predictor.law, res.predictor.raw_params,
                                         view.data_sizes, res.extras["mask"], ylog, float(q))
                 for q in sizes], 1)
  return SizePrediction(np.asarray(sizes), pred, sd, *_gaussian_interval(pred, sd),
                        status=np.asarray(res.status, dtype=str))


def _candidate_sizes(cand: candidates.Candidate, view, meta, sizes, key,
                     pfn=None) -> SizePrediction:
  """A candidate at each size (`candidates.candidate_distribution`, one call per size)."""
  ctx = candidates.BaseContext(key=key, predictor=pfn or _default_pfn(),
                                    num_points=view.data_sizes.size)
  cols = [candidates.candidate_distribution(
      cand, [view], dataclasses.replace(meta, target_data_num=float(q)), ctx) for q in sizes]
  pred = np.stack([c.mean[0] for c in cols], 1)
  sd = np.stack([c.sd_log[0] for c in cols], 1)
  lower, upper = _gaussian_interval(pred, sd)
  if cols[0].quantiles:  # the base's own quantiles where it has a finite prediction
    for level, out in ((0.1, lower), (0.9, upper)):
      q = np.stack([c.quantiles[level][0] for c in cols], 1)
      out[np.isfinite(q)] = q[np.isfinite(q)]
  # The base's fits do not depend on the target size: the first call's statuses hold for all.
  status = None if cols[0].status is None else np.asarray(cols[0].status[0], dtype=str)
  return SizePrediction(np.asarray(sizes), pred, sd, lower, upper, status)


_PFN_CACHE: dict = {}


def _default_pfn():
  if "pfn" not in _PFN_CACHE:
    _PFN_CACHE["pfn"] = pfn.default_curve_predictor()
  return _PFN_CACHE["pfn"]


def predict_sizes(view: selection.VisibleCurves, meta: selection.Metadata, sizes,
                  predictor: str = RECOMMENDED, *, key: jax.Array | None = None,
                  pfn=None) -> SizePrediction:
  """Predictions of every model at query sizes [Q] (each >= the view's sizes).

  `meta.target_data_num` is not read (the sizes are the targets). key: PRNG
  key of the law fits (default key(0)); pfn: the CurvePFN (default the
  committed one).
  """
  key = jax.random.key(0) if key is None else key
  sizes = np.asarray(sizes, np.float64).reshape(-1)
  if predictor in selection.FITTED_LAWS:
    return _law_sizes(predictor, view, meta, sizes, key)
  cand = recommended_candidate() if predictor == RECOMMENDED else _candidate(predictor)
  return _candidate_sizes(cand, view, meta, sizes, key, pfn)


def _normal_cdf(x: float) -> float:
  return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def prob_better(log_a: float, sd_a: float, log_b: float, sd_b: float) -> float:
  """P(L_b < L_a) for independent normal log predictions (module docstring)."""
  scale = math.hypot(sd_a, sd_b)
  if not math.isfinite(scale):
    return 0.5
  if scale == 0:
    return float(log_b < log_a) + 0.5 * float(log_b == log_a)
  return _normal_cdf((log_a - log_b) / scale)


@dataclasses.dataclass(frozen=True)
class Forecast:
  """Predicted L(D*) of every model and the recommendation.

  Attributes:
    predictor: the predictor's name ("LensLLM+" names its candidate: "LensLLM+
      (0.25AtS+CurvePFN)").
    source: the curve file (or "<curves>").
    models: [M] model ids; sizes [M] parameter counts.
    target_data_num: D*.
    predicted: [M] predicted L(D*); sd_log [M] sd of log L(D*); lower, upper
      [M] the 80 % interval.
    ranking: [M] model indices, best (lowest predicted L(D*)) first; models
      without a finite prediction last.
    prob_next_better: P(the second-ranked model is better than the first).
    largest_measured: [M] the largest measured D of each model.
    fit_status: [M] status of each model's law fit (`laws.STATUS_NAMES`); None
      for a predictor that fits no law.
  """
  predictor: str
  source: str
  models: tuple[str, ...]
  sizes: np.ndarray
  target_data_num: float
  predicted: np.ndarray
  sd_log: np.ndarray
  lower: np.ndarray
  upper: np.ndarray
  ranking: np.ndarray
  prob_next_better: float
  largest_measured: np.ndarray
  fit_status: tuple[str, ...] | None = None

  @property
  def best(self) -> str:
    return self.models[int(self.ranking[0])]

  def headline(self) -> str:
    """`fine-tune MODEL: predicted test loss X [lo, hi] at D = N`, then the runner-up."""
    i = int(self.ranking[0])
    line = (f"fine-tune {self.models[i]}: predicted test loss {self.predicted[i]:.4f} "
            f"[{self.lower[i]:.4f}, {self.upper[i]:.4f}] at D = {int(self.target_data_num)}")
    if len(self.ranking) > 1:
      j = int(self.ranking[1])
      line += (f"; next best {self.models[j]}: {self.predicted[j]:.4f} "
               f"[{self.lower[j]:.4f}, {self.upper[j]:.4f}], probability it is better "
               f"{self.prob_next_better:.2f}")
    return line

  def to_json(self) -> dict:
    rows = [{"model": self.models[i], "rank": int(r) + 1, "size": int(self.sizes[i]),
             "predicted": float(self.predicted[i]), "lower": float(self.lower[i]),
             "upper": float(self.upper[i]), "sd_log": float(self.sd_log[i]),
             "largest_measured": float(self.largest_measured[i])}
            for r, i in enumerate(self.ranking)]
    return {"headline": self.headline(), "predictor": self.predictor, "source": self.source,
            "target_data_num": self.target_data_num, "interval": INTERVAL,
            "prob_next_better": self.prob_next_better, "models": rows}


def check_points(curves, predictor: str) -> None:
  """`errors.CurveFileError` naming the first model with fewer measured points than `min_points`."""
  need, zero = min_points(predictor)
  d = np.asarray(curves.data_sizes, np.float64)
  use = (d >= 0) if zero else (d > 0)
  counts = (np.asarray(curves.measured) & use[None, :]).sum(1)
  for m in np.flatnonzero(counts < need):
    what = "points (zero-shot included)" if zero else "points at D > 0"
    raise errors.CurveFileError(f"{curves.source}: model {curves.models[m]!r} has "
                                f"{int(counts[m])} measured {what}; predictor {predictor} "
                                f"needs {need}")


def forecast(curves, target_data_num: float, *, predictor: str = RECOMMENDED,
             key: jax.Array | None = None, pfn=None,
             curve_sizes: Sequence[float] = ()) -> tuple[Forecast, SizePrediction | None]:
  """Predicted L(D*) of every model of `curves` and the pick.

  Args:
    curves: a `benchmarks.CurveSet` (NaN losses = not measured; >= 2 models).
    target_data_num: D* >= the largest measured size.
    predictor: a name of `predictor_names()`.
    key: PRNG key of the law fits (default key(0)).
    pfn: the CurvePFN (default the committed one).
    curve_sizes: extra sizes at which to predict too (the figure's curves).

  Returns:
    (Forecast, SizePrediction at `curve_sizes` or None).
  """
  if predictor not in predictor_names():
    raise errors.ConfigError(f"unknown predictor {predictor!r}; known: "
                             f"{', '.join(predictor_names())}")
  if curves.num_models < 2:
    raise errors.CurveFileError(f"{curves.source}: {curves.num_models} model(s); selection "
                                "needs at least 2")
  measured = np.asarray(curves.measured)
  d = np.asarray(curves.data_sizes, np.float64)
  largest = np.where(measured, d[None, :], -np.inf).max(1)
  d_max = float(largest.max())
  if not target_data_num >= d_max:
    raise errors.ConfigError(f"target D* = {target_data_num:g} is below the largest measured "
                             f"size {d_max:g} of {curves.source}")
  check_points(curves, predictor)
  keep = d <= d_max
  view = selection.VisibleCurves(data_sizes=d[keep], losses=np.asarray(curves.losses)[:, keep],
                                 mask=measured[:, keep], max_data_num=d_max)
  meta = selection.metadata_of(curves, target_data_num)
  sizes = [float(target_data_num), *map(float, curve_sizes)]
  out = predict_sizes(view, meta, sizes, predictor, key=key, pfn=pfn)
  pred, sd = out.predicted[:, 0], out.sd_log[:, 0]
  ranking = selection.rank_by(np.where(np.isfinite(pred), pred, np.inf))
  p_next = 0.0
  if ranking.size > 1:
    i, j = int(ranking[0]), int(ranking[1])
    p_next = prob_better(math.log(pred[i]), float(sd[i]), math.log(pred[j]), float(sd[j]))
  name = (f"{RECOMMENDED} ({recommended_candidate().name})" if predictor == RECOMMENDED
          else predictor)
  result = Forecast(predictor=name, source=str(curves.source), models=tuple(curves.models),
                    sizes=np.asarray(curves.sizes), target_data_num=float(target_data_num),
                    predicted=pred, sd_log=sd, lower=out.lower[:, 0], upper=out.upper[:, 0],
                    ranking=ranking, prob_next_better=float(p_next), largest_measured=largest,
                    fit_status=None if out.status is None else tuple(out.status))
  extra = None
  if curve_sizes:
    extra = SizePrediction(out.sizes[1:], out.predicted[:, 1:], out.sd_log[:, 1:],
                           out.lower[:, 1:], out.upper[:, 1:])
  return result, extra


def reranked(fc: Forecast, ranking) -> Forecast:
  """`fc` with another final ranking (the online procedure's: survivors first) and the
  probability that its second model beats its first recomputed."""
  ranking = np.asarray(ranking)
  p = 0.0
  if ranking.size > 1:
    i, j = int(ranking[0]), int(ranking[1])
    p = prob_better(math.log(fc.predicted[i]), float(fc.sd_log[i]), math.log(fc.predicted[j]),
                    float(fc.sd_log[j]))
  return dataclasses.replace(fc, ranking=ranking, prob_next_better=float(p))


def log_prediction_fn(predictor: str, meta: selection.Metadata, *, key: jax.Array | None = None,
                      pfn=None) -> Callable:
  """fn(views, step) -> (predicted L(D*) [V, M], sd of log L(D*) [V, M], fit statuses
  [V, M] or None for a predictor that fits no law) for the early-stopping procedure
  (`budgeted.early_stopping_selection(predict_views=)`)."""

  def predict_views(views, step):
    del step  # every predictor here is a function of the view alone
    outs = [predict_sizes(v, meta, [meta.target_data_num], predictor, key=key, pfn=pfn)
            for v in views]
    status = None if outs[0].status is None else np.stack([o.status for o in outs])
    return (np.stack([o.predicted[:, 0] for o in outs]),
            np.stack([o.sd_log[:, 0] for o in outs]), status)

  return predict_views
