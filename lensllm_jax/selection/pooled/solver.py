"""The pooled fit's solver: Levenberg-Marquardt on the MAP objective, vmapped over problems.

J(theta) = r^T r (`objective.residual_vector`) is minimised over the flat raw
parameters x [4 M] of a problem by Levenberg-Marquardt on the stacked
residual vector [sqrt(w) psi(r) ; sqrt(strength) (I - H) phi ; floor], float64:
with A = J^T J and g = J^T r from the structured normal equations
(`objective.normal_equations`: 4 tangents per model, not 4 M), each step
solves (A + mu (diag(A) + 1e-9 tr(A) / 4M)) s = -g by Cholesky and is
accepted when J decreases (mu / 3; else * 4, within [1e-12, 1e12]), a fixed
number of steps in one `jax.lax.fori_loop`, `jax.vmap`-ed over problems
(chunks of a power-of-two size) and compiled once per shape.

Not yet `fitting`'s trust-region engine (issue 22): on the protocol's problems
`fitting.scale_by_gauss_newton` run to fitting's stopping rule reached a lower
objective on most problems but a higher one on some (other stationary points,
and lanes that stalled), so the change was not made; docs/lensllm_plus.md.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax import laws
from lensllm_jax.selection.pooled import objective
from lensllm_jax.selection.pooled.config import POOLABLE, PooledConfig

__all__ = ["PooledFit", "fit_pooled", "median_beta_start"]


class PooledFit:
  """Result of `fit_pooled` for V problems of M models, K = 4 raw parameters.

  Attributes:
    raw_params: [V, M, K] fitted raw parameters (`laws.lensllm_law()` order).
    objective: [V] final J(theta).
    data_objective: [V] its data part sum w rho(r).
    law: the `laws.Law` the raw parameters belong to.
  """

  def __init__(self, raw_params, objective, data_objective, law):
    self.raw_params = np.asarray(raw_params)
    self.objective = np.asarray(objective)
    self.data_objective = np.asarray(data_objective)
    self.law = law

  def predict(self, data_size) -> np.ndarray:
    """[V, M, P] losses at data sizes [P]."""
    v, m, k = self.raw_params.shape
    out = self.law.predict(self.raw_params.reshape(v * m, k), np.asarray(data_size, np.float64))
    return out.reshape(v, m, -1)


def median_beta_start(raw) -> np.ndarray:
  """[..., M, 4] start with every model's beta set to the across-model median.

  The amplitude, E and the transition size D_t = F^(1 / beta) of each model
  are kept (log F = beta log D_t is recomputed). Non-finite rows stay as they are.
  """
  raw = np.array(raw, np.float64)
  beta = np.logaddexp(0.0, raw[..., 1])
  log_dt = raw[..., 3] / beta
  med = np.nanmedian(np.where(np.isfinite(beta), beta, np.nan), axis=-1, keepdims=True)
  med = np.broadcast_to(med, beta.shape)
  out = raw.copy()
  out[..., 1] = laws.inverse_softplus(med)
  out[..., 3] = med * log_dt
  return out


def _lm_solve(x0, d, y, mask, weight, x_cov, group, cols, delta, floor, num_steps, law):
  """Levenberg-Marquardt from x0 [M*4]; returns (x, J, data part of J)."""
  hat = objective.hat_matrix(x_cov, cols)

  def normal(x):
    return objective.normal_equations(x, d, y, mask, weight, hat, group, delta, floor, law)

  def value(x):
    r = objective.residual_vector(x, d, y, mask, weight, hat, group, delta, floor, law)
    return r @ r

  def body(_, state):
    x, mu, f = state
    a, g, _, _ = normal(x)
    scale = jnp.trace(a) / a.shape[0]
    lhs = a + jnp.diag(mu * (jnp.diag(a) + 1e-9 * scale) + 1e-300)
    # lhs is symmetric positive definite: Cholesky (a failure gives nan, rejected below).
    step = -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(lhs), g)
    xn = x + step
    fn = value(xn)
    ok = jnp.isfinite(fn) & (fn < f) & jnp.all(jnp.isfinite(step))
    x = jnp.where(ok, xn, x)
    f = jnp.where(ok, fn, f)
    mu = jnp.clip(jnp.where(ok, mu / 3.0, mu * 4.0), 1e-12, 1e12)
    return x, mu, f

  f0 = value(x0)
  f0 = jnp.where(jnp.isfinite(f0), f0, jnp.inf)
  x, _, f = jax.lax.fori_loop(0, num_steps, body, (x0, jnp.asarray(1e-3, x0.dtype), f0))
  _, _, f_all, f_data = normal(x)
  return x, f, f_data


@functools.lru_cache(maxsize=16)
def _compiled(num_steps: int):
  law = laws.lensllm_law()
  one = functools.partial(_lm_solve, num_steps=num_steps, law=law)
  # Problems share nothing: vmap over all inputs.
  return jax.jit(jax.vmap(one))


def fit_pooled(init_raw, data_size, log_loss, mask, configs: Sequence[PooledConfig], *,
               covariates, weights=None, group_strength=None,
               num_steps: int = 60, chunk_size: int = 64) -> PooledFit:
  """Pooled MAP fits of V problems at once (float64), from given starting points.

  Args:
    init_raw: [V, M, 4] starting raw parameters (e.g. independent fits from
      `fitting.fit_curves` with `laws.lensllm_law()`); non-finite rows are
      replaced by the law's deterministic initialisation.
    data_size: [V, P] or [V, M, P] data sizes (D = 0 is the zero-shot point).
    log_loss: [V, M, P] observed log L (any value where mask is False).
    mask: [V, M, P] bool, visible points used by the fit.
    configs: V `PooledConfig`s, one per problem.
    covariates: [V, M, 3] from `covariate_matrix` (or [M, 3], shared).
    weights: [V, M, P] point weights; default 1 everywhere, and then each
      config's pre_power_weight is NOT applied (pass weights built with
      `pre_power_weights` to use it).
    group_strength: optional [V, 3] prior strength per quantity (POOLABLE
      order) replacing each config's own (used for empirical Bayes); groups
      not in a config's `pooled` stay 0.
    num_steps: Levenberg-Marquardt steps.
    chunk_size: most problems per compiled call (chunks have this size, or
      max(16, the next power of two >= V) if smaller; problems are
      independent, so the result does not depend on it).

  Returns:
    PooledFit with raw_params [V, M, 4].
  """
  law = laws.lensllm_law()
  with jax.enable_x64(True):
    y = np.asarray(log_loss, np.float64)
    if y.ndim != 3:
      raise ValueError(f"log_loss must be [problems, models, points], got {y.shape}")
    v, m, p = y.shape
    if len(configs) != v:
      raise ValueError(f"{len(configs)} configs for {v} problems")
    d = np.asarray(data_size, np.float64)
    if d.ndim == 2:
      d = np.broadcast_to(d[:, None, :], (v, m, p))
    if d.shape != (v, m, p):
      raise ValueError(f"data_size {np.shape(data_size)} does not match log_loss {y.shape}")
    mk = np.asarray(mask, bool)
    if mk.shape != y.shape:
      raise ValueError(f"mask {mk.shape} does not match log_loss {y.shape}")
    if not mk.any(axis=2).all():
      raise ValueError("fit_pooled: a model has no visible point")
    w = np.ones((v, m, p)) if weights is None else np.asarray(weights, np.float64)
    x_cov = np.asarray(covariates, np.float64)
    if x_cov.ndim == 2:
      x_cov = np.broadcast_to(x_cov, (v, m, x_cov.shape[1]))
    raw0 = np.array(init_raw, np.float64).reshape(v, m, 4)
    bad = ~np.all(np.isfinite(raw0), axis=-1)
    if bad.any():
      fallback = np.asarray(jax.vmap(lambda dd, yy, mm: law.init(
          jax.random.key(0), dd, yy, mm, 1)[0])(
          jnp.asarray(np.where(mk, d, 1.0)[bad]), jnp.asarray(np.where(mk, y, 0.0)[bad]),
          jnp.asarray(mk[bad])))
      raw0[bad] = fallback
    arrs = [c.arrays() for c in configs]
    group = np.stack([a[0] for a in arrs])
    if group_strength is not None:
      on = np.array([[g in c.pooled for g in POOLABLE] for c in configs])
      group = np.where(on, np.asarray(group_strength, np.float64), 0.0)
    if not np.all(np.isfinite(group)):
      raise ValueError("fit_pooled: non-finite prior strength")
    cols = np.stack([a[1] for a in arrs])
    delta = np.array([a[3] for a in arrs])
    floor = np.array([a[4] for a in arrs])
    args = (raw0.reshape(v, m * 4), np.where(mk, d, 1.0), np.where(mk, y, 0.0), mk, w, x_cov,
            group, cols, delta, floor)
    # Chunks of a power-of-two size (the last padded with copies): few compiles per (M, P),
    # bounded memory.
    chunk = min(int(chunk_size), max(16, 1 << max(v - 1, 0).bit_length()))
    outs = []
    for start in range(0, v, chunk):
      idx = np.minimum(np.arange(start, start + chunk), v - 1)
      part = _compiled(int(num_steps))(*[jnp.asarray(a[idx]) for a in args])
      outs.append([np.asarray(o)[:min(chunk, v - start)] for o in jax.device_get(part)])
    x, f, fdata = (np.concatenate([o[k] for o in outs]) for k in range(3))
  return PooledFit(x.reshape(v, m, 4), f, fdata, law)
