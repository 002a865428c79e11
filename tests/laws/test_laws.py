"""Tests of lensllm_jax.laws against hand-evaluated closed forms."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lensllm_jax import laws
from lensllm_jax.laws import fitting


def _log_loss(law, params, d, aux=None):
  with jax.enable_x64(True):
    raw = jnp.asarray(law.unconstrain(params))
    return np.asarray(law.log_loss(raw, jnp.asarray(d, jnp.float64), aux))


def test_rectified_closed_form():
  law = laws.rectified_law()
  p = {"B": 2.0, "D_l": 100.0, "beta": 0.5, "E": 1.5}
  d = [0.0, 400.0, 10000.0]
  # By hand: 400^0.5 = 20 -> 2/120 + 1.5; 10000^0.5 = 100 -> 2/200 + 1.5;
  # D = 0 is evaluated at 1e-10 (published), 1e-10^0.5 = 1e-5.
  want = [2 / (100 + 1e-5) + 1.5, 2 / 120 + 1.5, 1.51]
  np.testing.assert_allclose(np.exp(_log_loss(law, p, d)), want, rtol=1e-13)
  np.testing.assert_allclose(law.predict(p, d), want, rtol=1e-13)
  assert law.param_names == ("B", "D_l", "beta", "E")


def test_lensllm_curve_mode_closed_form():
  law = laws.lensllm_law()
  p = {"B": 3.0, "beta": 0.5, "E": 1.0, "F": 2.0}
  # 16^0.5 = 4: 3 / 6 + 1 = 1.5; 64^0.5 = 8: 3 / 10 + 1 = 1.3.
  np.testing.assert_allclose(law.predict(p, [16.0, 64.0]), [1.5, 1.3], rtol=1e-13)
  assert law.param_names == ("B", "beta", "E", "F")


def test_lensllm_ntk_mode_closed_form():
  def f_term(t, aux):
    return jnp.sum(jnp.exp(-2.0 * aux["eta"] * aux["lam"] * t) * aux["proj"] ** 2)

  law = laws.lensllm_law(f_term)
  assert law.param_names == ("B", "beta", "E", "t")
  aux = {"lam": np.array([1.0, 0.5]), "proj": np.array([1.0, 2.0]), "eta": np.array(0.1)}
  p = {"B": 3.0, "beta": 0.5, "E": 1.0, "t": 5.0}
  # F(5) = exp(-2*0.1*1*5) * 1 + exp(-2*0.1*0.5*5) * 4 = e^-1 + 4 e^-0.5.
  f = math.exp(-1.0) + 4.0 * math.exp(-0.5)
  want = [3.0 / (f + 2.0) + 1.0, 3.0 / (f + 10.0) + 1.0]
  np.testing.assert_allclose(np.exp(_log_loss(law, p, [4.0, 100.0], aux)), want, rtol=1e-13)
  np.testing.assert_allclose(law.predict(p, [4.0, 100.0], aux=aux), want, rtol=1e-13)
  # F = 0 (f_term returning 0) stays finite thanks to D^beta > 0.
  law0 = laws.lensllm_law(lambda t, aux: 0.0 * t)
  np.testing.assert_allclose(np.exp(_log_loss(law0, p, [4.0], None)), [3.0 / 2.0 + 1.0])


def test_vanilla_closed_form_and_zero():
  law = laws.vanilla_law()
  p = {"alpha": 2.0, "B": 3.0, "beta": 0.5, "E": 0.25}
  # (3/4 + 0.25)^2 = 1; (3/10 + 0.25)^2 = 0.3025.
  np.testing.assert_allclose(law.predict(p, [16.0, 100.0]), [1.0, 0.3025], rtol=1e-13)
  out = _log_loss(law, p, [0.0, 16.0])
  assert out[0] == np.inf and abs(out[1]) < 1e-13
  np.testing.assert_array_equal(law.valid_data_size(jnp.array([0.0, 200.0])), [False, True])
  np.testing.assert_array_equal(laws.rectified_law().valid_data_size(jnp.array([0.0])), [True])


@pytest.mark.parametrize("name", ["vanilla", "rectified", "lensllm"])
def test_constraint_mapping(name):
  law = laws.get_law(name)
  rng = np.random.default_rng(0)
  raw = rng.normal(scale=5.0, size=(50, law.num_params))
  params = law.constrain(raw)
  assert set(params) == set(law.param_names)
  for v in params.values():
    assert np.all(v > 0) and np.all(np.isfinite(v))
  np.testing.assert_allclose(law.unconstrain(params), raw, rtol=1e-9, atol=1e-9)
  # constrain gives the same on jax arrays.
  with jax.enable_x64(True):
    pj = law.constrain(jnp.asarray(raw))
  for k in params:
    np.testing.assert_allclose(np.asarray(pj[k]), params[k], rtol=1e-14)


def test_inverse_softplus():
  x = np.array([1e-8, 0.3, 1.0, 30.0])
  np.testing.assert_allclose(np.logaddexp(0.0, laws.inverse_softplus(x)), x, rtol=1e-12)


def test_log_space_stability_and_gradients():
  law = laws.rectified_law()
  with jax.enable_x64(True):
    d = jnp.array([0.0, 200.0, 1638400.0])
    # E = exp(-800) underflows to 0 in loss units; log L must still be the
    # finite log(B / (D_l + D^beta)).
    raw = jnp.array([np.log(2.0), np.log(100.0), laws.inverse_softplus(0.5), -800.0])
    out = np.asarray(law.log_loss(raw, d))
    dd = np.maximum(np.asarray(d), 1e-10)
    np.testing.assert_allclose(out, np.log(2.0 * 100.0 / (100.0 + dd ** 0.5)), rtol=1e-12)
    # Huge amplitude: the loss overflows float64 only outside log space.
    raw_big = raw.at[0].set(800.0)
    assert np.all(np.isfinite(np.asarray(law.log_loss(raw_big, d))))
    # Gradients at D = 0 are finite for every law (vanilla masks D = 0).
    y = jnp.log(jnp.array([4.0, 3.0, 2.0]))
    for lw in (laws.rectified_law(), laws.lensllm_law(), laws.vanilla_law()):
      g = jax.grad(lw.objective)(jnp.zeros(4), d, y, jnp.ones(3, bool))
      assert np.all(np.isfinite(np.asarray(g))), lw.name


def test_objectives_by_hand():
  p_van = {"alpha": 1.0, "B": 1.0, "beta": 1.0, "E": 1.0}
  with jax.enable_x64(True):
    d = jnp.array([200.0, 400.0, 800.0])
    van = laws.vanilla_law()
    raw = jnp.asarray(van.unconstrain(p_van))
    pred = 1.0 + 1.0 / np.asarray(d)  # log L = log(1/D + 1)
    # Residuals 0.0005 (quadratic zone) and 0.01 (linear zone) of the Huber loss;
    # the third point is masked and holds NaN.
    y = jnp.asarray(np.log(pred) - np.array([0.0005, 0.01, 0.0]))
    y = y.at[2].set(jnp.nan)
    mask = jnp.array([True, True, False])
    want = 0.5 * 0.0005 ** 2 + 1e-3 * (0.01 - 0.5e-3)
    np.testing.assert_allclose(float(van.objective(raw, d, y, mask)), want, rtol=1e-8)
    # Rectified: mean squared log residual over the unmasked points.
    rec = laws.rectified_law()
    p = {"B": 2.0, "D_l": 100.0, "beta": 0.5, "E": 1.5}
    raw = jnp.asarray(rec.unconstrain(p))
    clean = np.log(2.0 / (100.0 + np.sqrt(np.asarray(d))) + 1.5)
    y = jnp.asarray(clean + np.array([0.1, -0.2, 5.0]))
    np.testing.assert_allclose(float(rec.objective(raw, d, y, mask)), (0.01 + 0.04) / 2,
                               rtol=1e-10)


def test_get_law_unknown():
  with pytest.raises(ValueError, match="unknown law"):
    laws.get_law("cubic")


def test_init_shapes_and_published_start():
  law = laws.rectified_law()
  with jax.enable_x64(True):
    d = jnp.array([0.0, 200.0, 400.0])
    y = jnp.log(jnp.array([4.0, 3.0, 1.0]))
    raw = law.init(jax.random.PRNGKey(0), d, y, jnp.ones(3, bool), 5)
    assert raw.shape == (5, 4) and np.all(np.isfinite(np.asarray(raw)))
    p = law.constrain(np.asarray(raw[0]))
  # Lin et al.'s start: A = max L = 4, E = sqrt(4 * 1) = 2, D_l = 1, beta = 1.
  np.testing.assert_allclose([p["B"] / p["D_l"] + p["E"], p["E"], p["D_l"], p["beta"]],
                             [4.0, 2.0, 1.0, 1.0], rtol=1e-12)


# ------------------------------------------------------- NTK-mode law cache ---
_TRACES = []


def _count_trace(t):
  _TRACES.append(1)  # runs once per trace (compilation) of a law using it
  return t


def _scaled_f_term(scale):
  """A fresh lambda at every call (what callers that build f_term inline do)."""
  return lambda t, aux: scale * _count_trace(t) * jnp.sum(aux)


def test_lensllm_law_cache_shares_equal_lambdas_and_separates_unequal():
  laws.lensllm_law(_scaled_f_term(2.0))  # the entry may already exist from another test
  before = laws.law_cache_size()
  first = laws.lensllm_law(_scaled_f_term(2.0))
  assert laws.lensllm_law(_scaled_f_term(2.0)) is first
  assert laws.law_cache_size() == before
  other = laws.lensllm_law(_scaled_f_term(3.0))
  assert other is not first and laws.law_cache_size() == min(before + 1, laws.LAW_CACHE_SIZE)
  assert laws.lensllm_law(lambda t, aux: 2.0 * t * jnp.sum(aux)) is not first  # other code
  # No collision: each law evaluates its own F (B / (F + D^beta) + E, F = scale t sum(aux)).
  p = {"B": 3.0, "beta": 0.5, "E": 1.0, "t": 1.0}
  aux = np.array([1.0])
  np.testing.assert_allclose(first.predict(p, [4.0], aux=aux), [3.0 / 4.0 + 1.0], rtol=1e-13)
  np.testing.assert_allclose(other.predict(p, [4.0], aux=aux), [3.0 / 5.0 + 1.0], rtol=1e-13)
  # An explicit key stands for the function; curve mode refuses one.
  assert laws.lensllm_law(_scaled_f_term(5.0), key="k5") is laws.lensllm_law(
      _scaled_f_term(7.0), key="k5")
  with pytest.raises(ValueError, match="curve mode"):
    laws.lensllm_law(None, key="k")
  # Bounded: many distinct functions never hold more than LAW_CACHE_SIZE laws.
  for i in range(laws.LAW_CACHE_SIZE + 3):
    laws.lensllm_law(_scaled_f_term(100.0 + i))
  assert laws.law_cache_size() == laws.LAW_CACHE_SIZE


def test_equal_lambdas_compile_one_fit():
  d = np.array([0.0, 200.0, 400.0, 800.0, 1600.0])
  y = np.log(np.array([[3.0, 2.5, 2.2, 2.0, 1.9]]))
  aux = np.ones((1, 1))
  fit = lambda: fitting.fit_curves(laws.lensllm_law(_scaled_f_term(11.0)), d, y,  # noqa: E731
                                   key=jax.random.key(0), num_restarts=2, aux=aux,
                                   options=fitting.FitOptions(max_steps=3))
  fit()
  traced = len(_TRACES)
  fit()
  assert len(_TRACES) == traced  # the second fit with a new, equal lambda did not retrace


def _ntk_law():
  return laws.lensllm_law(lambda t, aux: aux["c"] * t, key="test_laws.c_times_t")


@pytest.mark.parametrize("name", ["vanilla", "rectified", "lensllm", "lensllm_ntk"])
def test_derivatives_match_autodiff(name):
  # Closed-form log L derivatives and the one-pass (objective, gradient, curvature) against
  # jax.jacfwd / jax.hessian of log_loss and objective, at random points with masked (NaN)
  # entries, D = 0, and Huber residuals on both sides of delta.
  law = _ntk_law() if name == "lensllm_ntk" else laws.get_law(name)
  aux = {"c": jnp.asarray(3.0)} if name == "lensllm_ntk" else None
  assert (law.log_loss_derivatives_fn is None) == (name == "lensllm_ntk")
  rng = np.random.default_rng(0)

  @jax.jit
  def parts(raw, d, y, mask):
    f = functools.partial(law.log_loss, data_size=d, aux=aux)
    obj = functools.partial(law.objective, data_size=d, log_loss=y, mask=mask, aux=aux)
    r = law.residuals(raw, d, y, mask, aux)
    j_r = jax.jacfwd(law.residuals)(raw, d, y, mask, aux)
    w = law.residual_weights(r, mask, d)
    return dict(
      mine=law.log_loss_derivatives(raw, d, aux), auto=(f(raw), jax.jacfwd(f)(raw),
                                                        jax.hessian(f)(raw)),
      obj_mine=law.objective_derivatives(raw, d, y, mask, aux),
      obj_auto=(obj(raw), jax.grad(obj)(raw), jax.hessian(obj)(raw)),
      gn_mine=law.objective_derivatives(raw, d, y, mask, aux, curvature="gauss_newton")[2],
      gn_auto=j_r.T @ (w[:, None] * j_r), r=r)

  with jax.enable_x64(True):
    d = jnp.asarray([0.0] + [200.0 * 2.0 ** k for k in range(14)])
    valid = np.asarray(law.valid_data_size(d))
    for _ in range(2):
      raw = jnp.asarray(rng.normal(size=4))
      mask = jnp.asarray(rng.uniform(size=d.size) > 0.2)
      y0 = law.log_loss(raw, d, aux) + jnp.asarray(rng.normal(scale=3e-3, size=d.size))
      y = jnp.where(mask, y0, jnp.nan)
      p = jax.tree.map(np.asarray, parts(raw, d, y, mask))
      (out, jac, hess), (out_a, jac_a, hess_a) = p["mine"], p["auto"]
      np.testing.assert_allclose(out, out_a, rtol=1e-15)
      np.testing.assert_allclose(jac[valid], jac_a[valid], rtol=1e-12, atol=1e-15)
      np.testing.assert_allclose(hess[valid], hess_a[valid], rtol=1e-11, atol=1e-14)
      for mine, auto in zip(p["obj_mine"], p["obj_auto"], strict=True):
        np.testing.assert_allclose(mine, auto, rtol=1e-10, atol=1e-16)
      np.testing.assert_allclose(p["gn_mine"], p["gn_auto"], rtol=1e-10, atol=1e-16)
      if law.loss == "huber":
        a = np.abs(p["r"])[np.asarray(mask) & valid]
        assert np.any(a < law.huber_delta) and np.any(a > law.huber_delta)
