"""Metrics against scipy.stats and hand-computed values."""

import numpy as np
import pytest
import scipy.stats

from lensllm_jax.selection import metrics


def test_pearson_spearman_kendall_match_scipy():
  rng = np.random.default_rng(0)
  for _ in range(5):
    f = rng.standard_normal(30)
    y = 0.5 * f + rng.standard_normal(30)
    f[3] = f[7]  # ties
    assert metrics.pearson_corr(f, y) == pytest.approx(scipy.stats.pearsonr(f, y)[0], abs=1e-12)
    assert metrics.spearman_corr(f, y) == pytest.approx(scipy.stats.spearmanr(f, y)[0],
                                                        abs=1e-12)
    assert metrics.kendall_tau(f, y) == pytest.approx(scipy.stats.kendalltau(f, y)[0], abs=1e-12)


def test_pearson_hand_value_and_no_reorientation():
  # f = [1, 2, 3], y = [1, 3, 2]: cov = 1, var_f = var_y = 2 (sums) -> r = 0.5.
  assert metrics.pearson_corr([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
  assert metrics.pearson_corr([3, 2, 1], [1, 3, 2]) == pytest.approx(-0.5)
  assert np.isnan(metrics.pearson_corr([1, 1, 1], [1, 2, 3]))


def test_relative_accuracy_hand_values():
  y = np.array([2.0, 1.0, 3.0, 1.5])
  assert metrics.relative_accuracy(1, y) == 1.0  # best
  assert metrics.relative_accuracy(2, y) == 0.0  # worst
  assert metrics.relative_accuracy(3, y) == pytest.approx(0.75)  # (3 - 1.5) / (3 - 1)
  with pytest.raises(ValueError, match="chosen=4"):
    metrics.relative_accuracy(4, y)


def test_curve_rmse():
  pred = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  obs = np.array([[1.0, 2.5, 2.0], [0.0, 3.0, 4.0]])
  mask = np.array([[False, True, True], [False, False, False]])
  per_model, pooled = metrics.curve_rmse(pred, obs, mask)
  assert per_model[0] == pytest.approx(np.sqrt((0.25 + 1.0) / 2))
  assert np.isnan(per_model[1])
  assert pooled == pytest.approx(np.sqrt((0.25 + 1.0) / 2))
  per_model, pooled = metrics.curve_rmse(pred, obs)
  assert per_model[1] == pytest.approx(np.sqrt(25 / 3))
  assert pooled == pytest.approx(np.sqrt((0.25 + 1.0 + 9 + 16) / 6))
