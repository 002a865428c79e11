"""Tests of the pooled (hierarchical) LensLLM fit (PooledLensLLM) (lensllm_jax/selection/pooled/)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from lensllm_jax import laws, selection
from lensllm_jax.laws import fitting
from lensllm_jax.selection import methods, pooled

D_STAR = 1_638_400.0


def _synthetic(seed, num_models=12, noise=0.01, grid=None):
  """Curves from the LensLLM law with a common-ish exponent and log-normal noise.

  Returns (data_size [P], log_loss [M, P], true params dict of [M]).
  """
  rng = np.random.default_rng(seed)
  d = np.array([0.0] + [200.0 * 2**k for k in range(7)]) if grid is None else grid
  m = num_models
  beta = 0.4 * np.exp(0.05 * rng.standard_normal(m))
  e = 0.6 * np.exp(0.1 * rng.standard_normal(m))
  dt = np.exp(rng.uniform(np.log(300.0), np.log(3000.0), m))
  f = dt ** beta
  amp = rng.uniform(1.5, 3.0, m)                      # L(0) - E
  b = amp * f
  law = laws.lensllm_law()
  raw = law.unconstrain({"B": b, "beta": beta, "E": e, "F": f})
  clean = np.log(law.predict(raw, d))
  y = clean + noise * rng.standard_normal(clean.shape)
  return d, y, {"beta": beta, "E": e, "F": f, "B": b, "raw": raw}


def _independent(d, y, key):
  law = laws.lensllm_law()
  fit = fitting.fit_curves(law, d, y, key=key, num_restarts=4,
                           options=fitting.FitOptions(max_steps=200))
  return fit.raw_params


def test_pooled_beats_independent_at_small_budget():
  """Property: pooling beta shrinks the error of beta and of log L(D*) (3 seeds).

  Config 1: a fixed strength; config 2: the empirical-Bayes strength with a
  Huber threshold of 1.345 noise sds (resolved here as pooled_selection does).
  """
  law = laws.lensllm_law()
  cfgs = [pooled.PooledConfig(strength=0.0),
          pooled.PooledConfig(strength=0.04, pooled=("beta",)),
          pooled.PooledConfig(strength=1.0, pooled=("beta",), empirical_bayes=True,
                              huber_delta=1.345, huber_relative=True)]
  err = {0: [], 1: [], 2: []}
  pred_err = {0: [], 1: [], 2: []}
  ds, ys, inits, truths = [], [], [], []
  for seed in range(3):
    d, y, truth = _synthetic(seed)
    ds.append(d)
    ys.append(y)
    truths.append(truth)
    inits.append(_independent(d, y, jax.random.key(seed)))
  eb = [pooled.empirical_bayes_strength(inits[s], ds[s], ys[s], np.ones(ys[s].shape, bool))
        for s in range(3)]
  for s in range(3):  # the noise sd estimate is close to the true 0.01
    assert 0.5 * 0.01 < np.sqrt(eb[s][1]["s2"]) < 1.5 * 0.01
  resolved = [[cfgs[0], cfgs[1], dataclasses.replace(
      cfgs[2], huber_relative=False, huber_delta=1.345 * np.sqrt(eb[s][1]["s2"]))]
      for s in range(3)]
  # All (seed, config) problems in one compiled call.
  v = [(s, c) for s in range(3) for c in range(3)]
  group = np.stack([eb[s][0] if c == 2 else cfgs[c].arrays()[0] for s, c in v])
  fit = pooled.fit_pooled(np.stack([inits[s] for s, _ in v]),
                          np.stack([ds[s] for s, _ in v]),
                          np.stack([ys[s] for s, _ in v]),
                          np.ones((len(v),) + ys[0].shape, bool), [resolved[s][c] for s, c in v],
                          covariates=np.ones((ys[0].shape[0], 3)), group_strength=group)
  pred = fit.predict([D_STAR])[..., 0]
  for k, (s, c) in enumerate(v):
    beta = law.constrain(fit.raw_params[k])["beta"]
    err[c].append(np.sqrt(np.mean((np.log(beta) - np.log(truths[s]["beta"])) ** 2)))
    true_star = law.predict(truths[s]["raw"], [D_STAR])[:, 0]
    pred_err[c].append(np.sqrt(np.mean((np.log(pred[k]) - np.log(true_star)) ** 2)))
  for c in (1, 2):
    assert np.mean(err[c]) < 0.7 * np.mean(err[0]), (err, pred_err)
    assert np.mean(pred_err[c]) < np.mean(pred_err[0]), (err, pred_err)
    # The pooled beta is close to the truth (true spread of log beta is 0.05).
    assert np.mean(err[c]) < 0.15
  assert cfgs[2].name.endswith("huber=1.345sd,eb")
  with pytest.raises(ValueError, match="resolve"):
    cfgs[2].arrays()
  with pytest.raises(ValueError, match="huber_relative"):
    pooled.PooledConfig(huber_relative=True)


def test_pooled_recovers_parameters_with_enough_points():
  """Low noise, full grid: the pooled fit recovers every model's parameters."""
  grid = np.array([0.0] + [200.0 * 2**k for k in range(14)])
  d, y, truth = _synthetic(7, num_models=6, noise=1e-4, grid=grid)
  law = laws.lensllm_law()
  init = _independent(d, y, jax.random.key(1))
  cfg = pooled.PooledConfig(strength=1e-3, pooled=("beta", "E"))
  fit = pooled.fit_pooled(init[None], d[None], y[None], np.ones((1,) + y.shape, bool), [cfg],
                          covariates=np.ones((6, 3)))
  p = law.constrain(fit.raw_params[0])
  np.testing.assert_allclose(p["beta"], truth["beta"], rtol=0.03)
  np.testing.assert_allclose(p["E"], truth["E"], rtol=0.05)
  true_star = law.predict(truth["raw"], [D_STAR])[:, 0]
  np.testing.assert_allclose(fit.predict([D_STAR])[0, :, 0], true_star, rtol=0.01)


