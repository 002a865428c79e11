"""F(Theta, t) = ||expm(-eta Theta t) r0||^2 (lensllm_jax.theory.ntk) against references.

References: jax.scipy.linalg.expm in float64; many small explicit gradient
steps on the linearised model (jax.linearize, independent of the kernel code);
the closed-form t-derivative; CORE's fit_curves recovering (B, beta, E, t)
from synthetic curves generated with a known kernel.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lensllm_jax.theory import ntk


def _random_psd(n, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, n))
  return scale * (a @ a.T) / n, rng.normal(size=n)


def test_matches_expm_and_basic_properties():
  theta, r0 = _random_psd(7, 0)
  eta = 0.3
  ts = np.array([0.0, 0.05, 0.4, 1.0, 3.0, 10.0])
  got = np.asarray(ntk.ntk_test_loss_from_kernel(theta, r0, eta, ts))
  with jax.enable_x64(True):
    ref = [float(jnp.sum(jnp.square(jax.scipy.linalg.expm(-eta * t * jnp.asarray(theta)) @ r0)))
           for t in ts]
  np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)
  assert got.dtype == np.float64
  np.testing.assert_allclose(got[0], np.sum(r0 ** 2), rtol=1e-12)  # F(0) = ||r0||^2
  fine = np.asarray(ntk.ntk_test_loss_from_kernel(theta, r0, eta, np.linspace(0, 20, 400)))
  assert np.all(np.diff(fine) < 0)  # strictly decreasing (all eigenvalues > 0 here)


def test_vectorised_jit_and_differentiable_in_t():
  theta, r0 = _random_psd(6, 1)
  spec = ntk.ntk_spectrum(theta, r0)
  with jax.enable_x64(True):
    eta = 0.5
    t = jnp.linspace(0.0, 4.0, 12).reshape(3, 4)
    f = jax.jit(ntk.ntk_test_loss)(spec.eigvals, spec.proj, eta, t)
    assert f.shape == (3, 4)
    each = np.array([[float(ntk.ntk_test_loss(spec.eigvals, spec.proj, eta, tt)) for tt in row]
                     for row in np.asarray(t)])
    np.testing.assert_allclose(f, each, rtol=1e-12)
    modes = ntk.ntk_mode_losses(spec.eigvals, spec.proj, eta, t)
    assert modes.shape == (3, 4, 6)
    np.testing.assert_allclose(modes.sum(-1), f, rtol=1e-12)
    # dF/dt = -2 eta sum_k lambda_k exp(-2 eta lambda_k t) proj_k^2 (closed form).
    grad = jax.vmap(jax.grad(ntk.ntk_test_loss, argnums=3), (None, None, None, 0))(
        spec.eigvals, spec.proj, eta, t.ravel())
    lam, p = np.asarray(spec.eigvals), np.asarray(spec.proj)
    closed = np.array([-2 * eta * np.sum(lam * np.exp(-2 * eta * lam * s) * p ** 2)
                       for s in np.asarray(t).ravel()])
    np.testing.assert_allclose(grad, closed, rtol=1e-10)
    # Eigenvectors reconstruct theta; projections are U^T r0.
    u = np.asarray(spec.eigvecs)
    np.testing.assert_allclose(u @ np.diag(lam) @ u.T, theta, atol=1e-10)
    np.testing.assert_allclose(p, u.T @ r0, atol=1e-12)


def test_matches_gradient_descent_on_linearised_model():
  """||r||^2 after t/dt GD steps of size eta*dt on the linearised model ~ F(t)."""

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(jnp.tanh(nn.Dense(12)(x)))[:, 0]

  with jax.enable_x64(True):
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (6, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (6,), jnp.float64)
    w0 = jax.tree.map(lambda a: a.astype(jnp.float64),
                      model.init(jax.random.key(2), x)["params"])

    def f(w):
      return model.apply({"params": w}, x)

    f0, jvp = jax.linearize(f, w0)  # f_lin(w0 + d) = f0 + J d
    vjp = jax.linear_transpose(jvp, w0)
    eta, t, steps = 0.5, 2.0, 4000
    lr = eta * t / steps

    def step(_, d):
      r = f0 + jvp(d) - y
      (g,) = vjp(r)  # gradient of 0.5 ||r||^2 is J^T r
      return jax.tree.map(lambda a, b: a - lr * b, d, g)

    d = jax.lax.fori_loop(0, steps, step, jax.tree.map(jnp.zeros_like, w0))
    gd = float(jnp.sum(jnp.square(f0 + jvp(d) - y)))
    theta = ntk.make_ntk_fn(lambda p, xx: model.apply({"params": p}, xx))(w0, x)
    spec = ntk.ntk_spectrum(theta, f0 - y)
    f_t = float(ntk.ntk_test_loss(spec.eigvals, spec.proj, eta, t))
    lam_max = float(spec.eigvals.max())
    r0_sq = float(jnp.sum(jnp.square(f0 - y)))
  assert lr * lam_max < 0.01  # small steps: Euler error O(lr * lambda)
  assert f_t < 0.9 * r0_sq  # something was learned
  np.testing.assert_allclose(gd, f_t, rtol=5e-3)


def test_spectrum_input_errors():
  with pytest.raises(ValueError, match="square"):
    ntk.ntk_spectrum(np.ones((3, 4)), np.ones(3))
  with pytest.raises(ValueError, match="r0 must have shape"):
    ntk.ntk_spectrum(np.eye(3), np.ones(4))


def test_joint_fit_with_lensllm_law_recovers_parameters():
  laws = pytest.importorskip("lensllm_jax.laws")
  fitting = pytest.importorskip("lensllm_jax.laws.fitting")
  law = laws.lensllm_law(f_term=ntk.ntk_f_term)
  d = np.array([0.0] + [200.0 * 2 ** k for k in range(9)])  # 0, 200, ..., 51200
  truth = {"B": np.array([40.0, 300.0, 90.0]), "beta": np.array([0.45, 0.6, 0.35]),
           "E": np.array([1.2, 0.8, 2.0]), "t": np.array([3.0, 0.7, 12.0])}
  eig, proj, etas = [], [], []
  for c in range(3):
    theta, r0 = _random_psd(8, 10 + c)
    r0 = r0 * np.sqrt(60.0 / np.sum(r0 ** 2))  # F(0) = 60, comparable to D^beta
    spec = ntk.ntk_spectrum(theta, r0)
    eig.append(np.asarray(spec.eigvals))
    proj.append(np.asarray(spec.proj))
    etas.append(0.05 * (c + 1))
  aux = (np.stack(eig), np.stack(proj), np.asarray(etas))
  with jax.enable_x64(True):
    f_true = np.array([float(ntk.ntk_test_loss(eig[c], proj[c], etas[c], truth["t"][c]))
                       for c in range(3)])
  dd = np.where(d > 0, d, 1e-10)
  loss = truth["B"][:, None] / (f_true[:, None] + dd ** truth["beta"][:, None]) + truth["E"][:, None]
  res = fitting.fit_curves(law, d, np.log(loss), key=jax.random.key(0), num_restarts=8, aux=aux,
                           options=fitting.FitOptions(max_steps=2000))
  assert np.all(res.objective < 1e-12), res.objective
  for name in ("B", "beta", "E", "t"):
    np.testing.assert_allclose(res.params[name], truth[name], rtol=2e-3, err_msg=name)
