"""The PFNs as selection methods: rank the models by the posterior mean of L(D*)."""

from __future__ import annotations

import numpy as np

from lensllm_jax import selection
from lensllm_jax.plus.pfn.bars import PredictiveSummary
from lensllm_jax.plus.pfn.checkpoint import default_context_predictor, default_curve_predictor
from lensllm_jax.plus.pfn.predictor import ContextPFNPredictor, CurvePFNPredictor

CURVE_PFN_NAME = "CurvePFN"


def curve_pfn_selection(visible, metadata, *, predictor: CurvePFNPredictor | None = None):
  """CurvePFN selection: rank by the PFN's posterior mean of L(D*), each model on its own.

  Args:
    visible: `selection.VisibleCurves`; metadata: `selection.Metadata`.
    predictor: default `default_curve_predictor()`.

  Returns:
    SelectionResult "CurvePFN": predicted = feature = E[L(D*)] [M]; extras
    "predictive": the `PredictiveSummary` [M] of log L(D*) (mean, sd, 10% and
    90% quantiles).
  """
  pred = default_curve_predictor() if predictor is None else predictor
  log_l = np.log(np.where(visible.mask, visible.losses, 1.0))
  out = pred.predict(visible.data_sizes, log_l, visible.mask, [metadata.target_data_num],
                     quantiles=(0.1, 0.9))
  return selection_result(CURVE_PFN_NAME, out)


def selection_result(name: str, summaries: PredictiveSummary) -> selection.SelectionResult:
  """A SelectionResult ranking by the posterior mean of L(D*) from predictive summaries
  [M, 1] at D* (extras "predictive": their [M] column)."""
  at_target = summaries.column(0)
  mean = at_target.mean
  return selection.SelectionResult(
    name, mean, selection.rank_by(mean), predicted=mean, status=tuple("ok" for _ in mean),
    extras={"predictive": at_target})


CONTEXT_PFN_NAME = "ContextPFN"


def context_pfn_selection(visible, metadata, *, predictor: ContextPFNPredictor | None = None):
  """ContextPFN selection: rank by the posterior mean of L(D*) of each model given
  its visible points, the other models' visible curves and the model sizes.

  Returns:
    SelectionResult "ContextPFN": predicted = feature = E[L(D*)] [M]; extras
    "predictive" as `curve_pfn_selection`.
  """
  pred = default_context_predictor() if predictor is None else predictor
  log_l = np.log(np.where(visible.mask, visible.losses, 1.0))
  sizes = np.asarray(metadata.sizes, np.float64)
  if np.any(sizes <= 0):
    raise ValueError(f"ContextPFN: {metadata.name}: model sizes must be > 0, got {sizes}")
  out = pred.predict(visible.data_sizes, log_l, visible.mask, np.log10(sizes),
                     [metadata.target_data_num], quantiles=(0.1, 0.9))
  return selection_result(CONTEXT_PFN_NAME, out)