def test_objective_matches_numpy_reference():
  """pooled_objective equals a direct numpy evaluation (lstsq prior means, Huber, floor)."""
  rng = np.random.default_rng(3)
  d, y, truth = _synthetic(3, num_models=5)
  raw = truth["raw"] + 0.1 * rng.standard_normal(truth["raw"].shape)
  sizes = np.exp(rng.uniform(18, 22, 5))
  cov = pooled.covariate_matrix(sizes, np.exp(y[:, 0]))
  w = rng.uniform(0.2, 1.0, y.shape)
  cfg = pooled.PooledConfig(strength=0.3, pooled=("beta", "Dt"), covariates="size",
                            huber_delta=0.05, floor_prior=0.2)
  got = pooled.pooled_objective(raw, d, y, np.ones(y.shape, bool), cfg, covariates=cov, weight=w)
  # Reference: closed-form law, Huber, least-squares regression of phi on [1, log size].
  b, beta, e, f = (np.exp(raw[:, 0] + raw[:, 3]), np.logaddexp(0, raw[:, 1]), np.exp(raw[:, 2]),
                   np.exp(raw[:, 3]))
  dd = np.maximum(d, 1e-10)[None, :]
  r = np.log(b[:, None] / (f[:, None] + dd ** beta[:, None]) + e[:, None]) - y
  a = np.abs(r)
  h = np.where(a <= 0.05, r * r, 2 * 0.05 * a - 0.05 ** 2)
  data = (w * h).sum()
  x = np.stack([np.ones(5), (np.log(sizes) - np.log(sizes).mean()) / np.log(sizes).std()], 1)
  prior = 0.0
  for phi in (np.log(beta), np.log(f) / beta):
    coef = np.linalg.lstsq(x, phi, rcond=None)[0]
    prior += ((phi - x @ coef) ** 2).sum()
  np.testing.assert_allclose(got, data + 0.3 * prior + 0.2 * (e ** 2).sum(), rtol=1e-10)


