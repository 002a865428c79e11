"""The pooled fit's solver: `fitting`'s Levenberg-Marquardt step on the MAP objective, vmapped.

J(theta) = r^T r (`objective.residual_vector`) is minimised over the flat raw
parameters x [4 M] of a problem by Levenberg-Marquardt on the stacked
residual vector [sqrt(w) psi(r) ; sqrt(strength) (I - H) phi ; floor], float64,
with `fitting.scale_by_gauss_newton` (the step of `fitting.fit_curves`'
trust-region engine): with A = Jac^T Jac and g = Jac^T r (Jac the residuals'
Jacobian) from the structured normal equations (`objective.normal_equations`:
4 tangents per model, not 4 M), each step solves

    (A + mu (diag(A) + 1e-9 tr(A) / 4M)) s = -g

by Cholesky (A handed over exactly symmetric, `_solve`) and is accepted when
J decreases; the damping follows Marquardt's schedule (damping_schedule
"accept_reject": mu / 3 after an accepted step, * 4 after a rejected one,
within [1e-12, 1e12], from 1e-3). One derivative pass per step (J, g and A at
the trial point). A fixed number of steps in one `jax.lax.fori_loop`, not
fitting's stopping rule (run to it, the fits ended higher on some problems
and cost ~3x; docs/lensllm_plus.md), `jax.vmap`-ed over problems (chunks of a
power-of-two size) and compiled once per shape.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lensllm_jax import laws
from lensllm_jax.laws import fitting
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


# Settings of the step (`fitting.scale_by_gauss_newton`): the relative diagonal floor of the
# damping term and the damping's start and bounds.
_DIAGONAL_FLOOR = 1e-9
_INIT_DAMPING, _MIN_DAMPING, _MAX_DAMPING = 1e-3, 1e-12, 1e12


def _solve(x0, d, y, mask, weight, x_cov, group, cols, delta, floor, num_steps, law):
  """num_steps Levenberg-Marquardt steps from x0 [M*4]; returns (x, J, data part of J)."""
  problem = (d, y, mask, weight, objective.hat_matrix(x_cov, cols), group, delta, floor)

  def derivatives(x):
    """(J = r^T r, g = Jac^T r, A = Jac^T Jac) at x [M*4].

    (g, A) are half the gradient and Gauss-Newton matrix of J; the step
    solves with both, so the common factor drops out (the predicted
    decrease, which it would scale, is not read by Marquardt's schedule).
    A is made exactly symmetric from its upper triangle (the structured sum
    is symmetric only to rounding, in its prior part), so the engine's
    Cholesky, which symmetrises its input, factors the numbers it is given:
    the upper triangle, as the former private loop's `cho_factor` did (the
    fits are the same to the bit; averaging the triangles moved them by
    rounding, docs/lensllm_plus.md).
    """
    r = objective.residual_vector(x, *problem, law)
    a, g, _, _ = objective.normal_equations(x, *problem, law)
    upper = jnp.arange(a.shape[0])[:, None] <= jnp.arange(a.shape[0])[None, :]
    return r @ r, g, jnp.where(upper, a, a.T)

  optimizer = fitting.scale_by_gauss_newton(
    _INIT_DAMPING, _MIN_DAMPING, _MAX_DAMPING, diagonal_floor=_DIAGONAL_FLOOR,
    damping_schedule="accept_reject")
  f0, g0, a0 = derivatives(x0)
  # A non-finite start value: any finite trial point is accepted.
  state = optimizer.init(x0)._replace(value=jnp.where(jnp.isfinite(f0), f0, jnp.inf),
                                      grad=g0, curvature=a0)

  def body(_, carry):
    x, state = carry
    updates, state = optimizer.update(state.grad, state, x, value=state.value,
                                      curvature=state.curvature, derivatives_fn=derivatives)
    return optax.apply_updates(x, updates), state

  x, state = jax.lax.fori_loop(0, num_steps, body, (x0, state))
  _, _, _, f_data = objective.normal_equations(x, *problem, law)
  return x, state.value, f_data


@functools.lru_cache(maxsize=16)
def _compiled(num_steps: int):
  law = laws.lensllm_law()
  one = functools.partial(_solve, num_steps=num_steps, law=law)
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
      independent, so the result does not depend on it beyond rounding: on
      jax 0.10.2 not at all, on jax 0.12 it moves ill-conditioned fits,
      docs/lensllm_plus.md).

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
