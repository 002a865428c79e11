"""LensLLM+: candidate predictors (pooled fits, curve PFNs, AtS blends) chosen by leave-one-dataset-out.

Modules:

  protocol     Leave-one-dataset-out choice of the LensLLM+ settings (hyper-parameters).
  curve_pfn    A prior-fitted network (PFN) for fine-tuning curves: Bayesian extrapolation of log L(D).
  context_pfn  A context PFN: Bayesian extrapolation of one curve given the other candidates' curves.
  candidates   LensLLM+: the project's recommended predictor, chosen among candidates by the protocol.
  forecast     Which model to fine-tune: predicted L(D*) with an 80 % interval for every model.

Every public name of these modules is re-exported here
(`from lensllm_jax.plus import NAME`):

  protocol: DEFAULT_RATIOS, Fold, choose, criterion, default_grid, evaluate_grid, leave_one_out,
    nested_choices, score_results
  curve_pfn: FAMILIES, PUBLIC_GRID, BarDistribution, CurvePFN, CurvePFNPredictor, ModelConfig,
    PriorConfig, TrainConfig, curve_pfn_selection, load_predictor, make_batch,
    sample_prior_curves, save_predictor, train
  context_pfn: ContextModelConfig, ContextPFN, ContextPFNPredictor, HierarchyConfig, context_pfn_selection,
    default_predictor, make_file_batch, sample_prior_files
  candidates: PLUS_NAME, BASE_PREDICTORS, BLEND_WEIGHTS, BaseContext, Candidate, PlusChoice, PlusFold, blend,
    budgeted_candidate_selection, candidate_distribution, all_candidates, candidate_prediction,
    choose_candidate, file_predictions, plus_results, pooled_setting, prediction_jobs,
    ranked_choice, score_table
  forecast: CHOICE_FILE, SelectionInputError, INTERVAL_Z, RECOMMENDED, Forecast, choice_record,
    min_points, predict_sizes, predictor_names, recommended_candidate, reranked

Names defined by several modules are re-exported from the first listed above: leave_one_out, train.
"""

from lensllm_jax.plus import candidates, context_pfn, curve_pfn, forecast, protocol
from lensllm_jax.plus.candidates import (
  BASE_PREDICTORS,
  BLEND_WEIGHTS,
  PLUS_NAME,
  BaseContext,
  Candidate,
  PlusChoice,
  PlusFold,
  all_candidates,
  blend,
  budgeted_candidate_selection,
  candidate_distribution,
  candidate_prediction,
  choose_candidate,
  file_predictions,
  plus_results,
  pooled_setting,
  prediction_jobs,
  ranked_choice,
  score_table,
)
from lensllm_jax.plus.context_pfn import (
  ContextModelConfig,
  ContextPFN,
  ContextPFNPredictor,
  HierarchyConfig,
  context_pfn_selection,
  default_predictor,
  make_file_batch,
  sample_prior_files,
)
from lensllm_jax.plus.curve_pfn import (
  FAMILIES,
  PUBLIC_GRID,
  BarDistribution,
  CurvePFN,
  CurvePFNPredictor,
  ModelConfig,
  PriorConfig,
  TrainConfig,
  curve_pfn_selection,
  load_predictor,
  make_batch,
  sample_prior_curves,
  save_predictor,
  train,
)
from lensllm_jax.plus.forecast import (
  CHOICE_FILE,
  INTERVAL_Z,
  RECOMMENDED,
  Forecast,
  SelectionInputError,
  choice_record,
  min_points,
  predict_sizes,
  predictor_names,
  recommended_candidate,
  reranked,
)
from lensllm_jax.plus.protocol import (
  DEFAULT_RATIOS,
  Fold,
  choose,
  criterion,
  default_grid,
  evaluate_grid,
  leave_one_out,
  nested_choices,
  score_results,
)

__all__ = [
  "protocol",
  "curve_pfn",
  "context_pfn",
  "candidates",
  "forecast",
  "DEFAULT_RATIOS",
  "Fold",
  "choose",
  "criterion",
  "default_grid",
  "evaluate_grid",
  "leave_one_out",
  "nested_choices",
  "score_results",
  "FAMILIES",
  "PUBLIC_GRID",
  "BarDistribution",
  "CurvePFN",
  "CurvePFNPredictor",
  "ModelConfig",
  "PriorConfig",
  "TrainConfig",
  "curve_pfn_selection",
  "load_predictor",
  "make_batch",
  "sample_prior_curves",
  "save_predictor",
  "train",
  "ContextModelConfig",
  "ContextPFN",
  "ContextPFNPredictor",
  "HierarchyConfig",
  "context_pfn_selection",
  "default_predictor",
  "make_file_batch",
  "sample_prior_files",
  "PLUS_NAME",
  "BASE_PREDICTORS",
  "BLEND_WEIGHTS",
  "BaseContext",
  "Candidate",
  "PlusChoice",
  "PlusFold",
  "blend",
  "budgeted_candidate_selection",
  "candidate_distribution",
  "all_candidates",
  "candidate_prediction",
  "choose_candidate",
  "file_predictions",
  "plus_results",
  "pooled_setting",
  "prediction_jobs",
  "ranked_choice",
  "score_table",
  "CHOICE_FILE",
  "SelectionInputError",
  "INTERVAL_Z",
  "RECOMMENDED",
  "Forecast",
  "choice_record",
  "min_points",
  "predict_sizes",
  "predictor_names",
  "recommended_candidate",
  "reranked",
]
