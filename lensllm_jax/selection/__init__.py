"""Model selection on fine-tuning curves: the methods, metrics, published tables, compute and budget.

Modules:

  core       LLM selection methods on fine-tuning curves (docs/selection.md).
  metrics    Selection metrics of Lin et al. (2024) / Zeng et al. (2025) (docs/selection.md).
  published  Published selection results of Lin et al. (ICML 2024), Tables 1 and 2.
  pooled     Pooled (hierarchical) LensLLM curve-mode fits: all models of a task at once.
  methods    The registry of selection methods: every method by its published name.
  budgeted   Compute cost accounting and budgeted selection with early stopping.

Every public name of these modules is re-exported here
(`from lensllm_jax.selection import NAME`):

  core: TARGET_DATA_NUM, BUDGETS, VisibleCurves, Metadata, visible_view, metadata_of, LawPredictor,
    PowerLinePredictor, Predictor, SelectionResult, rank_by, zero_shot, last_visible_loss,
    sub_tuning, model_size, ats, fit_law_views, vanilla_fit, rectified_fit, lensllm,
    FITTED_LAWS, run_fitted_batch
  metrics: MIN_MODELS, SCORES, CONSTANT_TOLERANCE, constant_to_rounding, undefined_reason,
    pearson_corr, average_ranks, spearman_corr, kendall_tau, relative_accuracy, curve_rmse,
    selection_scores
  published: RATIOS, CITATION, published_value, published_table
  pooled: BACKTEST_STRENGTHS, COVARIATES, DEFAULT_CONFIG, METHOD_NAME, POOLABLE, PooledConfig,
    PooledFit, covariate_matrix, empirical_bayes_strength, fit_pooled, lensllm_plus,
    median_beta_start, paule_mandel_tau2, pooled_objective, pooled_selection, pre_power_weights,
    shape_quantities, view_covariates
  methods: DETERMINISTIC_METHODS, FITTED_METHODS, METHODS, METHOD_READS, Method, run_method
  budgeted: FLOPS_PER_PARAM_SAMPLE, BUDGET_METHODS, pair_flops, full_tuning_flops, method_flops,
    CurveOracle, laplace_log_sd, BudgetedResult, still_active, prefix_uniforms,
    early_stopping_selection, budgeted_selection

Names defined by several modules are re-exported from the first listed above: TARGET_DATA_NUM.
"""

from lensllm_jax.selection import budgeted, core, methods, metrics, pooled, published
from lensllm_jax.selection.budgeted import (
  BUDGET_METHODS,
  FLOPS_PER_PARAM_SAMPLE,
  BudgetedResult,
  CurveOracle,
  budgeted_selection,
  early_stopping_selection,
  full_tuning_flops,
  laplace_log_sd,
  method_flops,
  pair_flops,
  prefix_uniforms,
  still_active,
)
from lensllm_jax.selection.core import (
  BUDGETS,
  FITTED_LAWS,
  TARGET_DATA_NUM,
  LawPredictor,
  Metadata,
  PowerLinePredictor,
  Predictor,
  SelectionResult,
  VisibleCurves,
  ats,
  fit_law_views,
  last_visible_loss,
  lensllm,
  metadata_of,
  model_size,
  rank_by,
  rectified_fit,
  run_fitted_batch,
  sub_tuning,
  vanilla_fit,
  visible_view,
  zero_shot,
)
from lensllm_jax.selection.methods import (
  DETERMINISTIC_METHODS,
  FITTED_METHODS,
  METHOD_READS,
  METHODS,
  Method,
  run_method,
)
from lensllm_jax.selection.metrics import (
  CONSTANT_TOLERANCE,
  MIN_MODELS,
  SCORES,
  average_ranks,
  constant_to_rounding,
  curve_rmse,
  kendall_tau,
  pearson_corr,
  relative_accuracy,
  selection_scores,
  spearman_corr,
  undefined_reason,
)
from lensllm_jax.selection.pooled import (
  BACKTEST_STRENGTHS,
  COVARIATES,
  DEFAULT_CONFIG,
  METHOD_NAME,
  POOLABLE,
  PooledConfig,
  PooledFit,
  covariate_matrix,
  empirical_bayes_strength,
  fit_pooled,
  lensllm_plus,
  median_beta_start,
  paule_mandel_tau2,
  pooled_objective,
  pooled_selection,
  pre_power_weights,
  shape_quantities,
  view_covariates,
)
from lensllm_jax.selection.published import (
  CITATION,
  RATIOS,
  published_table,
  published_value,
)

__all__ = [
  "core",
  "metrics",
  "published",
  "pooled",
  "methods",
  "budgeted",
  "TARGET_DATA_NUM",
  "BUDGETS",
  "VisibleCurves",
  "Metadata",
  "visible_view",
  "metadata_of",
  "LawPredictor",
  "PowerLinePredictor",
  "Predictor",
  "SelectionResult",
  "rank_by",
  "zero_shot",
  "last_visible_loss",
  "sub_tuning",
  "model_size",
  "ats",
  "fit_law_views",
  "vanilla_fit",
  "rectified_fit",
  "lensllm",
  "FITTED_LAWS",
  "run_fitted_batch",
  "MIN_MODELS",
  "SCORES",
  "CONSTANT_TOLERANCE",
  "constant_to_rounding",
  "undefined_reason",
  "pearson_corr",
  "average_ranks",
  "spearman_corr",
  "kendall_tau",
  "relative_accuracy",
  "curve_rmse",
  "selection_scores",
  "RATIOS",
  "CITATION",
  "published_value",
  "published_table",
  "BACKTEST_STRENGTHS",
  "COVARIATES",
  "DEFAULT_CONFIG",
  "METHOD_NAME",
  "POOLABLE",
  "PooledConfig",
  "PooledFit",
  "covariate_matrix",
  "empirical_bayes_strength",
  "fit_pooled",
  "lensllm_plus",
  "median_beta_start",
  "paule_mandel_tau2",
  "pooled_objective",
  "pooled_selection",
  "pre_power_weights",
  "shape_quantities",
  "view_covariates",
  "DETERMINISTIC_METHODS",
  "FITTED_METHODS",
  "METHODS",
  "METHOD_READS",
  "Method",
  "run_method",
  "FLOPS_PER_PARAM_SAMPLE",
  "BUDGET_METHODS",
  "pair_flops",
  "full_tuning_flops",
  "method_flops",
  "CurveOracle",
  "laplace_log_sd",
  "BudgetedResult",
  "still_active",
  "prefix_uniforms",
  "early_stopping_selection",
  "budgeted_selection",
]
