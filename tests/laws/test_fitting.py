"""Tests of lensllm_jax.laws.fitting: recovery of known curves, failures, and scipy agreement.

All rectified fits share one batch shape ([60 curves, 15 points], 8 restarts)
so the engine compiles once for this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from lensllm_jax import laws
from lensllm_jax.curves import benchmarks
from lensllm_jax.laws import fitting

GRID = np.array([0.0] + [200.0 * 2**k for k in range(14)])
C, R = 60, 8


def _rectified_truth(rng, n):
  """n well-identified rectified curves: params dict of [n] arrays."""
  beta = rng.uniform(0.25, 0.8, n)
  d_t = np.exp(rng.uniform(np.log(300.0), np.log(3e4), n))  # transition D_l^(1/beta)
  e = rng.uniform(0.5, 2.0, n)
  amp = rng.uniform(0.5, 3.0, n)  # L(0) - E = B / D_l
  d_l = d_t ** beta
  return {"B": amp * d_l, "D_l": d_l, "beta": beta, "E": e}


def _rectified_closed_form(p, d):
  d = np.maximum(d, 1e-10)
  return p["B"][:, None] / (p["D_l"][:, None] + d[None, :] ** p["beta"][:, None]) + p["E"][:, None]


@pytest.fixture(scope="module")
def synthetic():
  """60 rectified curves: 0-19 exact, 20-39 noisy (sigma 0.003 in log L), 40-59 masked."""
  rng = np.random.default_rng(1)
  truth = _rectified_truth(rng, C)
  clean = np.log(_rectified_closed_form(truth, GRID))
  y = clean.copy()
  y[20:40] += rng.normal(scale=3e-3, size=(20, GRID.size))
  mask = np.ones_like(y, bool)
  for c in range(40, 60):
    drop = rng.choice(GRID.size, size=4, replace=False)
    mask[c, drop] = False
    y[c, drop] = np.nan  # masked points may hold anything
  result = fitting.fit_curves(laws.rectified_law(), GRID, y, mask, key=jax.random.PRNGKey(0),
                              num_restarts=R)
  return truth, clean, y, mask, result


def test_recovers_exact_and_masked_curves(synthetic):
  truth, clean, _, _, res = synthetic
  assert res.raw_params.shape == (C, 4) and res.objective.shape == (C,)
  for idx in (slice(0, 20), slice(40, 60)):
    assert np.all(res.status[idx] == "converged"), res.status[idx]
    assert np.all(res.converged[idx])
    assert np.all(res.objective[idx] < 1e-16)
    for k in ("B", "D_l", "beta", "E"):
      np.testing.assert_allclose(res.params[k][idx], truth[k][idx], rtol=2e-4, err_msg=k)
  # Predictions at the grid and far beyond it (loss units).
  d_new = np.array([0.0, 1000.0, 1638400.0, 1e8])
  want = _rectified_closed_form(truth, d_new)
  pred = laws.rectified_law().predict(res, d_new)
  assert pred.shape == (C, 4)
  np.testing.assert_allclose(pred[:20], want[:20], rtol=1e-5)
  np.testing.assert_allclose(pred[40:], want[40:], rtol=1e-5)
  np.testing.assert_allclose(laws.rectified_law().predict(res, d_new, curve=3), want[3],
                             rtol=1e-5)
  np.testing.assert_allclose(laws.rectified_law().predict(res.curve_params(3), d_new), want[3],
                             rtol=1e-5)


def test_noisy_curves_fit_at_least_as_well_as_truth(synthetic):
  truth, _, y, _, res = synthetic
  idx = slice(20, 40)
  assert np.all(res.converged[idx])
  obj_truth = np.mean((np.log(_rectified_closed_form(truth, GRID)) - y) ** 2, axis=1)[idx]
  # A global minimiser is no worse than the generating parameters.
  assert np.all(res.objective[idx] <= obj_truth + 1e-12)
  pred = laws.rectified_law().predict(res, [1638400.0])[idx, 0]
  np.testing.assert_allclose(pred, _rectified_closed_form(truth, np.array([1638400.0]))[idx, 0],
                             rtol=0.03)


def test_failures_are_reported_not_nan(synthetic):
  _, clean, _, _, _ = synthetic
  law = laws.rectified_law()
  y = clean.copy()
  mask = np.ones_like(y, bool)
  y[0, 5] = np.inf           # an unmasked non-finite observation: no finite restart
  y[1, :] = 1e200            # overflows the squared error
  mask[2, :] = False         # no valid point
  res = fitting.fit_curves(law, GRID, y, mask, key=jax.random.PRNGKey(0), num_restarts=R)
  assert list(res.status[:3]) == ["nonfinite", "nonfinite", "no_data"]
  assert not res.converged[:3].any()
  assert np.all(np.isinf(res.objective[:3])) and np.all(np.isnan(res.raw_params[:3]))
  assert np.all(res.status[3:] == "converged")
  assert np.all(np.isfinite(res.objective[3:])) and np.all(np.isfinite(res.raw_params[3:]))
  # A step budget too small to converge: "max_steps", finite values, no recompilation.
  fn = fitting._compiled_fit(law, "newton", 10, False, fitting.auto_queue_slots(C * R))
  size = fn._cache_size()
  res2 = fitting.fit_curves(law, GRID, clean, key=jax.random.PRNGKey(0), num_restarts=R,
                            options=fitting.FitOptions(max_steps=1))
  assert fn._cache_size() == size
  assert np.all(res2.status == "max_steps") and not res2.converged.any()
  assert np.all(np.isfinite(res2.objective))


def test_vanilla_recovery_excludes_zero():
  rng = np.random.default_rng(2)
  n = 6
  truth = {"alpha": rng.uniform(0.5, 2.0, n), "B": rng.uniform(2.0, 20.0, n),
           "beta": rng.uniform(0.2, 0.6, n), "E": rng.uniform(0.5, 1.5, n)}
  d = GRID[1:]
  loss = (truth["B"][:, None] / d[None] ** truth["beta"][:, None]
          + truth["E"][:, None]) ** truth["alpha"][:, None]
  y = np.concatenate([np.full((n, 1), np.nan), np.log(loss)], axis=1)  # D = 0 holds NaN
  law = laws.vanilla_law()
  res = fitting.fit_curves(law, GRID, y, key=jax.random.PRNGKey(3), num_restarts=R)
  assert np.all(res.num_points == 14)
  assert np.all(res.converged), res.status
  np.testing.assert_allclose(law.predict(res, d), loss, rtol=1e-5)
  np.testing.assert_array_equal(law.predict(res, [0.0]), np.full((n, 1), np.inf))


def test_lensllm_ntk_mode_recovery():
  def f_term(t, aux):
    return jnp.sum(jnp.exp(-2.0 * aux["eta"] * aux["lam"] * t) * aux["proj"] ** 2)

  rng = np.random.default_rng(4)
  n = 6
  aux = {"lam": rng.uniform(0.1, 2.0, (n, 5)), "proj": rng.normal(size=(n, 5)),
         "eta": np.full(n, 0.05)}
  truth = {"B": rng.uniform(20.0, 80.0, n), "beta": rng.uniform(0.3, 0.6, n),
           "E": rng.uniform(0.8, 1.5, n), "t": rng.uniform(1.0, 20.0, n)}
  f = np.array([np.sum(np.exp(-2 * 0.05 * aux["lam"][c] * truth["t"][c]) * aux["proj"][c] ** 2)
                for c in range(n)])
  d = np.maximum(GRID, 1e-10)
  loss = truth["B"][:, None] / (f[:, None] + d[None] ** truth["beta"][:, None]) + truth["E"][:, None]
  law = laws.lensllm_law(f_term)
  res = fitting.fit_curves(law, GRID, np.log(loss), key=jax.random.PRNGKey(5), num_restarts=R,
                           aux=aux)
  assert np.all(res.converged), res.status
  for k in truth:
    np.testing.assert_allclose(res.params[k], truth[k], rtol=1e-4, err_msg=k)
  np.testing.assert_allclose(law.predict(res, GRID, aux=aux), loss, rtol=1e-8)


def test_input_validation():
  law = laws.rectified_law()
  with pytest.raises(ValueError, match="curves, points"):
    fitting.fit_curves(law, GRID, np.zeros(15), key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="mask shape"):
    fitting.fit_curves(law, GRID, np.zeros((2, 15)), np.ones((2, 3), bool),
                       key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="needs aux"):
    fitting.fit_curves(laws.lensllm_law(lambda t, a: t), GRID, np.zeros((2, 15)),
                       key=jax.random.PRNGKey(0))


# --- agreement with scipy on the public curves --------------------------------


def _np_objective_and_grad(raw, log_d, y):
  """Rectified objective mean((log L - y)^2) and its gradient, derived by hand.

  log L = logaddexp(a - softplus(z), e), z = softplus(rb) log D - l, for
  raw = (a, l, rb, e) = (log(B / D_l), log D_l, softplus^-1(beta), log E).
  """
  a, l, rb, e = raw
  beta = np.logaddexp(0.0, rb)
  z = beta * log_d - l
  u = a - np.logaddexp(0.0, z)
  pred = np.logaddexp(u, e)
  w = scipy.special.expit(u - e)      # d pred / d u
  sz = scipy.special.expit(z)         # d softplus(z) / d z
  r = pred - y
  jac = np.stack([w, w * sz, -w * sz * log_d * scipy.special.expit(rb), 1.0 - w], axis=1)
  return np.mean(r * r), 2.0 * (r @ jac) / r.size


def test_matches_scipy_on_public_curves(shared_benchmarks):
  sets = [benchmarks.load_curves(shared_benchmarks / f"{n}.csv") for n in ("flan", "gigaword")]
  d = np.concatenate([np.broadcast_to(s.data_sizes, s.losses.shape) for s in sets])
  y = np.log(np.concatenate([s.losses for s in sets]))
  assert d.shape == (C, 15)
  law = laws.rectified_law()
  key = jax.random.PRNGKey(7)
  res = fitting.fit_curves(law, d, y, key=key, num_restarts=R)
  starts = fitting.initial_params(law, d, y, key=key, num_restarts=R)
  assert starts.shape == (C, R, 4)
  log_d = np.log(np.maximum(d, 1e-10))
  scipy_best = np.full(C, np.inf)
  for c in range(C):
    for r in range(4):  # several published-style starts per curve
      sol = scipy.optimize.minimize(_np_objective_and_grad, starts[c, r], args=(log_d[c], y[c]),
                                    jac=True, method="BFGS", options={"gtol": 1e-10})
      if np.isfinite(sol.fun):
        scipy_best[c] = min(scipy_best[c], sol.fun)
  # The engine's objective, re-evaluated independently in numpy.
  engine = np.array([_np_objective_and_grad(res.raw_params[c], log_d[c], y[c])[0]
                     for c in range(C)])
  np.testing.assert_allclose(engine, res.objective, rtol=1e-9)
  diff = engine - scipy_best
  assert np.mean(diff <= 1e-6) >= 0.95, np.sort(diff)[-5:]
  assert np.all(diff <= 1e-3), diff.max()
  assert np.all(res.status != "nonfinite")


@pytest.mark.parametrize("law", [laws.vanilla_law(), laws.rectified_law()], ids=lambda l: l.name)
def test_irls_weights_give_the_exact_gradient_and_gauss_newton_matrix(law):
  # J^T diag(w) r must be the objective's gradient (Huber: psi(r) = w r), and for the
  # squared loss J^T diag(w) J the Gauss-Newton matrix 2 J^T J / n.
  rng = np.random.default_rng(0)
  d = jnp.asarray(GRID)
  y = jnp.asarray(np.log(2.0 + rng.uniform(size=GRID.size)))
  mask = jnp.asarray(rng.uniform(size=GRID.size) > 0.2)

  @jax.jit
  def parts(raw):
    r = law.residuals(raw, d, y, mask)
    jac = jax.jacfwd(law.residuals)(raw, d, y, mask)
    return r, jac, law.residual_weights(r, mask, d), jax.grad(law.objective)(raw, d, y, mask)

  with jax.enable_x64(True):
    for _ in range(3):
      r, jac, w, want = (np.asarray(a) for a in parts(jnp.asarray(rng.normal(size=4))))
      np.testing.assert_allclose(jac.T @ (w * r), want, rtol=1e-10, atol=1e-14)
      if law.loss == "squared":
        n = float(np.sum(np.asarray(mask) & (GRID >= 0)))
        np.testing.assert_allclose(jac.T @ (w[:, None] * jac), 2.0 * jac.T @ jac / n, rtol=1e-12)
      else:  # at least one point in each Huber regime
        used = np.asarray(mask) & (GRID > 0)
        assert np.any(np.abs(r[used]) > law.huber_delta)


def test_work_queue_matches_one_vmapped_loop(shared_benchmarks):
  # The queue only changes which lanes run together: same optima and statuses.
  # Shapes as in test_matches_scipy_on_public_curves (the queued program is compiled once).
  sets = [benchmarks.load_curves(shared_benchmarks / f"{n}.csv") for n in ("flan", "gigaword")]
  d = np.concatenate([np.broadcast_to(s.data_sizes, s.losses.shape) for s in sets])
  y = np.log(np.concatenate([s.losses for s in sets]))
  law = laws.rectified_law()
  kwargs = dict(key=jax.random.PRNGKey(7), num_restarts=R)
  assert fitting.auto_queue_slots(C * R) < C * R
  queued = fitting.fit_curves(law, d, y, **kwargs)
  plain = fitting.fit_curves(law, d, y, options=fitting.FitOptions(queue_slots=None), **kwargs)
  np.testing.assert_array_equal(queued.status, plain.status)
  both = queued.status == "converged"
  assert both.mean() > 0.9, queued.status
  np.testing.assert_allclose(queued.objective[both], plain.objective[both], rtol=1e-9)
  assert fitting.auto_optimizer(laws.vanilla_law()) == "gauss_newton"
  assert fitting.auto_optimizer(law) == "newton"


def test_canonical_point_of_flat_vanilla_faces(shared_benchmarks):
  # flan at D_max = 25600: the Huber objective of many curves has a flat face of minimisers
  # (docs/laws.md). Other restart draws end elsewhere on a face: same objective, other L(D*).
  # The canonical point is the same for all draws, and no plain end of equal objective has
  # a lower objective + tau / 2 sum r^2 (the tie-break objective it minimises).
  curves = benchmarks.load_curves(shared_benchmarks / "flan.csv")
  keep = (curves.data_sizes > 0) & (curves.data_sizes <= 25600)
  d, y = curves.data_sizes[keep], np.log(curves.losses[:, keep])
  law = laws.vanilla_law()
  target = [float(curves.data_sizes.max())]
  fits = {(k, c): fitting.fit_curves(law, d, y, key=jax.random.PRNGKey(k), num_restarts=R,
                                     options=fitting.FitOptions(canonical=c))
          for k in (0, 1, 2) for c in (True, False)}
  for k in (0, 1, 2):
    plain, canon = fits[(k, False)], fits[(k, True)]
    # Still a minimiser of the published objective (up to the stated tolerance).
    assert np.all(canon.objective <= plain.objective * (1 + fitting.CANONICAL_RTOL))
    with jax.enable_x64(True):
      r_canon, r_plain = (np.asarray(jax.vmap(law.residuals, (0, None, 0, None))(
        jnp.asarray(f.raw_params), jnp.asarray(d), jnp.asarray(y), jnp.ones(d.size, bool)))
        for f in (canon, plain))
    same = np.abs(canon.objective - plain.objective) <= 1e-10 * plain.objective
    assert same.mean() > 0.9
    # The canonical point minimises objective + tau / 2 sum r^2 (to rounding) over the ends.
    tau = fitting.CANONICAL_TIE_BREAK
    tie_canon = canon.objective + 0.5 * tau * np.sum(r_canon ** 2, 1)
    tie_plain = plain.objective + 0.5 * tau * np.sum(r_plain ** 2, 1)
    # to rounding: up to 1.02e-12 relative seen on jax 0.12.0.1
    assert np.all(tie_canon[same] <= tie_plain[same] * (1 + 1e-11))
  obj = np.stack([fits[(k, True)].objective for k in (0, 1, 2)])
  agree = np.all(np.abs(obj - obj[0]) <= 1e-10 * obj[0], axis=0)
  pred = {c: np.stack([law.predict(fits[(k, c)], target)[:, 0] for k in (0, 1, 2)])
          for c in (True, False)}
  spread = {c: np.max(np.abs(p - p[0]) / p[0], axis=0)[agree] for c, p in pred.items()}
  assert agree.sum() >= 20
  assert np.sum(spread[False] > 1e-5) >= 3  # flat faces: the plain ends differ
  np.testing.assert_array_less(spread[True], 1e-7)


def test_marquardt_damping_schedule():
  """damping_schedule "accept_reject": mu / 3 on a decrease, * 4 otherwise (f(w) = w^2 / 2,
  gradient w, Gauss-Newton matrix 1: the step is -w / (1 + mu (1 + c)))."""
  with jax.enable_x64(True):
    tx = fitting.scale_by_gauss_newton(1e-3, 1e-12, 1e12, diagonal_floor=1e-9,
                                       damping_schedule="accept_reject")
    w = jnp.array([2.0])

    def derivatives(w):
      return 0.5 * w @ w, w, jnp.eye(1)

    state = tx.init(w)._replace(value=2.0, grad=w, curvature=jnp.eye(1))
    step, state = tx.update(w, state, w, value=2.0, curvature=jnp.eye(1),
                            derivatives_fn=derivatives)
    np.testing.assert_allclose(step, -w / (1 + 1e-3 * (1 + 1e-9)), rtol=1e-15)
    assert float(state.damping) == pytest.approx(1e-3 / 3, rel=1e-15)
    # A value that the trial point cannot beat: rejected, zero step, mu * 4.
    step, state = tx.update(w, state, w, value=-1.0, curvature=jnp.eye(1),
                            derivatives_fn=derivatives)
    np.testing.assert_array_equal(step, [0.0])
    assert float(state.damping) == pytest.approx(4e-3 / 3, rel=1e-15)
  with pytest.raises(ValueError, match="damping_schedule"):
    fitting.scale_by_gauss_newton(damping_schedule="rho")
  with pytest.raises(ValueError, match="accept_reject"):
    fitting._trust_region(None, 1e-3, 0, 1, rejected_damping=1.0,
                          damping_schedule="accept_reject")
