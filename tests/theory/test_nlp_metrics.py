"""NLPMetrics: power-law MLE, KS choice of xmin, spectral densities of weights."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lensllm_jax.theory import nlp_metrics as nm


def _pareto(rng, alpha, xmin, n):
  # Inverse CDF of p(x) = (alpha - 1) / xmin (x / xmin)^-alpha, x >= xmin.
  return xmin * rng.uniform(size=n) ** (-1.0 / (alpha - 1.0))


def test_mle_closed_form_tiny_sample():
  x = np.array([1.0, np.e, np.e**2, 0.5])  # 0.5 is below xmin and ignored
  # alpha = 1 + 3 / (log 1 + log e + log e^2) = 1 + 3 / 3 = 2.
  assert nm.power_law_alpha(x, 1.0) == pytest.approx(2.0, abs=1e-12)
  fit = nm.fit_power_law(x, xmin=1.0)
  assert fit.n_tail == 3 and fit.alpha == pytest.approx(2.0)
  # KS distance of the three points against P(x) = 1 - 1/x, by hand.
  cdf = 1 - 1 / np.array([1.0, np.e, np.e**2])
  d = max(np.max(np.array([1, 2, 3]) / 3 - cdf), np.max(cdf - np.array([0, 1, 2]) / 3))
  assert fit.ks_distance == pytest.approx(d, abs=1e-12)


@pytest.mark.parametrize("alpha", [1.8, 2.5, 4.0])
def test_pareto_alpha_recovered(alpha):
  rng = np.random.default_rng(int(alpha * 10))
  n = 4000
  x = _pareto(rng, alpha, 1.0, n)
  sigma = (alpha - 1) / np.sqrt(n)  # asymptotic s.d. of the MLE (CSN eq. 3.2)
  assert abs(nm.power_law_alpha(x, 1.0) - alpha) < 4 * sigma
  fit = nm.fit_power_law(x, min_tail=50)
  assert abs(fit.alpha - alpha) < 0.15 * (alpha - 1)
  assert 1.0 <= fit.xmin < 2.0


def test_xmin_found_above_a_non_power_law_body():
  rng = np.random.default_rng(1)
  body = rng.uniform(0.05, 2.0, size=3000)
  tail = _pareto(rng, 3.0, 2.0, 3000)
  fit = nm.fit_power_law(np.concatenate([body, tail]), min_tail=50)
  assert 1.7 < fit.xmin < 2.8
  assert abs(fit.alpha - 3.0) < 0.25


def test_xmin_choice_matches_brute_force_with_scipy_ks():
  rng = np.random.default_rng(2)
  x = rng.lognormal(mean=0.0, sigma=1.2, size=80)
  min_tail = 8
  xs = np.sort(x)
  best = None
  for xmin in xs[: xs.size - min_tail + 1]:
    tail = xs[xs >= xmin]
    alpha = 1 + tail.size / np.sum(np.log(tail / xmin))
    d = stats.kstest(tail, lambda t, a=alpha, m=xmin: 1 - (t / m) ** (1 - a)).statistic
    if best is None or d < best[0] - 1e-15:
      best = (d, xmin, alpha, tail.size)
  fit = nm.fit_power_law(x, min_tail=min_tail)
  assert fit.xmin == best[1] and fit.n_tail == best[3]
  assert fit.ks_distance == pytest.approx(best[0], abs=1e-12)
  assert fit.alpha == pytest.approx(best[2], rel=1e-12)


def test_esd_is_squared_singular_values_over_n():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(30, 70))
  sv = np.linalg.svd(w, compute_uv=False)
  expected = np.sort(sv**2 / 70)
  np.testing.assert_allclose(nm.empirical_spectral_density(w), expected, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(nm.empirical_spectral_density(w.T), expected, rtol=1e-10,
                             atol=1e-12)


def test_nlp_metrics_heavy_tailed_layer_has_smaller_alpha():
  rng = np.random.default_rng(4)
  gaussian = rng.normal(size=(256, 128))  # Marchenko-Pastur bulk: light tail, large alpha
  heavy = rng.standard_t(df=2.0, size=(256, 128))  # heavy-tailed entries -> heavy-tailed ESD
  params = {
      "h_0": {"attn": {"kernel": gaussian, "bias": np.zeros(128)}},
      "h_1": {"mlp": {"kernel": heavy}},
      "h_2": {"kernel": rng.normal(size=(8, 40))},  # too small: skipped
      "wte": {"embedding": rng.normal(size=(300, 64))},
  }
  result = nm.nlp_metrics(params, min_tail=10)
  assert set(result.alphas) == {"h_0/attn/kernel", "h_1/mlp/kernel"}
  assert "h_2/kernel" in result.skipped
  assert result.alphas["h_1/mlp/kernel"] < 4.0 < result.alphas["h_0/attn/kernel"]
  assert result.mean_alpha == pytest.approx(np.mean(list(result.alphas.values())))
  lam_max = nm.empirical_spectral_density(heavy)[-1]
  assert result.weighted_alphas["h_1/mlp/kernel"] == pytest.approx(
      result.alphas["h_1/mlp/kernel"] * np.log10(lam_max))
  with_emb = nm.nlp_metrics(params, min_tail=10, include_embeddings=True)
  assert "wte/embedding" in with_emb.alphas


def test_bad_inputs_are_rejected():
  with pytest.raises(ValueError, match="NaN"):
    nm.fit_power_law(np.array([1.0, np.nan, 2.0]))
  with pytest.raises(ValueError, match="min_tail"):
    nm.fit_power_law(np.arange(1.0, 6.0), min_tail=10)
  with pytest.raises(ValueError, match="2-D"):
    nm.empirical_spectral_density(np.zeros(3))
  with pytest.raises(ValueError, match="no 2-D"):
    nm.nlp_metrics({"b": np.zeros(4)})
