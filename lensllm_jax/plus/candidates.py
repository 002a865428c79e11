r"""LensLLM+: the project's recommended predictor, chosen among candidates by the protocol.

Candidates (each predicts L(D*) of every model from a budget view only):

  PooledLensLLM  the pooled LensLLM fit (`selection.pooled`, `pooled.METHOD_NAME`)
                 with a setting of the leave-one-dataset-out grid
                 (`protocol.leave_one_out`) chosen on files it is not scored
                 on (nested, see Choice below);
  CurvePFN       the posterior mean of the prior-fitted network (`pfn/`),
                 each model on its own;
  Spectral       LensLLM with a decaying F(D) = F0 (w_0 + w_1 e^(-D / D_1))
                 (`dynamic_law.spectral_lensllm_law(1)`), independent fits;
  ContextPFN     the posterior mean of the context PFN (`pfn/`): each
                 model given its visible points, the other models' visible
                 curves and the model sizes;
  AtS            AtS itself (Lin et al. 2024);
  and blends     exp(w log L_AtS(D*) + (1 - w) log L_X(D*)) of AtS with each X
                 above, w in BLEND_WEIGHTS (w = 0 is X itself).

The bases X are the registry `BASE_PREDICTORS` (name -> function); adding a
predictor is one entry there (its blends with AtS follow).

Choice (`leave_one_out`): for each reported file i with training files T
(the other files, reported and training-only), the candidate with the best
mean `protocol.criterion` (mean PearCorr + mean RelAcc over the budget
ratios) over T is LensLLM+ on file i; ties go to the earlier candidate of
`all_candidates()`. The scores of file i are computed only after its choice
(for the report). The PooledLensLLM candidate's setting is nested, so that
PooledLensLLM is never scored on a file its setting was chosen on:

  on file i (reported)   the setting `protocol.leave_one_out` chose on T;
  on training file t     the setting chosen the same way on T \ {t}
                         (`protocol.Fold.nested`; with T = {t} alone, the
                         grid's first setting, the tie-break default).

The other candidates have no setting chosen on data.

Stability (`leave_one_out(..., leave_each_out=True)`, `PlusFold.without`):
for each training file t of a fold, the choice the same rule makes on
T \ {t} (the PooledLensLLM settings nested again: on s in T \ {t}, the setting
chosen on T \ {t, s}); and for every choice its runner-up and margin
(`ranked_choice`). Nothing here changes a choice; it says how much each one
depends on which training files are present.

Budgeted (`budgeted_candidate_selection`): the early-stopping rule of
`budgeted.py` with the candidate's own predictive mean and sd of log L(D*):

  CurvePFN       the PFN's predictive sd of log L(D*) (ContextPFN: its own);
  PooledLensLLM  the delta-method (Laplace) sd of the pooled fit's per-model
                 LensLLM parameters, squared-error form (`budgeted.laplace_log_sd`;
                 the prior is ignored, so it is conservative);
  Spectral       the Laplace sd of the dynamic-F law fit (squared error);
  blend w        (1 - w) sd_X: log L = w log L_AtS + (1 - w) log L_X with AtS's
                 line taken as exact (AtS has no predictive distribution), by the
                 delta method; where X has no finite prediction the blend falls
                 back to AtS and the sd is inf (that model is never stopped on it);
  AtS alone      sd 0 (no uncertainty: it stops every model but the best as soon
                 as every model has `min_points` points).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from lensllm_jax import laws, selection
from lensllm_jax.laws import dynamic_law
from lensllm_jax.plus import pfn, protocol
from lensllm_jax.selection import budgeted, pooled

__all__ = [
  "BASE_PREDICTORS",
  "BLEND_WEIGHTS",
  "BaseContext",
  "BasePrediction",
  "Candidate",
  "FilePredictions",
  "PLUS_NAME",
  "PLUS_READS",
  "PlusChoice",
  "PlusFold",
  "base_key",
  "blend",
  "budgeted_candidate_selection",
  "candidate_distribution",
  "all_candidates",
  "candidate_prediction",
  "choose_candidate",
  "file_predictions",
  "leave_one_out",
  "plus_results",
  "pooled_setting",
  "prediction_jobs",
  "ranked_choice",
  "score_table",
]

# The name of the project's recommended predictor: the candidate the leave-one-dataset-out
# protocol chooses (the pooled fit alone is `pooled.METHOD_NAME`, "PooledLensLLM").
PLUS_NAME = "LensLLM+"
# The visible points LensLLM+ is charged for (a `Method.reads` rule): its candidates' fits and
# PFNs read every visible point, D = 0 included.
PLUS_READS = "all"
BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75)
# The methods the papers propose (`Method.proposed`), predicted beside the candidates for the
# report; AtS first: the blends' partner (the others are fitted, `prediction_jobs`).
BASELINES = tuple(sorted(selection.PROPOSED_METHODS, key=lambda m: m != "AtS"))


@dataclasses.dataclass(frozen=True)
class BaseContext:
  """What a base predictor may use besides the views: PRNG key, PFN, fit options.

  pooled_config: the PooledLensLLM setting (only the PooledLensLLM base reads it).
  with_sd: also return the sd of log L(D*) (the budgeted procedure needs it).
  """
  key: jax.Array
  predictor: pfn.CurvePFNPredictor
  pooled_config: pooled.PooledConfig | None = None
  num_restarts: int = 8
  num_steps: int = 60
  num_points: int = 0
  with_sd: bool = False
  context_predictor: pfn.ContextPFNPredictor | None = None


@dataclasses.dataclass(frozen=True)
class BasePrediction:
  """A predictor's L(D*) on V budget views of M models, with its own uncertainty.

  The in-memory form of every prediction (`file_predictions`: job name ->
  BasePrediction); only experiments/lensllm_plus.py flattens it into the rows
  of predictions.csv and reads it back.

  Attributes:
    mean: [V, M] predicted L(D*) (the PFNs: the posterior mean).
    sd_log: [V, M] sd of log L(D*); None where not computed (`BaseContext.with_sd`).
    quantiles: level -> [V, M] quantile of L(D*), for the predictors that have
      their own (the PFNs: 0.1 and 0.9); empty otherwise.
    status: [V, M] fit status of each model (`SelectionResult.status`) for the
      law fits; None for the predictors that fit nothing.
  """
  mean: np.ndarray
  sd_log: np.ndarray | None = None
  quantiles: Mapping[float, np.ndarray] = dataclasses.field(default_factory=dict)
  status: np.ndarray | None = None


def _laplace_sd(law, results, views, meta) -> np.ndarray:
  """[V, M] Laplace sd of log L(D*) of per-model law fits on each view (one pool per view)."""
  m = views[0].mask.shape[0]
  raw = np.concatenate([r.predictor.raw_params for r in results])
  mask = np.concatenate([r.extras["mask"] for r in results])
  ylog = np.concatenate([np.log(np.where(v.mask, v.losses, 1.0)) for v in views])
  sd = budgeted.laplace_log_sd(law, raw, views[0].data_sizes, mask, ylog, meta.target_data_num,
                               pool=np.repeat(np.arange(len(views)), m))
  return sd.reshape(len(views), m)


def fit_statuses(results) -> np.ndarray:
  """[V, M] per-model fit statuses of law-fit SelectionResults (one per view)."""
  return np.array([list(r.status) for r in results], dtype=str)


def pooled_base(views, meta, ctx: BaseContext) -> BasePrediction:
  """PooledLensLLM: the pooled fit with ctx.pooled_config (sd: the Laplace sd, when
  ctx.with_sd)."""
  if ctx.pooled_config is None:
    raise ValueError("pooled_base: BaseContext.pooled_config is None")
  res = [r[0] for r in pooled.pooled_selection(views, meta, [ctx.pooled_config], key=ctx.key,
                                               num_restarts=ctx.num_restarts,
                                               num_steps=ctx.num_steps,
                                               num_points=ctx.num_points)]
  sd = _laplace_sd(laws.lensllm_law(), res, views, meta) if ctx.with_sd else None
  return BasePrediction(np.stack([r.predicted for r in res]), sd, status=fit_statuses(res))


def _pfn_outputs(results) -> BasePrediction:
  """A PFN's posterior mean E[L(D*)], sd of log L(D*) and quantiles of L(D*) (10% and 90%),
  [V, M] each, from its SelectionResults (one per view)."""
  summaries = [r.extras["predictive"] for r in results]
  return BasePrediction(
      np.stack([r.predicted for r in results]), np.stack([s.sd_log for s in summaries]),
      {q: np.exp(np.stack([s.quantiles_log[q] for s in summaries]))
       for q in summaries[0].quantiles_log})


def pfn_base(views, meta, ctx: BaseContext) -> BasePrediction:
  """CurvePFN: each model's posterior from its own visible points."""
  return _pfn_outputs([pfn.curve_pfn_selection(v, meta, predictor=ctx.predictor)
                       for v in views])