def test_strength_zero_keeps_independent_fit():
  """strength 0 decouples the models: LM from the independent optimum stays there."""
  d, y, _ = _synthetic(5)  # same shapes as above: compiled code is reused
  law = laws.lensllm_law()
  fit0 = fitting.fit_curves(law, d, y, key=jax.random.key(0), num_restarts=4,
                            options=fitting.FitOptions(max_steps=200))
  fit = pooled.fit_pooled(fit0.raw_params[None], d[None], y[None], np.ones((1,) + y.shape, bool),
                          [pooled.PooledConfig(strength=0.0)], covariates=np.ones((12, 3)))
  # fit_curves minimises the MEAN squared residual per curve; ours is the sum.
  assert fit.objective[0] <= (fit0.objective * y.shape[1]).sum() * (1 + 1e-8)
  np.testing.assert_allclose(fit.predict([D_STAR])[0, :, 0],
                             law.predict(fit0.raw_params, [D_STAR])[:, 0], rtol=1e-3)


def test_method_reads_only_the_visible_budget(shared_benchmarks):
  """Losses above D_max cannot change PooledLensLLM: garbage there gives the same result."""
  from lensllm_jax.curves import benchmarks
  curves = benchmarks.load_curves(str(shared_benchmarks / "gigaword.csv"))
  dmax = 6400.0
  sub = slice(0, 10)
  small = dataclasses.replace(curves, models=curves.models[sub], sizes=curves.sizes[sub],
                              families=curves.families[sub], losses=curves.losses[sub])
  bad = small.losses.copy()
  bad[:, small.data_sizes > dmax] = np.random.default_rng(0).uniform(0.1, 50, bad[
      :, small.data_sizes > dmax].shape)
  poisoned = dataclasses.replace(small, losses=bad)
  meta = selection.metadata_of(small)
  # Empirical-Bayes strength and a relative Huber threshold: both estimated
  # from the visible data, so they must not move either.
  cfg = pooled.PooledConfig(strength=1.0, empirical_bayes=True, pooled=("beta", "E"),
                            pre_power_weight=0.1, huber_delta=1.345, huber_relative=True)
  kw = {"key": jax.random.key(0), "config": cfg, "num_restarts": 2,
        "fit_options": fitting.FitOptions(max_steps=100)}
  a = pooled.pooled_lensllm(selection.visible_view(small, dmax), meta, **kw)
  # Through the selection registry (same method, same settings).
  b = methods.run_method("PooledLensLLM", selection.visible_view(poisoned, dmax), meta, **kw)
  np.testing.assert_array_equal(a.predicted, b.predicted)
  assert a.method == b.method == "PooledLensLLM"
  assert methods.METHOD_READS["PooledLensLLM"] == "all"
  # The method refuses anything but a budget view (e.g. the full CurveSet).
  with pytest.raises(TypeError, match="VisibleCurves"):
    pooled.pooled_lensllm(small, meta, **kw)


def test_median_beta_start_keeps_transition_size():
  law = laws.lensllm_law()
  raw = law.unconstrain({"B": np.array([2.0, 3.0, 5.0]), "beta": np.array([0.2, 0.4, 0.9]),
                         "E": np.array([0.5, 0.6, 0.7]), "F": np.array([3.0, 10.0, 200.0])})
  p0, p1 = law.constrain(raw), law.constrain(pooled.median_beta_start(raw))
  np.testing.assert_allclose(p1["beta"], 0.4)
  np.testing.assert_allclose(p1["E"], p0["E"])
  # D_t = F^(1 / beta) is unchanged, and so is the amplitude B / F = L(0) - E.
  np.testing.assert_allclose(p1["F"] ** (1 / p1["beta"]), p0["F"] ** (1 / p0["beta"]), rtol=1e-10)
  np.testing.assert_allclose(p1["B"] / p1["F"], p0["B"] / p0["F"], rtol=1e-10)


