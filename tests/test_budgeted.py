"""Cost accounting and the budgeted early-stopping procedure."""

import dataclasses

import jax
import numpy as np
import pytest
from _selection_synthetic import FAST, synthetic_curves

from lensllm_jax import budgeted, laws, selection


def test_costs_by_hand():
  sizes = np.array([1e8, 3e8])
  grid = np.array([0, 200, 400, 800, 1600])
  # AtS at D_max = 800 reads D = 200, 400, 800 of both models.
  assert budgeted.method_flops("AtS", sizes, grid, 800) == pytest.approx(6 * 4e8 * 1400)
  assert budgeted.method_flops("RectifiedFit", sizes, grid, 800) == pytest.approx(6 * 4e8 * 1400)
  assert budgeted.method_flops("SubTuning", sizes, grid, 800) == pytest.approx(6 * 4e8 * 800)
  assert budgeted.method_flops("ZeroShot", sizes, grid, 800) == 0.0
  assert budgeted.method_flops("ModelSize", sizes, grid, 800) == 0.0
  assert budgeted.full_tuning_flops(sizes, 1600) == pytest.approx(6 * 4e8 * 1600)


def test_oracle_charges_once_and_hides_unpaid():
  curves, _ = synthetic_curves()
  oracle = budgeted.CurveOracle(curves)
  assert oracle.flops == 0.0 and oracle.revealed[:, 0].all()  # zero-shot is free
  oracle.reveal([0, 2], 200)
  oracle.reveal([0], 200)  # already paid
  assert oracle.flops == pytest.approx(6 * 200 * (curves.sizes[0] + curves.sizes[2]))
  view = oracle.view(400)
  assert view.mask[:, 1].tolist() == [True, False, True, False, False, False, False]
  assert np.isnan(view.losses[1, 1]) and np.isnan(view.losses[:, 2]).all()
  with pytest.raises(KeyError, match="not on the grid"):
    oracle.reveal([0], 300)


def _rectified_numpy(theta, d):
  b, dl, beta, e = theta
  return np.log(b / (dl + np.maximum(d, 1e-10) ** beta) + e)


def test_laplace_sd_matches_finite_difference_delta_method():
  """Delta method is parametrisation invariant: compare with numpy finite differences."""
  curves, p = synthetic_curves(noise=0.02, seed=7)
  law = laws.rectified_law()
  d = curves.data_sizes[:9]
  y = np.log(curves.losses[:, :9])
  mask = np.ones(y.shape, bool)
  theta = np.stack([p["B"], p["D_l"], p["beta"], p["E"]], 1)
  raw = law.unconstrain(dict(B=p["B"], D_l=p["D_l"], beta=p["beta"], E=p["E"]))
  sd = budgeted.laplace_log_sd(law, raw, d, mask, y, 409600)
  # Reference with constrained parameters and central differences.
  res = np.stack([_rectified_numpy(t, d) for t in theta]) - y
  s2 = (res ** 2).sum() / (mask.sum() - 4 * len(theta))
  for i, t in enumerate(theta):
    h = 1e-6 * np.maximum(np.abs(t), 1e-3)
    jac = np.stack([(_rectified_numpy(t + h[j] * np.eye(4)[j], d) -
                     _rectified_numpy(t - h[j] * np.eye(4)[j], d)) / (2 * h[j])
                    for j in range(4)], 1)
    g = np.array([(_rectified_numpy(t + h[j] * np.eye(4)[j], np.array([409600.0])) -
                   _rectified_numpy(t - h[j] * np.eye(4)[j], np.array([409600.0])))[0] / (2 * h[j])
                  for j in range(4)])
    ref = np.sqrt(s2 * g @ np.linalg.solve(jac.T @ jac, g))
    assert sd[i] == pytest.approx(ref, rel=1e-3)


def test_budgeted_is_blind_to_unpaid_points_and_saves_compute():
  curves, p = synthetic_curves(noise=0.005, seed=11)
  key = jax.random.key(3)
  kw = dict(key=key, max_data_num=12800, min_curves=28, target_data_num=409600, **FAST)
  never = budgeted.budgeted_selection(curves, (1e9,), **kw)[0]
  cheap = budgeted.budgeted_selection(curves, (1.0,), **kw)[0]
  full_read = budgeted.method_flops("LensLLM", curves.sizes, curves.data_sizes, 12800)
  # z = 1e9 never stops anyone: it pays exactly what the fixed-budget fit reads.
  assert never.flops == pytest.approx(full_read)
  assert never.selection.extras["active"].all()
  assert cheap.flops < full_read
  # Flops equal the sum of 6 N D over the revealed pairs.
  pf = budgeted.pair_flops(curves.sizes, curves.data_sizes)
  assert cheap.flops == pytest.approx(pf[cheap.revealed].sum())
  # Poison everything the cheap run never paid for: nothing changes.
  losses = curves.losses.copy()
  losses[~cheap.revealed] = 123.0
  again = budgeted.budgeted_selection(dataclasses.replace(curves, losses=losses), (1.0,), **kw)[0]
  np.testing.assert_array_equal(again.revealed, cheap.revealed)
  np.testing.assert_array_equal(again.selection.ranking, cheap.selection.ranking)
  np.testing.assert_array_equal(again.selection.feature, cheap.selection.feature)
  # The never-stopping run predicts like the fixed-budget LensLLM fit at D_max
  # (same batch position and key as its last step -> the same fit).
  meta = selection.metadata_of(curves, 409600)
  fixed = selection.run_fitted_batch("LensLLM", [selection.visible_view(curves, 12800)], meta,
                                     key=jax.random.fold_in(key, 6), min_curves=28, **FAST)[0]
  assert never.selection.chosen == fixed.chosen
  np.testing.assert_allclose(never.selection.predicted, fixed.predicted, rtol=1e-9)