def context_pfn_base(views, meta, ctx: BaseContext) -> BasePrediction:
  """ContextPFN: each model's posterior given also the other models' visible curves and
  the sizes (`pfn/`; ctx.context_predictor, default the committed one)."""
  pred = ctx.context_predictor or pfn.default_context_predictor()
  return _pfn_outputs([pfn.context_pfn_selection(v, meta, predictor=pred) for v in views])


def spectral_base(views, meta, ctx: BaseContext) -> BasePrediction:
  """Dynamic-F LensLLM (`dynamic_law.spectral_lensllm_law(1)`), independent fits."""
  law = dynamic_law.spectral_lensllm_law(1)
  res = selection.fit_law_views("Spectral", law, views, meta, key=ctx.key, use_zero_shot=True,
                                num_restarts=ctx.num_restarts)
  sd = _laplace_sd(law, res, views, meta) if ctx.with_sd else None
  return BasePrediction(np.stack([r.predicted for r in res]), sd, status=fit_statuses(res))


# The candidate bases X: name -> fn(views, meta, BaseContext) -> BasePrediction ([V, M]
# predicted L(D*), its sd of log L(D*) when ctx.with_sd (the PFNs: always), quantiles).
BASE_PREDICTORS: dict[str, Callable] = {
  pooled.METHOD_NAME: pooled_base,
  "CurvePFN": pfn_base,
  "Spectral": spectral_base,
  "ContextPFN": context_pfn_base,
}


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