def test_paule_mandel_matches_closed_form_equal_variances():
  """Equal variances v: tau^2 = max(0, sample variance (ddof 1) - v)."""
  x = np.array([0.1, 0.5, -0.3, 0.9, 0.2])
  for v in (0.01, 0.1, 1.0):
    want = max(0.0, x.var(ddof=1) - v)
    assert pooled.paule_mandel_tau2(x, np.full(5, v)) == pytest.approx(want, abs=1e-8)


def test_config_validation():
  with pytest.raises(ValueError, match="pooled"):
    pooled.PooledConfig(pooled=("alpha",))
  with pytest.raises(ValueError, match="covariates"):
    pooled.PooledConfig(covariates="family")
  with pytest.raises(ValueError, match="strength"):
    pooled.PooledConfig(strength=-1.0)


def test_normal_equations_match_dense_jacobian():
  """The structured J^T J, J^T r equal those of the dense Jacobian of the residual vector."""
  import jax.numpy as jnp
  rng = np.random.default_rng(11)
  d, y, truth = _synthetic(11, num_models=5)
  raw = truth["raw"] + 0.2 * rng.standard_normal(truth["raw"].shape)
  m, p = y.shape
  cov = pooled.covariate_matrix(np.exp(rng.uniform(18, 22, m)), np.exp(y[:, 0]))
  cfg = pooled.PooledConfig(strength=0.7, pooled=("beta", "E", "Dt"), covariates="size",
                            huber_delta=0.02, floor_prior=0.3)
  group, cols, _, delta, floor = cfg.arrays()
  mask = rng.uniform(size=y.shape) < 0.8
  mask[:, 0] = True
  w = rng.uniform(0.1, 1.0, y.shape)
  law = laws.lensllm_law()
  with jax.enable_x64(True):
    args = (jnp.asarray(np.where(mask, np.broadcast_to(d, y.shape), 1.0)), jnp.asarray(y),
            jnp.asarray(mask), jnp.asarray(w), pooled.hat_matrix(jnp.asarray(cov), jnp.asarray(cols)),
            jnp.asarray(group), jnp.asarray(delta), jnp.asarray(floor), law)
    x = jnp.asarray(raw.reshape(-1))
    res = jax.jit(lambda x: pooled.residual_vector(x, *args))
    r, jac = res(x), jax.jit(jax.jacfwd(res))(x)
    jtj, g, f, fdata = jax.jit(lambda x: pooled.normal_equations(x, *args))(x)
    np.testing.assert_allclose(jtj, jac.T @ jac, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(g, jac.T @ r, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(f, r @ r, rtol=1e-12)
    np.testing.assert_allclose(fdata, r[:m * p] @ r[:m * p], rtol=1e-12)


def _views_without_zero_shot():
  """Low-noise curves on [0, 200 .. 409600]: a view with no D = 0 column, and one
  whose first model's zero-shot loss is not revealed."""
  grid = np.array([0.0] + [200.0 * 2**k for k in range(12)])
  d, y, truth = _synthetic(7, num_models=6, noise=1e-4, grid=grid)
  no_column = selection.VisibleCurves(data_sizes=d[1:], losses=np.exp(y[:, 1:]),
                                      mask=np.ones((6, d.size - 1), bool), max_data_num=d[-1])
  hidden = np.ones(y.shape, bool)
  hidden[0, 0] = False
  one_hidden = selection.VisibleCurves(data_sizes=d, losses=np.exp(y), mask=hidden,
                                       max_data_num=d[-1])
  meta = selection.Metadata(name="synthetic", models=tuple(f"m{i}" for i in range(6)),
                            sizes=np.geomspace(1e8, 3e9, 6).astype(np.int64),
                            families=("f",) * 6, target_data_num=D_STAR)
  return [no_column, one_hidden], meta, truth


def test_zero_shot_covariate_refuses_views_without_it():
  views, meta, _ = _views_without_zero_shot()
  cfg = pooled.PooledConfig(strength=1e-2, pooled=("beta",), covariates="size_zero_shot")
  with pytest.raises(ValueError, match=r"zero-shot loss L\(0\).*\['m0', 'm1', 'm2', 'm3', 'm4', 'm5'\]"):
    pooled.pooled_selection(views[:1], meta, [cfg], key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"lacks it for \['m0'\]"):
    pooled.pooled_lensllm(views[1], meta, key=jax.random.key(0), config=cfg)


def test_pooled_fit_and_backtest_do_without_the_zero_shot_point():
  """Covariates "size" and the backtest need no D = 0: the predictions are the true L(D*)
  (before, a hidden zero-shot loss made every covariate, hence every prediction, NaN)."""
  views, meta, truth = _views_without_zero_shot()
  np.testing.assert_array_equal(pooled.view_covariates(views[0], meta, False),
                                pooled.view_covariates(views[1], meta, False))
  cfg = pooled.PooledConfig(strength=1e-3, pooled=("beta", "E"), covariates="size", backtest=2)
  res = pooled.pooled_selection(views, meta, [cfg], key=jax.random.key(0), num_restarts=2,
                                fit_options=fitting.FitOptions(max_steps=200))
  true_star = laws.lensllm_law().predict(truth["raw"], [D_STAR])[:, 0]
  for row in res:
    assert row[0].extras["strength"] in pooled.BACKTEST_STRENGTHS  # the backtest ran
    np.testing.assert_allclose(row[0].predicted, true_star, rtol=0.01)


def _numpy_residuals(x, d, y, mask, w, hat, group, delta, floor):
  """The stacked residual vector (objective module docstring) in numpy, analytic in x.

  x: [..., M * 4], real or complex (complex x gives complex-step derivatives:
  |Re r| > delta picks the Huber branch, sign(Re r) r stands for |r|); d, y,
  mask, w: [M, P]; hat: [M, M]. Returns [..., M P + 3 M + M].
  """
  m = y.shape[0]
  raw = x.reshape(x.shape[:-1] + (m, 4))
  softplus = lambda z: np.log1p(np.exp(z))  # noqa: E731 (arguments are moderate here)
  beta = softplus(raw[..., 1])
  log_d = np.log(np.maximum(d, 1e-10))
  amp = np.exp(raw[..., 0:1] - softplus(beta[..., None] * log_d - raw[..., 3:4]))
  r = np.where(mask, np.log(amp + np.exp(raw[..., 2:3])) - y, 0.0)
  sign = np.sign(r.real)
  big = np.abs(r.real) > delta
  hub = np.where(big, delta, 0.0)  # finite where the Huber branch is unused (delta may be inf)
  psi = np.where(big, sign * np.sqrt(np.where(big, 2 * hub * sign * r - hub ** 2, 1.0)), r)
  phi = np.stack([np.log(beta), raw[..., 2], raw[..., 3] / beta], axis=-1)
  prior = np.sqrt(group) * (phi - np.einsum("ab,...bg->...ag", hat, phi))
  lead = x.shape[:-1]
  return np.concatenate([(np.sqrt(w) * psi).reshape(lead + (-1,)), prior.reshape(lead + (-1,)),
                         np.sqrt(floor) * np.exp(raw[..., 2])], axis=-1)


def _reference_levenberg_marquardt(x, args, num_steps):
  """Plain Levenberg-Marquardt on `_numpy_residuals` (float64, complex-step Jacobian).

  Each step solves (A + mu (diag(A) + 1e-9 tr(A) / n)) s = -g, A = J^T J,
  g = J^T r, and is accepted when r^T r decreases (mu / 3, else mu * 4,
  within [1e-12, 1e12]; mu starts at 1e-3). Returns (x, r^T r, its data part,
  accepted steps, rejected steps).
  """
  n, h = x.size, 1e-30

  def value(x):
    r = _numpy_residuals(x, *args)
    return r @ r

  f, mu, accepted = value(x), 1e-3, 0
  for _ in range(num_steps):
    r = _numpy_residuals(x, *args)
    jac = _numpy_residuals(x + 1j * h * np.eye(n), *args).imag.T / h    # [R, n]
    a, g = jac.T @ jac, jac.T @ r
    s = -np.linalg.solve(a + np.diag(mu * (np.diag(a) + 1e-9 * np.trace(a) / n)), g)
    with np.errstate(over="ignore", invalid="ignore"):  # a far trial point: rejected
      fn = value(x + s)
    if np.isfinite(fn) and fn < f:
      x, f, mu, accepted = x + s, fn, mu / 3, accepted + 1
    else:
      mu *= 4
    mu = min(max(mu, 1e-12), 1e12)
  data = _numpy_residuals(x, *args)[:args[1].size]
  return x, f, data @ data, accepted, num_steps - accepted


def test_fit_matches_numpy_levenberg_marquardt():
  """fit_pooled (fitting's Gauss-Newton step, Marquardt's damping) follows a plain numpy
  Levenberg-Marquardt: same objective (to rounding) and point after 60 steps, rejected
  steps included. (The path agrees to ~1e-11 in x over the first steps; near the minimum
  accepting a step is decided by rounding, and x moves along flat directions by ~1e-6.)"""
  rng = np.random.default_rng(5)
  cfgs = [pooled.PooledConfig(strength=0.3, pooled=("beta", "Dt"), covariates="size",
                              huber_delta=0.02, floor_prior=0.05),
          pooled.PooledConfig(strength=0.05, pooled=("beta", "E"))]
  problems = []
  for seed, cfg in zip((21, 22), cfgs, strict=True):
    d, y, truth = _synthetic(seed)  # M = 12, P = 8: the shapes compiled above
    mask = np.arange(d.size)[None, :] < rng.integers(5, d.size + 1, (y.shape[0], 1))
    w = rng.uniform(0.2, 1.0, y.shape)
    cov = pooled.covariate_matrix(np.exp(rng.uniform(18, 22, y.shape[0])), np.exp(y[:, 0]))
    start = truth["raw"] + 0.4 * rng.standard_normal(truth["raw"].shape)
    problems.append((d, y, mask, w, cov, start, cfg))
  fit = pooled.fit_pooled(np.stack([p[5] for p in problems]),
                          np.stack([p[0] for p in problems]), np.stack([p[1] for p in problems]),
                          np.stack([p[2] for p in problems]), cfgs,
                          covariates=np.stack([p[4] for p in problems]),
                          weights=np.stack([p[3] for p in problems]))
  for k, (d, y, mask, w, cov, start, cfg) in enumerate(problems):
    group, cols, _, delta, floor = cfg.arrays()
    xc = cov * cols[None, :]
    hat = xc @ np.linalg.pinv(xc, rcond=1e-10)
    args = (np.broadcast_to(d, y.shape), np.where(mask, y, 0.0), mask, w, hat, group, delta,
            floor)
    x, f, f_data, accepted, rejected = _reference_levenberg_marquardt(start.reshape(-1), args, 60)
    assert accepted >= 5 and rejected >= 1, (accepted, rejected)
    np.testing.assert_allclose(fit.objective[k], f, rtol=1e-12)
    np.testing.assert_allclose(fit.data_objective[k], f_data, rtol=1e-9)
    np.testing.assert_allclose(fit.raw_params[k].reshape(-1), x, rtol=0, atol=1e-5)
