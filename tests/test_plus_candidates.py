"""Tests of the protocol-chosen LensLLM+ candidates (lensllm_jax/plus_candidates.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lensllm_jax import benchmarks, budgeted, plus_candidates

GRID = np.array([0.0] + [200.0 * 2 ** k for k in range(8)])


def test_blend_is_a_weighted_geometric_mean():
  a, b = np.array([2.0, 3.0, 4.0]), np.array([1.0, np.nan, 16.0])
  got = plus_candidates.blend(a, b, 0.25)
  np.testing.assert_allclose(got, [2.0 ** 0.25, 3.0, 4.0 ** 0.25 * 16.0 ** 0.75])
  np.testing.assert_allclose(plus_candidates.blend(a, b, 1.0), a)
  names = [c.name for c in plus_candidates.candidate_names()]
  assert names[0] == "Pooled" and names[-1] == "AtS" and len(set(names)) == len(names)
  assert "0.5AtS+CurvePFN" in names and "0.75AtS+Spectral" in names


def test_choice_reads_only_the_training_tables():
  cands = plus_candidates.candidate_names()

  def table(good):
    return {c.name: {"PearCorr": np.array([0.9 if c.name == good else 0.1]),
                     "RelAcc": np.array([1.0 if c.name == good else 0.5])} for c in cands}

  # Training files favour CurvePFN; the held-out file (never passed) would favour AtS.
  best, val = plus_candidates.choose_candidate([table("CurvePFN"), table("CurvePFN")], cands)
  assert best.name == "CurvePFN" and val == pytest.approx(1.9)
  best, _ = plus_candidates.choose_candidate([table("CurvePFN"), table("Spectral"),
                                              table("Spectral")], cands)
  assert best.name == "Spectral"


class _KnownPredictor:
  """Predicts L(D*) = the last visible loss / 2 with a fixed sd of log L(D*)."""

  def __init__(self, sd):
    self.sd = sd

  def predict(self, data_sizes, log_loss, mask, query_sizes):
    del data_sizes, query_sizes
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    y = log_loss[np.arange(mask.shape[0]), last]
    return {"mean": np.exp(y)[:, None] / 2, "sd_log": np.full((mask.shape[0], 1), self.sd)}


def test_budgeted_selection_uses_the_predictors_own_sd():
  # Three models with flat, well separated losses; sizes 1, 2, 4.
  losses = np.array([[3.0] * GRID.size, [2.0] * GRID.size, [1.0] * GRID.size])
  curves = benchmarks.CurveSet(name="toy", source="toy", models=("a", "b", "c"),
                               sizes=np.array([1, 2, 4]), families=("f",) * 3,
                               data_sizes=GRID, losses=losses)
  tight, wide = plus_candidates.budgeted_pfn_selection(
    curves, [1.0], predictor=_KnownPredictor(0.01), max_data_num=GRID[-1], min_points=2)[0], \
    plus_candidates.budgeted_pfn_selection(curves, [1.0], predictor=_KnownPredictor(10.0),
                                           max_data_num=GRID[-1], min_points=2)[0]
  # Tight sd: after 2 fine-tuning points (200, 400) only the best model goes on; it is
  # the last one left, so the procedure ends there: 6 N D summed over the pairs paid.
  np.testing.assert_array_equal(tight.stopped_at, [400.0, 400.0, 400.0])
  assert tight.flops == pytest.approx(6 * (1 + 2 + 4) * (200 + 400))
  assert tight.selection.chosen == 2
  # Huge sd: nobody is ever stopped, every model pays the whole grid.
  np.testing.assert_array_equal(wide.stopped_at, [GRID[-1]] * 3)
  assert wide.flops == pytest.approx(6 * 7 * GRID.sum())
  with pytest.raises(ValueError, match="exactly one"):
    budgeted.early_stopping_selection(curves, [1.0], None, name="x", max_data_num=GRID[-1],
                                      target_data_num=GRID[-1])