def all_candidates() -> list[Candidate]:
  """All candidates, in tie-break order: each base alone, then its AtS blends; AtS last."""
  return ([Candidate(b, w) for b in BASE_PREDICTORS for w in BLEND_WEIGHTS]
          + [Candidate("AtS", 1.0)])


def blend(ats_pred, other_pred, weight: float) -> np.ndarray:
  """exp(w log a + (1 - w) log b) [...]; where b is not finite, a is used."""
  a = np.asarray(ats_pred, np.float64)
  b = np.asarray(other_pred, np.float64)
  b = np.where(np.isfinite(b) & (b > 0), b, a)
  return np.exp(weight * np.log(a) + (1.0 - weight) * np.log(b))


def blend_sd(other_pred, other_sd, weight: float) -> np.ndarray:
  """(1 - w) sd_X of the blend's log L(D*) (AtS exact); inf where X's prediction is not finite."""
  b = np.asarray(other_pred, np.float64)
  sd = (1.0 - weight) * np.asarray(other_sd, np.float64)
  return np.where(np.isfinite(b) & (b > 0), sd, np.inf)


def pooled_key(config: pooled.PooledConfig) -> str:
  """Name of a PooledLensLLM setting's predictions in `file_predictions`."""
  return f"{pooled.METHOD_NAME}[{config.name}]"


def prediction_jobs(ctx: BaseContext, pooled_configs: Sequence[pooled.PooledConfig] = ()):
  """name -> fn(views, meta) -> BasePrediction: the baselines, every base, one PooledLensLLM
  per setting (named `pooled_key(setting)`).

  The baselines' predictions are their mean L(D*) and, for the law fits, their
  fit statuses; the PooledLensLLM base runs once per setting, each setting in
  its own call (its predictions do not depend on which other settings are asked).
  """
  def fitted(views, meta, m):
    res = selection.run_fitted_batch(m, views, meta, key=ctx.key, num_restarts=ctx.num_restarts)
    return BasePrediction(np.stack([r.predicted for r in res]), status=fit_statuses(res))

  jobs = {"AtS": lambda views, meta: BasePrediction(np.stack([selection.ats(v, meta).predicted
                                                              for v in views]))}
  for m in BASELINES[1:]:
    jobs[m] = lambda views, meta, m=m: fitted(views, meta, m)
  for base, fn in BASE_PREDICTORS.items():
    if base == pooled.METHOD_NAME:
      for c in dict.fromkeys(pooled_configs):
        jobs[pooled_key(c)] = lambda views, meta, c=c, fn=fn: fn(
            views, meta, dataclasses.replace(ctx, pooled_config=c))
    else:
      jobs[base] = lambda views, meta, fn=fn: fn(views, meta, ctx)
  return jobs


