"""Empirical-Bayes prior strengths of the pooled fit, from independent per-model fits.

Random-effects model of each shape quantity g across the M models of a task:
phi_mg ~ N(mu_g, tau_g^2 + se_mg^2), se_mg the Laplace standard error of the
independent fit. tau_g^2 by Paule-Mandel; the strength s^2 / tau_g^2 (s^2 the
pooled point noise variance) is the prior precision ratio of `PooledConfig`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax import laws
from lensllm_jax.selection.pooled.config import POOLABLE
from lensllm_jax.selection.pooled.objective import shape_quantities

__all__ = ["empirical_bayes_strength", "paule_mandel_tau2"]


def paule_mandel_tau2(estimates, variances, *, iters: int = 200) -> float:
  """Between-model variance tau^2 of a random-effects model (Paule-Mandel).

  Model: estimate_i ~ N(mu, tau^2 + variance_i). tau^2 >= 0 solves
  Q(tau^2) = sum_i w_i (estimate_i - mu_w)^2 = n - 1 with w_i = 1 / (tau^2 +
  variance_i) and mu_w the w-weighted mean (0 if Q(0) <= n - 1). Q is
  decreasing in tau^2, so bisection (on log tau^2) finds the root.

  Args:
    estimates: [n] finite estimates; variances: [n] their squared standard
      errors (may be inf: that estimate gets no weight).
  """
  x = np.asarray(estimates, np.float64)
  v = np.asarray(variances, np.float64)
  ok = np.isfinite(x) & np.isfinite(v)
  x, v = x[ok], np.maximum(v[ok], 0.0)
  n = x.size
  if n < 2:
    return 0.0

  def q(t2):
    w = 1.0 / (t2 + v + 1e-300)
    mu = (w * x).sum() / w.sum()
    return (w * (x - mu) ** 2).sum()

  if q(0.0) <= n - 1:
    return 0.0
  lo, hi = -30.0, np.log(max(np.var(x) * 10.0, 1e-12))
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    if q(np.exp(mid)) > n - 1:
      lo = mid
    else:
      hi = mid
  return float(np.exp(0.5 * (lo + hi)))


def empirical_bayes_strength(raw, data_size, log_loss, mask, *, tau2_floor: float = 1e-4
                             ) -> tuple[np.ndarray, dict]:
  """Prior strengths s^2 / tau_g^2 [3] from independent fits of one task (float64).

  s^2 = sum_m RSS_m / sum_m max(n_m - 4, 0) is the point noise variance
  pooled over models; each model's shape quantities phi_m (`objective.shape_quantities`)
  get Laplace standard errors se_mg^2 = s^2 g^T (J^T J + lam I)^-1 g (J [n, 4]
  the residual Jacobian, g = d phi_g / d raw, lam = 1e-9 tr(J^T J) / 4); the
  between-model variance tau_g^2 is the Paule-Mandel estimate from
  (phi_mg, se_mg^2), floored at `tau2_floor`. Models whose fit failed (non-
  finite raw) are ignored.

  Args:
    raw: [M, 4] independent-fit raw parameters (`laws.lensllm_law()` order).
    data_size: [P] or [M, P]; log_loss, mask: [M, P].
    tau2_floor: smallest tau^2 (caps the strength).

  Returns:
    (strength [3] in POOLABLE order, info dict with s2, tau2 [3], se2 [M, 3]).
  """
  law = laws.lensllm_law()
  raw = np.asarray(raw, np.float64)
  y = np.asarray(log_loss, np.float64)
  m, p = y.shape
  d = np.broadcast_to(np.asarray(data_size, np.float64), (m, p))
  mk = np.asarray(mask, bool)
  good = np.all(np.isfinite(raw), axis=1)
  safe = np.where(good[:, None], raw, 0.0)
  with jax.enable_x64(True):
    def one(theta, dd, yy, mm):
      def pred(t):
        return jnp.where(mm, law.log_loss_fn(t, jnp.where(mm, dd, 1.0), None), 0.0)
      r = pred(theta) - jnp.where(mm, yy, 0.0)
      return r, jax.jacfwd(pred)(theta), jax.jacfwd(shape_quantities)(theta)

    r, jac, grad = jax.device_get(jax.vmap(one)(jnp.asarray(safe), jnp.asarray(d),
                                                jnp.asarray(y), jnp.asarray(mk)))
  r, jac, grad = np.asarray(r), np.asarray(jac), np.asarray(grad)
  n = mk.sum(1)
  rss = (r ** 2).sum(1)
  dof = np.maximum(n - 4, 0)[good].sum()
  s2 = rss[good].sum() / dof if dof > 0 else rss[good].sum() / max(n[good].sum(), 1)
  jtj = np.einsum("mpk,mpl->mkl", jac, jac)
  lam = 1e-9 * np.trace(jtj, axis1=1, axis2=2) / 4 + 1e-300
  cov = np.linalg.inv(jtj + lam[:, None, None] * np.eye(4))  # [M, 4, 4]
  se2 = s2 * np.einsum("mgk,mkl,mgl->mg", grad, cov, grad)
  phi = np.asarray(jax.device_get(shape_quantities(jnp.asarray(safe))))
  se2 = np.where(good[:, None], se2, np.inf)
  tau2 = np.array([max(paule_mandel_tau2(phi[:, g], se2[:, g]), tau2_floor)
                   for g in range(len(POOLABLE))])
  return s2 / tau2, {"s2": float(s2), "tau2": tau2, "se2": se2}
