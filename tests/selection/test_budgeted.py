"""Cost accounting and the budgeted early-stopping procedure."""

import dataclasses

import jax
import numpy as np
import pytest
import scipy.stats

from helpers.synthetic_curves import FAST, synthetic_curves
from lensllm_jax import errors, laws, selection
from lensllm_jax.laws import fitting
from lensllm_jax.selection import budgeted


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
  kw = dict(key=key, target_data_num=409600, **FAST)
  never = budgeted.budgeted_selection(
      curves, budgeted.BudgetOptions((1e9,), max_data_num=12800), **kw)[0]
  cheap = budgeted.budgeted_selection(
      curves, budgeted.BudgetOptions((1.0,), max_data_num=12800), **kw)[0]
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
  again = budgeted.budgeted_selection(dataclasses.replace(curves, losses=losses),
                                      budgeted.BudgetOptions((1.0,), max_data_num=12800), **kw)[0]
  np.testing.assert_array_equal(again.revealed, cheap.revealed)
  np.testing.assert_array_equal(again.selection.ranking, cheap.selection.ranking)
  np.testing.assert_array_equal(again.selection.feature, cheap.selection.feature)
  # The never-stopping run predicts like the fixed-budget LensLLM fit at D_max
  # (other restart draws, the same optimum; the budgeted fits' batch of 32: one compilation).
  # Two converged fits from other starts agree only to the precision of the stopping
  # rule along the valley's flat direction: L(D*) differs by up to 3.3e-9 relative here.
  meta = selection.metadata_of(curves, 409600)
  fixed = selection.run_fitted_batch("LensLLM", [selection.visible_view(curves, 12800)], meta,
                                     key=jax.random.fold_in(key, 6), min_curves=32, **FAST)[0]
  assert never.selection.chosen == fixed.chosen
  np.testing.assert_allclose(never.selection.predicted, fixed.predicted, rtol=1e-8)


def _naive_budgeted(curves, z, *, key, max_data_num, target, method, num_restarts, fit_options):
  """Reference: one level alone, every model's view refitted at every step (no cache).

  Restart draws keyed by (model, number of revealed D > 0 points) as in
  `budgeted_selection`; the stopping rule written out again.
  """
  meta = selection.metadata_of(curves, target)
  grid = curves.data_sizes
  m = len(curves.models)
  revealed = np.broadcast_to(grid == 0, (m, grid.size)).copy()
  active = np.ones(m, bool)
  stopped_at, flops, history, last = np.zeros(m), 0.0, [], None
  steps = grid[(grid > 0) & (grid <= max_data_num)]
  for s, d_s in enumerate(steps):
    flops += 6.0 * d_s * curves.sizes[active].astype(float).sum()
    revealed[active, grid == d_s] = True
    stopped_at[active] = d_s
    if s + 1 < 4 and s + 1 < steps.size:  # before the first decision (K = 4): not fitted
      history.append((d_s, active.copy(), np.full(m, np.nan), np.full(m, np.nan)))
      continue
    num = revealed[:, grid > 0].sum(1)
    view = selection.visible_view(curves, d_s, np.where(grid <= d_s, revealed, False))
    u = np.stack([budgeted.prefix_uniforms(key, j, num[j], num_restarts) for j in range(m)])
    fit = selection.run_fitted_batch(method, [view], meta, key=jax.random.key(99),
                                     num_restarts=num_restarts, fit_options=fit_options,
                                     min_curves=32, uniforms=u)[0]
    law = fit.predictor.law
    ylog = np.log(np.where(view.mask, view.losses, 1.0))
    sd = budgeted.laplace_log_sd(law, fit.predictor.raw_params, view.data_sizes,
                                 fit.extras["mask"], ylog, target)
    logp = np.log(np.where(np.isfinite(fit.predicted), fit.predicted, np.inf))
    if last is not None:
      logp, sd = np.where(active, logp, last[0]), np.where(active, sd, last[1])
    last = (logp, sd)
    history.append((d_s, active.copy(), logp, sd))
    if s + 1 >= 4:
      best = np.min(np.where(active, logp + z * sd, np.inf))
      active = active & (logp - z * sd <= best)
    if active.sum() <= 1:
      break
  return active, last[0], flops, revealed, stopped_at, history