def file_predictions(curves, ratios: Sequence[int], *, ctx: BaseContext,
                     pooled_configs: Sequence[pooled.PooledConfig] = (),
                     target_data_num: float | None = None, only: Sequence[str] | None = None):
  """Predictions of L(D*) of every job of `prediction_jobs` on the budget views of one file.

  Args:
    curves: a CurveSet; views are `protocol.budget_views(curves, ratios, target_data_num)`.
    ratios: budget ratios D*/D_max.
    ctx: the base context (key of the file's fits, PFN, options).
    pooled_configs: the PooledLensLLM settings to run.
    only: job names to run (default all).

  Returns:
    (truth [M], preds): preds[job name] -> `BasePrediction` over the R ratios
    (mean [R, M]; the PFNs' sd and quantiles; the law fits' statuses), jobs
    "AtS", "RectifiedFit", "LensLLM", "PooledLensLLM[<setting name>]", "CurvePFN",
    "Spectral", "ContextPFN".
  """
  meta, truth, rv = protocol.budget_views(curves, ratios, target_data_num)
  views = [v for _, v in rv]
  jobs = prediction_jobs(ctx, pooled_configs)
  return truth, {name: job(views, meta) for name, job in jobs.items()
                 if only is None or name in only}


def candidate_prediction(cand: Candidate, preds: Mapping[str, BasePrediction],
                         pooled_config: pooled.PooledConfig | None) -> np.ndarray:
  """[R, M] predicted L(D*) of one candidate from the jobs' predictions (`file_predictions`)."""
  ats = preds["AtS"].mean
  if cand.base == "AtS":
    return ats
  return blend(ats, preds[base_key(cand, pooled_config)].mean, cand.ats_weight)


def base_key(cand: Candidate, pooled_config: pooled.PooledConfig | None) -> str:
  """The job of a candidate's base in `file_predictions`."""
  return pooled_key(pooled_config) if cand.base == pooled.METHOD_NAME else cand.base


def score_table(prediction, truth) -> dict[str, np.ndarray]:
  """metric -> [R] (PearCorr, RelAcc, Spearman, RMSE at D*) of predictions [R, M]."""
  rows = [protocol.score_results(r, truth) for r in plus_results(prediction)]
  return {k: np.array([r[k] for r in rows]) for k in protocol.METRICS}


def plus_results(prediction, method: str = PLUS_NAME) -> list[selection.SelectionResult]:
  """[R] SelectionResults (feature = predicted L(D*), non-finite last) of predictions [R, M]."""
  out = []
  for p in np.asarray(prediction, np.float64):
    feature = np.where(np.isfinite(p), p, np.inf)
    out.append(selection.SelectionResult(method, feature, selection.rank_by(feature),
                                         predicted=p))
  return out


def choose_candidate(train_tables: Sequence[Mapping[str, Mapping[str, np.ndarray]]],
                     candidates: Sequence[Candidate] | None = None) -> tuple[Candidate, float]:
  """The candidate with the best mean `protocol.criterion` over the training tables.

  train_tables: one dict candidate name -> score table per TRAINING file.
  """
  return protocol.choose(train_tables, all_candidates() if candidates is None else candidates)


@dataclasses.dataclass(frozen=True)
class PlusChoice:
  """A choice among candidates and how close it was.

  Attributes:
    trained_on: the files it was made on.
    candidate, criterion: the chosen candidate and its mean criterion there.
    runner_up, runner_up_criterion: the best other candidate (None, nan when
      there is only one candidate).
  """
  trained_on: tuple[str, ...]
  candidate: Candidate
  criterion: float
  runner_up: Candidate | None
  runner_up_criterion: float

  @property
  def margin(self) -> float:
    """criterion - runner_up_criterion (>= 0; nan without a runner-up)."""
    return self.criterion - self.runner_up_criterion


def ranked_choice(train_tables: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
                  candidates: Sequence[Candidate]) -> PlusChoice:
  """`choose_candidate` on training file name -> table, with the runner-up.

  The runner-up is the best of the other candidates by the same mean criterion
  (ties to the earlier candidate, as for the choice).
  """
  best, val = choose_candidate(list(train_tables.values()), candidates)
  others = [c for c in candidates if c != best]
  second, second_val = (choose_candidate(list(train_tables.values()), others) if others
                        else (None, float("nan")))
  return PlusChoice(tuple(train_tables), best, val, second, second_val)


