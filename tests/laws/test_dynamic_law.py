"""Tests of the NTK-dynamics LensLLM laws (lensllm_jax/laws/dynamic_law.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax import laws
from lensllm_jax.laws import dynamic_law, fitting

GRID = np.array([0.0] + [200.0 * 2 ** k for k in range(14)])


def _numpy_spectral(p, d, k):
  """L(D) = B / (F0 (w0 + sum_k w_k e^(-D / D_k)) + D^beta) + E, written directly."""
  v = np.array([0.0] + [p[f"v{i}"] for i in range(1, k + 1)])
  w = np.exp(v) / np.exp(v).sum()
  decay = sum(w[i] * np.exp(-d / p[f"D{i}"]) for i in range(1, k + 1))
  f = p["F0"] * (w[0] + decay)
  return p["B"] / (f + np.maximum(d, 1e-10) ** p["beta"]) + p["E"]


def test_spectral_law_matches_the_formula_and_reduces_to_constant_f():
  law = dynamic_law.spectral_lensllm_law(2)
  p = {"B": 300.0, "beta": 0.45, "E": 0.8, "F0": 150.0, "v1": 0.3, "v2": -0.5,
       "D1": 500.0, "D2": 4e4}
  raw = law.unconstrain(p)
  np.testing.assert_allclose(law.constrain(raw)["D2"], 4e4, rtol=1e-12)
  got = law.predict(raw, GRID)
  np.testing.assert_allclose(got, _numpy_spectral(p, GRID, 2), rtol=1e-12)
  # F decays with D: the loss is above the constant-F LensLLM law with F = F0.
  const = laws.lensllm_law().predict({"B": 300.0, "beta": 0.45, "E": 0.8, "F": 150.0}, GRID)
  assert np.all(got[1:] >= const[1:])
  np.testing.assert_allclose(got[0], const[0], rtol=1e-12)
  # Time constants far beyond the grid: F(D) = F0 on the grid, i.e. constant-F LensLLM.
  frozen = law.predict(law.unconstrain({**p, "D1": 1e30, "D2": 1e30}), GRID)
  np.testing.assert_allclose(frozen, const, rtol=1e-12)


def test_spectral_fit_recovers_a_decaying_f():
  law = dynamic_law.spectral_lensllm_law(1)
  truth = {"B": 2e3, "beta": 0.6, "E": 0.5, "F0": 1e3, "v1": 1.0, "D1": 3000.0}
  y = np.log(law.predict(law.unconstrain(truth), GRID))[None]
  fit = fitting.fit_curves(law, GRID, y, key=jax.random.key(0), num_restarts=8)
  got = law.constrain(fit.raw_params[0])
  for name in ("beta", "E", "D1"):
    np.testing.assert_allclose(got[name], truth[name], rtol=1e-4)
  assert fit.objective[0] < 1e-12


def test_study_steps_follow_the_study_schedule():
  d = np.array([0.0, 200, 400, 800, 1600, 25600, 1e6])
  # ceil(D / 16) clipped to [40, 1600]; D = 0 takes no step.
  np.testing.assert_array_equal(np.asarray(dynamic_law.study_steps(d)),
                                [0, 40, 40, 50, 100, 1600, 1600])


def test_ntk_dynamic_law_matches_the_direct_formula():
  rng = np.random.default_rng(0)
  eig = np.exp(rng.uniform(-3, 2, 6))
  proj = rng.normal(size=6)
  eta = 1e-3
  law = dynamic_law.ntk_dynamic_law()
  p = {"B": 5.0, "beta": 0.4, "E": 1.1, "tau": 0.7}
  aux = (eig, proj, np.float64(eta))
  got = law.predict(p, GRID, aux=aux)
  t = 0.7 * np.where(GRID > 0, np.clip(np.ceil(GRID / 16), 40, 1600), 0.0)
  f = (np.exp(-2 * eta * eig[None, :] * t[:, None]) * proj ** 2).sum(1)
  ref = 5.0 / (f + np.maximum(GRID, 1e-10) ** 0.4) + 1.1
  np.testing.assert_allclose(got, ref, rtol=1e-12)
  # F(t(D)) decays with D, and the gradient in tau is finite (fittable).
  with jax.enable_x64(True):
    g = jax.grad(lambda r: jnp.sum(law.log_loss(r, jnp.asarray(GRID), aux)))(
      jnp.asarray(law.unconstrain(p)))
  assert np.all(np.isfinite(np.asarray(g))) and float(g[3]) != 0.0