def test_cached_prefix_fits_equal_refitting_every_view():
  """The fast procedure (each (model, prefix) fitted once, all levels in one call per step)
  gives exactly what refitting every level's every model at every step gives."""
  curves, _ = synthetic_curves(num_models=9, noise=0.01, seed=5)
  key = jax.random.key(8)
  levels = (0.3, 1.0, 3.0, 1e9)
  kw = dict(max_data_num=12800, method="LensLLM", **FAST)
  fast = budgeted.budgeted_selection(
      curves, budgeted.BudgetOptions(levels, method="LensLLM", max_data_num=12800), key=key,
      target_data_num=409600, **FAST)
  stops = set()
  for z, res in zip(levels, fast, strict=True):
    active, logp, flops, revealed, stopped_at, history = _naive_budgeted(
        curves, z, key=key, target=409600, **kw)
    np.testing.assert_array_equal(res.selection.extras["active"], active)
    np.testing.assert_array_equal(res.selection.feature, np.exp(logp))
    assert res.selection.ranking.tolist() == np.lexsort((logp, ~active)).tolist()
    assert res.flops == pytest.approx(flops, rel=1e-12)
    np.testing.assert_array_equal(res.revealed, revealed)
    np.testing.assert_array_equal(res.stopped_at, stopped_at)
    assert len(res.history) == len(history)
    for h, (d_s, act, lp, sd) in zip(res.history, history, strict=True):
      assert h["data_size"] == d_s
      np.testing.assert_array_equal(h["active"], act)
      np.testing.assert_array_equal(h["log_pred"], lp)
      np.testing.assert_array_equal(h["sd"], sd)
    stops.add(tuple(stopped_at))
  # The levels differ (some stop early, z = 1e9 never), so the cache is shared non-trivially.
  assert len(stops) >= 3


# ------------------------------------------------ calibration of the sd ---
# Synthetic curves of each budget method's own law with known Gaussian noise on
# log L: the stated 80 % interval log L_pred(D*) +- z_0.9 sd must cover the true
# log L(D*) 70-90 % of the time. 300 curves per law (binomial sd of the coverage
# 0.02 at 0.8, so the band is +-5 sd), s^2 pooled in runs of 10 curves as in
# the budgeted procedure, D* 8x beyond the largest point.
_COVERAGE_CURVES = 400
_COVERAGE_GRID = np.concatenate([[0.0], 200.0 * 2.0 ** np.arange(11)])  # 0, 200 .. 204800
_COVERAGE_TARGET = 1638400.0


def _truth_params(method, rng, n):
  if method == "VanillaFit":
    return dict(alpha=rng.uniform(0.5, 1.5, n), B=rng.uniform(5, 50, n),
                beta=rng.uniform(0.2, 0.5, n), E=rng.uniform(0.5, 2, n))
  scale = "D_l" if method == "RectifiedFit" else "F"
  return {"B": rng.uniform(2, 20, n), scale: rng.uniform(0.5, 5, n),
          "beta": rng.uniform(0.2, 0.45, n), "E": rng.uniform(0.5, 2, n)}


