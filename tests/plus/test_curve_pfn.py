"""Tests of the curve PFN (lensllm_jax/plus/pfn/)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lensllm_jax import laws, selection
from lensllm_jax.laws import fitting
from lensllm_jax.plus import pfn

D_STAR = 1_638_400.0
GRID = pfn.PUBLIC_GRID


def test_prior_is_reproducible_and_within_its_support():
  a, clean_a, fam_a = pfn.sample_prior_curves(np.random.default_rng(3), 500)
  b, _, fam_b = pfn.sample_prior_curves(np.random.default_rng(3), 500)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(fam_a, fam_b)
  assert a.shape == (500, GRID.size) and np.all(np.isfinite(a))
  pos = clean_a[:, 1:]
  assert np.all(pos.max(1) - pos.min(1) <= pfn.PriorConfig().max_log_range)
  # every family is drawn, in roughly the configured proportions
  freq = np.bincount(fam_a, minlength=len(pfn.FAMILIES)) / 500
  np.testing.assert_allclose(freq, pfn.PriorConfig().family_weights, atol=0.08)


def test_bar_distribution_matches_dense_integration():
  bars = pfn.BarDistribution(z_min=-2.0, z_max=1.0, num_bins=30)
  logits = np.random.default_rng(0).normal(size=(4, 30)) * 2.0
  # Dense reference: the piecewise-constant density on a fine grid.
  z = np.linspace(-2.0, 1.0, 300001)[:-1] + 0.5e-5
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  dens = p[:, np.minimum(((z + 2.0) / 0.1).astype(int), 29)] / 0.1      # [4, Z]
  dz = 1e-5
  np.testing.assert_allclose(bars.mean(logits), (dens * z).sum(-1) * dz, atol=1e-6)
  np.testing.assert_allclose(bars.mean_exp(logits), (dens * np.exp(z)).sum(-1) * dz, rtol=1e-5)
  sd_ref = np.sqrt((dens * z * z).sum(-1) * dz - ((dens * z).sum(-1) * dz) ** 2)
  np.testing.assert_allclose(bars.std(logits), sd_ref, rtol=1e-4)
  cdf = np.cumsum(dens, -1) * dz
  for q in (0.1, 0.5, 0.9):
    ref = z[np.argmax(cdf >= q, axis=-1)]
    np.testing.assert_allclose(bars.quantile(logits, q), ref, atol=2e-5)
  # NLL = -log density; z outside the support is clipped into the end bins.
  nll = np.asarray(bars.nll(logits, np.array([-1.95, 0.0, 0.95, 5.0])))
  idx = np.array([0, 20, 29, 29])
  np.testing.assert_allclose(nll, -np.log(p[np.arange(4), idx] / 0.1), rtol=1e-5)


def _rmse_vs_truth(predictor, rng, num_curves, k, families=None, with_gap=True):
  """(PFN posterior-mean error, last-point error, y, noisy y) of log L(D*) with k
  visible positive points."""
  y, clean, _ = pfn.sample_prior_curves(rng, num_curves, families=families,
                                              with_gap=with_gap)
  mask = np.zeros_like(y, bool)
  mask[:, :k + 1] = True
  out = predictor.predict(GRID, y, mask, [D_STAR], quantiles=(0.1, 0.9))
  return out, y, clean


@pytest.fixture(scope="module")
def tiny_predictor():
  from configs import curve_pfn as cfg_mod
  from experiments.train_curve_pfn import configs_of
  cfg = cfg_mod.get_config("tiny")
  model, train = configs_of(cfg)
  pred, rows = pfn.train(model, train)
  return pred, rows, train


def test_tiny_retrained_pfn_beats_last_visible_point(tiny_predictor, tmp_path):
  pred, rows, train = tiny_predictor
  assert rows[-1]["nll"] < rows[0]["nll"]
  rng = np.random.default_rng(123)
  errs, base = [], []
  for k in (3, 6, 9):
    out, y, clean = _rmse_vs_truth(pred, rng, 300, k)
    errs.append(out.mean_log[:, 0] - clean[:, -1])
    base.append(y[:, k] - clean[:, -1])        # the last visible point as the prediction
  rmse, rmse_base = np.sqrt(np.mean(np.square(errs))), np.sqrt(np.mean(np.square(base)))
  assert rmse < 0.8 * rmse_base, (rmse, rmse_base)
  # save / load round trip gives the same predictive distribution
  pfn.save_predictor(pred, tmp_path, train_config=train)
  again = pfn.load_predictor(tmp_path)
  mask = np.ones((2, 6), bool)
  a = pred.logits(GRID[:6], y[:2, :6], mask, [D_STAR])[0]
  b = again.logits(GRID[:6], y[:2, :6], mask, [D_STAR])[0]
  np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def committed():
  return pfn.default_curve_predictor()


def test_committed_pfn_beats_least_squares_of_the_true_law(committed):
  """Curves of the LensLLM law (prior noise, no zero-shot gap): with the zero-shot
  point and 5 fine-tuning points (D <= 3200, ratio 512), the PFN's posterior mean
  of log L(D*) has a lower RMSE than a least-squares fit of the true law.

  The same fit call (one compilation) checks that the prior's lensllm family IS
  the law: on the noise-free curves the fit reaches zero residual."""
  rng = np.random.default_rng(7)
  k, n = 5, 96
  out, y, clean = _rmse_vs_truth(committed, rng, n, k, families=("lensllm",), with_gap=False)
  assert np.all(clean[:, 0] <= 1e-12)          # L(0) = B / (F + 1e-10^beta) + E <= 1
  assert np.all(np.diff(clean, axis=1) <= 1e-12)  # the law decreases in D
  mask = np.zeros_like(y, bool)
  mask[:, :k + 1] = True
  law = laws.lensllm_law()
  fit = fitting.fit_curves(law, GRID, np.concatenate([y, clean]),
                           np.concatenate([mask, np.ones_like(mask)]), key=jax.random.key(0),
                           num_restarts=8)
  assert np.max(fit.objective[n:]) < 1e-10
  lsq = np.log(law.predict(fit.raw_params[:n], np.array([D_STAR])))[:, 0]
  err_pfn = out.mean_log[:, 0] - clean[:, -1]
  err_lsq = np.where(np.isfinite(lsq), lsq, y[:, k]) - clean[:, -1]
  rmse_pfn, rmse_lsq = np.sqrt(np.mean(err_pfn ** 2)), np.sqrt(np.mean(err_lsq ** 2))
  assert rmse_pfn < 0.8 * rmse_lsq, (rmse_pfn, rmse_lsq)


def test_committed_pfn_intervals_are_calibrated_on_the_prior(committed):
  """The central 80% predictive interval of log L(D*) covers the (noisy) truth for
  70-90% of prior curves, over budgets of 1-12 visible fine-tuning points."""
  rng = np.random.default_rng(11)
  cover = []
  for k in (1, 3, 5, 8, 12):
    out, y, _ = _rmse_vs_truth(committed, rng, 400, k)
    low, high = out.quantiles_log[0.1][:, 0], out.quantiles_log[0.9][:, 0]
    cover.append((low <= y[:, -1]) & (y[:, -1] <= high))
  rate = float(np.mean(cover))
  assert 0.70 <= rate <= 0.90, rate


def test_curve_pfn_selection_reads_only_the_budget_view(committed):
  rng = np.random.default_rng(5)
  y, _, _ = pfn.sample_prior_curves(rng, 4)
  from lensllm_jax.curves import benchmarks
  curves = benchmarks.CurveSet(name="synthetic", source="synthetic", models=("a", "b", "c", "d"),
                               data_sizes=GRID, losses=np.exp(y),
                               sizes=np.array([1, 2, 3, 4]), families=("f",) * 4)
  meta = selection.metadata_of(curves, D_STAR)
  view = selection.visible_view(curves, 3200.0)
  res = pfn.curve_pfn_selection(view, meta, predictor=committed)
  direct = committed.predict(GRID[:6], y[:, :6], np.ones((4, 6), bool), [D_STAR])
  np.testing.assert_allclose(res.predicted, direct.mean[:, 0])
  assert list(res.ranking) == list(np.argsort(res.predicted, kind="stable"))
  with pytest.raises(ValueError, match="no visible D > 0"):
    committed.predict(GRID[:2], y[:, :2], np.array([[True, False]] * 4), [D_STAR])
