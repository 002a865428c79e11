"""The pooled fit's MAP objective: residuals, shape quantities, covariates, normal equations.

For M models of one task with raw LensLLM parameters theta_m (K = 4,
`laws.lensllm_law()` order) and shape quantities

    phi_m = [log beta_m, log E_m, log D_t,m],   D_t,m = F_m^(1 / beta_m),

the objective is J(theta) = r^T r of the stacked residual vector

    r = [sqrt(w_mp) psi(r_mp)  (m, p: M P data residuals, 0 where not visible);
         sqrt(group_g) ((I - H) phi_{:,g})_m  (M x 3 prior residuals);
         sqrt(lambda_E) E_m  (M floor residuals)],

r_mp = log L_m(D_p; theta_m) - log L_mp, psi(r)^2 = r^2 (|r| <= delta) or
2 delta |r| - delta^2 (Huber), H = X (X^T X)^+ X^T the hat matrix of the
covariates X [M, C] selected by the config. All float64 (callers enable x64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax import laws
from lensllm_jax.selection.pooled.config import METHOD_NAME, PooledConfig

__all__ = ["covariate_matrix", "hat_matrix", "normal_equations", "pooled_objective",
           "pre_power_weights", "residual_vector", "shape_quantities", "view_covariates"]


def covariate_matrix(sizes, zero_shot_loss) -> np.ndarray:
  """[M, 3] covariates: ones, standardised log size, standardised log zero-shot loss.

  A covariate that is constant across models is set to 0 (the hat matrix then
  ignores it).
  """
  def z(x):
    x = np.log(np.asarray(x, np.float64))
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
  sizes = np.asarray(sizes, np.float64)
  return np.stack([np.ones_like(sizes), z(sizes), z(zero_shot_loss)], axis=-1)


def view_covariates(view, metadata, use_zero_shot: bool, name: str = METHOD_NAME) -> np.ndarray:
  """`covariate_matrix` [M, 3] of one budget view.

  The zero-shot loss L(0) is read only when a setting uses it (covariates
  "size_zero_shot"); then every model must have it revealed, else a
  ValueError names the models that lack it. Otherwise the view needs no
  zero-shot point (its column is constant, i.e. 0, and unused).
  """
  m = view.num_models
  if not use_zero_shot:
    return covariate_matrix(metadata.sizes, np.ones(m))
  has_zero = view.data_sizes.size > 0 and view.data_sizes[0] == 0
  revealed = view.mask[:, 0] if has_zero else np.zeros(m, bool)
  if not revealed.all():
    missing = [metadata.models[i] for i in np.flatnonzero(~revealed)]
    raise ValueError(f"{name}: covariates='size_zero_shot' needs the zero-shot loss L(0) of "
                     f"every model; the view with D_max={view.max_data_num:g} lacks it for "
                     f"{missing}")
  return covariate_matrix(metadata.sizes, view.losses[:, 0])


def pre_power_weights(data_size, first_power_data_size, w_pre: float) -> np.ndarray:
  """[M, P] weights: w_pre for D < the model's first power-phase D, else 1.

  Args:
    data_size: [P] data sizes (D = 0 included).
    first_power_data_size: [M] data size of each model's first power-phase point
      (e.g. from the AtS test).
    w_pre: weight of the earlier points (the zero-shot point included).
  """
  d = np.asarray(data_size, np.float64)[None, :]
  first = np.asarray(first_power_data_size, np.float64)[:, None]
  return np.where(d < first, float(w_pre), 1.0)


def shape_quantities(raw):
  """phi [..., 3] = [log beta, log E, log D_t] from raw [..., 4] (lensllm order)."""
  beta = jax.nn.softplus(raw[..., 1])
  return jnp.stack([jnp.log(beta), raw[..., 2], raw[..., 3] / beta], axis=-1)


def hat_matrix(x, col_mask):
  """Hat matrix [M, M] of the columns of x [M, C] selected by col_mask [C]."""
  xm = x * col_mask[None, :]
  return xm @ jnp.linalg.pinv(xm, rtol=1e-10)


def _psi(r, delta):
  """Residual transform with psi(r)^2 = r^2 (|r| <= delta) or 2 delta |r| - delta^2."""
  a = jnp.abs(r)
  big = a > delta
  safe = jnp.where(big, 2.0 * delta * a - delta * delta, 1.0)
  return jnp.where(big, jnp.sign(r) * jnp.sqrt(safe), r)


def residual_vector(x, d, y, mask, weight, hat, group, delta, floor, law):
  """Stacked residuals r [M P + 3 M + M] of one problem (module docstring).

  Args:
    x: [M * 4] flat raw parameters; d, y, mask, weight: [M, P] (d and y any
      finite value where mask is False); hat: [M, M] (`hat_matrix`); group:
      [3] prior strengths (POOLABLE order); delta: Huber threshold (inf:
      squares); floor: lambda_E; law: `laws.lensllm_law()`.
  """
  m = y.shape[0]
  raw = x.reshape(m, 4)
  pred = jax.vmap(law.log_loss_fn, in_axes=(0, 0, None))(raw, d, None)
  r = jnp.where(mask, pred - y, 0.0)
  data = jnp.sqrt(weight) * _psi(r, delta)
  phi = shape_quantities(raw)
  prior = jnp.sqrt(group)[None, :] * (phi - hat @ phi)
  floor_res = jnp.sqrt(floor) * jnp.exp(raw[:, 2])
  return jnp.concatenate([data.reshape(-1), prior.reshape(-1), floor_res])


def pooled_objective(raw, data_size, log_loss, mask, config: PooledConfig, *, covariates=None,
                     weight=None):
  """J(theta) of one problem (float64 numpy scalar), for checks and tests.

  Args:
    raw: [M, 4] raw parameters.
    data_size: [P] or [M, P] data sizes; log_loss, mask: [M, P].
    config: the settings (strength, pooled groups, covariates, Huber).
    covariates: [M, 3] from `covariate_matrix` (default: ones only used).
    weight: [M, P] point weights (default 1).
  """
  with jax.enable_x64(True):
    y = np.asarray(log_loss, np.float64)
    m, p = y.shape
    d = np.broadcast_to(np.asarray(data_size, np.float64), (m, p))
    mk = np.asarray(mask, bool)
    x = np.ones((m, 3)) if covariates is None else np.asarray(covariates, np.float64)
    w = np.ones((m, p)) if weight is None else np.asarray(weight, np.float64)
    group, cols, _, delta, floor = config.arrays()
    law = laws.lensllm_law()
    res = residual_vector(jnp.asarray(np.asarray(raw, np.float64).reshape(-1)),
                          jnp.asarray(np.where(mk, d, 1.0)), jnp.asarray(np.where(mk, y, 0.0)),
                          jnp.asarray(mk), jnp.asarray(w),
                          hat_matrix(jnp.asarray(x), jnp.asarray(cols)), jnp.asarray(group),
                          jnp.asarray(delta), jnp.asarray(floor), law)
    return float(res @ res)


def normal_equations(x, d, y, mask, weight, hat, group, delta, floor, law):
  """(J^T J [4M, 4M], J^T r [4M], r^T r, data part) of `residual_vector`, without the dense J.

  Same arguments as `residual_vector`. The data residuals of model m depend
  on its 4 parameters only, and the prior residuals are sqrt(group_g) A
  phi_{:,g} with A = I - H (symmetric), so

      J^T J = blockdiag_m(sum_p j_mp j_mp^T + floor terms)
              + sum_g group_g (A^T A)[m, m'] dphi_mg dphi_m'g^T,

  which needs 4 forward-mode tangents per model instead of 4 M. The data
  part is sum_mp w_mp psi(r_mp)^2.
  """
  m = y.shape[0]
  raw = x.reshape(m, 4)

  def data_one(theta, dd, yy, mm, ww):
    r = jnp.where(mm, law.log_loss_fn(theta, dd, None) - yy, 0.0)
    return jnp.sqrt(ww) * _psi(r, delta)

  rd = jax.vmap(data_one)(raw, d, y, mask, weight)                    # [M, P]
  jd = jax.vmap(jax.jacfwd(data_one))(raw, d, y, mask, weight)        # [M, P, 4]
  phi = shape_quantities(raw)                                         # [M, 3]
  dphi = jax.vmap(jax.jacfwd(shape_quantities))(raw)                  # [M, 3, 4]
  a_mat = jnp.eye(m) - hat
  rp = jnp.sqrt(group)[None, :] * (a_mat @ phi)                       # [M, 3]
  fl = jnp.sqrt(floor) * jnp.exp(raw[:, 2])                           # [M]
  e2 = jnp.zeros(4).at[2].set(1.0)
  block = jnp.einsum("mpk,mpl->mkl", jd, jd) + (fl * fl)[:, None, None] * jnp.outer(e2, e2)
  ata = a_mat.T @ a_mat
  prior = jnp.einsum("g,ab,agk,bgl->akbl", group, ata, dphi, dphi).reshape(4 * m, 4 * m)
  jtj = prior + jnp.einsum("akl,ab->akbl", block, jnp.eye(m)).reshape(4 * m, 4 * m)
  g = (jnp.einsum("mpk,mp->mk", jd, rd)
       + jnp.einsum("g,mgk,mg->mk", jnp.sqrt(group), dphi, a_mat.T @ rp)
       + (fl * fl)[:, None] * e2[None, :])
  f = jnp.sum(rd * rd) + jnp.sum(rp * rp) + jnp.sum(fl * fl)
  return jtj, g.reshape(-1), f, jnp.sum(rd * rd)