@pytest.mark.parametrize("method", ["VanillaFit", "RectifiedFit"])
def test_stated_interval_covers_truth(method):
  """LensLLM (curve mode) is RectifiedFit's law reparametrised: checked on the same fits."""
  rng = np.random.default_rng(0)
  law_factory, zero = selection.FITTED_LAWS[method]
  law = law_factory()
  truth_params = _truth_params(method, rng, _COVERAGE_CURVES)
  raw_true = law.unconstrain(truth_params)
  d = _COVERAGE_GRID
  mask = np.broadcast_to(d > 0 if not zero else d >= 0, (_COVERAGE_CURVES, d.size))
  with np.errstate(divide="ignore"):
    clean = np.log(law.predict(raw_true, np.where(mask[0], d, 1.0)))
  y = np.where(mask, clean + 0.01 * rng.standard_normal(clean.shape), 0.0)
  truth = np.log(law.predict(raw_true, np.array([_COVERAGE_TARGET])))[:, 0]
  # The near-L1 Huber objective converges slowly: more restarts and steps.
  huber = law.loss == "huber"
  fit = fitting.fit_curves(law, d, y, mask, key=jax.random.key(0), num_restarts=4 if huber else 2,
                           options=fitting.FitOptions(max_steps=1000 if huber else 200))
  pool = np.arange(_COVERAGE_CURVES) // 10
  sd = budgeted.laplace_log_sd(law, fit.raw_params, d, mask, y, _COVERAGE_TARGET, pool=pool)
  pred = np.log(law.predict(fit.raw_params, np.array([_COVERAGE_TARGET])))[:, 0]
  covered = np.abs(pred - truth) <= scipy.stats.norm.ppf(0.9) * sd
  assert 0.70 <= covered.mean() <= 0.90, (method, covered.mean())
  if method == "RectifiedFit":
    lens = laws.lensllm_law()
    raw_lens = lens.unconstrain({"B": fit.params["B"], "F": fit.params["D_l"],
                                 "beta": fit.params["beta"], "E": fit.params["E"]})
    sd_lens = budgeted.laplace_log_sd(lens, raw_lens, d, mask, y, _COVERAGE_TARGET, pool=pool)
    np.testing.assert_allclose(sd_lens, sd, rtol=1e-6)


def test_huber_sandwich_limits():
  """delta >> noise: the sandwich is the squared-error sd; delta << noise: sqrt(pi / 2) of it."""
  curves, p = synthetic_curves(noise=0.02, seed=7)
  d = curves.data_sizes[1:10]
  y = np.log(curves.losses[:, 1:10])
  mask = np.ones(y.shape, bool)
  rng = np.random.default_rng(0)
  raw = laws.vanilla_law().unconstrain(dict(alpha=np.ones(7), B=p["B"], beta=p["beta"],
                                            E=p["E"])) + 0.01 * rng.standard_normal((7, 4))
  squared = dataclasses.replace(laws.vanilla_law(), loss="squared")
  sd_sq = budgeted.laplace_log_sd(squared, raw, d, mask, y, 409600)
  wide = budgeted.laplace_log_sd(laws.vanilla_law(huber_delta=10.0), raw, d, mask, y, 409600)
  np.testing.assert_allclose(wide, sd_sq, rtol=1e-12)
  # Every residual beyond a tiny delta: E[psi^2] = delta^2 (n / (n - K)), E[psi'] ~ 2 delta phi(0) / s.
  resid = np.log(laws.vanilla_law().predict(raw, d)) - y
  tiny = 1e-3 * np.abs(resid).min()
  narrow = budgeted.laplace_log_sd(laws.vanilla_law(huber_delta=tiny), raw, d, mask, y, 409600)
  dof = mask.sum() - 4 * 7
  np.testing.assert_allclose(narrow, sd_sq * np.sqrt(np.pi / 2 * mask.sum() / dof), rtol=1e-5)


def test_unsupported_budget_method_is_refused(tmp_path):
  with pytest.raises(ValueError, match="LensLLM\\+.*budget methods: VanillaFit, RectifiedFit, LensLLM"):
    budgeted.BudgetOptions((1.0,), method="LensLLM+")
  with pytest.raises(ValueError, match="levels is empty"):
    budgeted.BudgetOptions(())
  from configs import selection as selection_config
  from experiments import reproduce_selection
  cfg = selection_config.get_config()
  cfg.budget.method = "LensLLM+"
  with pytest.raises(errors.ConfigError, match="budget\\.method.*VanillaFit"):
    reproduce_selection.run(cfg, tmp_path)
  assert not list(tmp_path.iterdir())  # refused before anything is read or written