@dataclasses.dataclass(frozen=True)
class PlusFold:
  """One leave-one-dataset-out fold of LensLLM+.

  Attributes:
    held_out, trained_on: the reported file and the files the choices were made on.
    pooled: the fold of `protocol.leave_one_out` (the PooledLensLLM candidate's
      settings: `config` on the held-out file, `nested[t]` on training file t).
    candidate: the chosen candidate; train_criterion its mean criterion there.
    tables: file name -> candidate name -> score table (`score_table`) with
      the PooledLensLLM setting of that file (`pooled_setting(pooled, name)`), for
      every file (the held-out file's table is computed after the choice, for
      the report).
    choice: the choice with its runner-up (`ranked_choice` on the training
      files; its candidate and criterion are `candidate`, `train_criterion`).
    without: training file t -> the choice made on the other training files
      (PooledLensLLM nested again within them); empty unless asked for
      (`leave_one_out(leave_each_out=True)`) or with one training file.
  """
  held_out: str
  trained_on: tuple[str, ...]
  pooled: protocol.Fold
  candidate: Candidate
  train_criterion: float
  tables: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]
  choice: PlusChoice | None = None
  without: Mapping[str, PlusChoice] = dataclasses.field(default_factory=dict)


def pooled_setting(fold: protocol.Fold, name: str) -> pooled.PooledConfig:
  """PooledLensLLM setting of a `protocol.Fold` on file `name`: its config on the held-out
  file, the nested one (chosen without `name`) on a training file."""
  if name == fold.held_out:
    return fold.config
  if name not in fold.nested:
    raise KeyError(f"fold {fold.held_out}: {name!r} is neither held out nor a training file "
                   f"{list(fold.nested)}")
  return fold.nested[name][0]


@dataclasses.dataclass(frozen=True)
class FilePredictions:
  """Every job's predictions on one file of `leave_one_out`.

  Attributes:
    truth: [M] true L(D*) (read only to score).
    predictions: job name -> `BasePrediction` over the file's R ratios
      (`file_predictions`).
    ratios: [R] budget ratios (a training-only file: `protocol.training_ratios`).
    reported: whether the file is reported (else training-only).
  """
  truth: np.ndarray
  predictions: Mapping[str, BasePrediction]
  ratios: tuple[int, ...]
  reported: bool


def leave_one_out(curve_sets, *, key: jax.Array, train_only: Sequence = (),
                  options: protocol.ProtocolOptions = protocol.DEFAULT_OPTIONS,
                  predictor: pfn.CurvePFNPredictor | None = None,
                  grid_evaluate: Callable | None = None, predict: Callable | None = None,
                  candidates: Sequence[Candidate] | None = None, leave_each_out: bool = False):
  """LensLLM+ of each reported file, chosen on the other files only.

  Args:
    curve_sets: the reported CurveSets; train_only: training-only CurveSets
      (scored on `protocol.training_ratios` of their own D*).
    key: PRNG key; file j (reported, then training-only) uses fold_in(key, j)
      for the pooled grid and for its predictions (the PooledLensLLM candidate
      is the grid's cell); each file is predicted with the PooledLensLLM settings
      scored on it (`pooled_setting` of every fold).
    options: the ratios, D* and fit settings of the grid and of the
      predictions (a training-only file: `options.for_training_file`).
    grid_evaluate: `evaluate` of `protocol.leave_one_out` (a caching evaluator
      in the binary).
    predict: optional replacement of `file_predictions` with its signature
      (the binary caches predictions); called once per file.
    candidates: the candidate set (default `all_candidates()`).
    leave_each_out: also make each fold's choice without each of its training
      files in turn (`PlusFold.without`, folds with >= 2 training files); the
      PooledLensLLM settings this nests are predicted in the same `predict` call.

  Returns:
    (folds, files): one PlusFold per reported file, and file name ->
    `FilePredictions`.
  """
  sets, extra = list(curve_sets), list(train_only)
  cands = all_candidates() if candidates is None else list(candidates)
  predictor = pfn.default_curve_predictor() if predictor is None else predictor
  predict = file_predictions if predict is None else predict
  grid = protocol.default_grid()
  pooled_folds, grid_tables = protocol.leave_one_out(sets, grid, key=key, options=options,
                                                     evaluate=grid_evaluate, train_only=extra)
  # fold -> left-out training file t -> s -> the PooledLensLLM setting on s chosen on
  # T \ {t, s}.
  reduced = {pf.held_out: {t: {s: cfg for s, (cfg, _) in protocol.nested_choices(
    {s: grid_tables[s] for s in pf.trained_on if s != t}, grid).items()} for t in pf.trained_on}
    for pf in pooled_folds if leave_each_out and len(pf.trained_on) >= 2}
  files = {}
  for j, c in enumerate(sets + extra):
    reported = j < len(sets)
    opts = options if reported else options.for_training_file(c)
    ctx = BaseContext(key=jax.random.fold_in(key, j), predictor=predictor,
                      num_restarts=opts.num_restarts, num_steps=opts.num_steps)
    # The PooledLensLLM settings scored on this file: its own fold's, and the nested
    # setting of every fold it trains (then those of the folds without one file).
    configs = list(dict.fromkeys(
      [pooled_setting(pf, c.name) for pf in pooled_folds
       if c.name == pf.held_out or c.name in pf.nested]
      + [cfg for by_t in reduced.values() for per in by_t.values()
         for s, cfg in per.items() if s == c.name]))
    truth, preds = predict(c, opts.ratios, ctx=ctx, pooled_configs=configs,
                           target_data_num=opts.target_data_num)
    files[c.name] = FilePredictions(truth, preds, opts.ratios, reported)
  names = list(files)

  def table(name, setting):
    f = files[name]
    return {cand.name: score_table(candidate_prediction(cand, f.predictions, setting), f.truth)
            for cand in cands}

  folds = []
  for pf in pooled_folds:
    train = [n for n in names if n != pf.held_out]
    tables = {n: table(n, pooled_setting(pf, n)) for n in train}
    choice = ranked_choice(tables, cands)
    without = {t: ranked_choice({s: table(s, cfg) for s, cfg in per.items()}, cands)
               for t, per in reduced.get(pf.held_out, {}).items()}
    # After the choice: report only.
    tables[pf.held_out] = table(pf.held_out, pooled_setting(pf, pf.held_out))
    folds.append(PlusFold(pf.held_out, tuple(train), pf, choice.candidate, choice.criterion,
                          tables, choice, without))
  return folds, files


def candidate_distribution(cand: Candidate, views, meta, ctx: BaseContext):
  """A candidate's prediction of L(D*) with its own uncertainty (module docstring, Budgeted).

  Returns:
    `BasePrediction`: mean [V, M], sd_log [V, M], and the quantiles of L(D*)
    where the base has its own (the PFNs: 0.1, 0.9; blended like the mean, NaN
    where X has no finite prediction; AtS alone: its line at every level); the
    base's fit statuses (None where it fits nothing).
  """
  ats = np.stack([selection.ats(v, meta).predicted for v in views])
  if cand.base == "AtS":
    return BasePrediction(ats, np.zeros_like(ats), {0.1: ats, 0.9: ats})
  out = BASE_PREDICTORS[cand.base](views, meta, dataclasses.replace(ctx, with_sd=True))
  x, w = out.mean, cand.ats_weight
  ok = np.isfinite(x) & (x > 0)
  quantiles = {q: np.where(ok, blend(ats, v, w), np.nan) for q, v in out.quantiles.items()}
  return BasePrediction(blend(ats, x, w), blend_sd(x, out.sd_log, w), quantiles,
                        status=out.status)


def budgeted_candidate_selection(curves, levels: Sequence[float], cand: Candidate, *,
                                 ctx: BaseContext, max_data_num: float, min_points: int = 4,
                                 target_data_num: float | None = None, progress=None):
  """`budgeted.early_stopping_selection` with a candidate's own mean and sd of log L(D*).

  The sd of each candidate is the rule of the module docstring (PFN's
  predictive sd; Laplace sd of a fitted law; (1 - w) sd_X for a blend; 0 for
  AtS alone). ctx.pooled_config is the PooledLensLLM setting (PooledLensLLM candidates).
  Step s reveals D_s for every active model; model m stops when log L_m -
  z sd_m > min_j (log L_j + z sd_j) once every model has `min_points` points.
  """
  grid = np.asarray(curves.data_sizes, np.float64)
  target = float(grid.max()) if target_data_num is None else float(target_data_num)
  meta = selection.metadata_of(curves, target)
  ctx = dataclasses.replace(ctx, num_points=grid.size)

  def predict_views(views, step):
    dist = candidate_distribution(
        cand, views, meta, dataclasses.replace(ctx, key=jax.random.fold_in(ctx.key, step)))
    return dist.mean, dist.sd_log, dist.status

  return budgeted.early_stopping_selection(
    curves, levels, predict_views=predict_views, name=cand.name,
    max_data_num=max_data_num, target_data_num=target, min_points=min_points,
    progress=progress)

