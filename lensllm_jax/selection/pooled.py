"""Pooled (hierarchical) LensLLM curve-mode fits: all models of a task at once.

The law is LensLLM's in curve mode (`laws.lensllm_law()`, F a fitted scalar):

    L_m(D) = B_m / (F_m + D^beta_m) + E_m,     m = 1..M models of one task,

with the raw parameters of `laws.lensllm_law()`:
theta_m = [log(B_m / F_m), softplus^-1(beta_m), log E_m, log F_m].

Independent per-model fits (the published LensLLM / rectified fits) are
unstable at small budgets: a handful of points cannot pin down the exponent
and the floor, and one wild extrapolation ruins the Pearson correlation of the
whole ranking. Here the models of a task are fitted JOINTLY, with an
empirical-Bayes (hierarchical) Gaussian prior that pulls per-model "shape"
quantities towards an across-model mean (or a regression on model
covariates). With

    phi_m = [log beta_m, log E_m, log D_t,m],   D_t,m = F_m^(1 / beta_m)

(D_t is the data size where D^beta = F, i.e. where the curve turns from the
pre-power to the power phase), the MAP objective is

    J(theta) = sum_{m,p} w_mp rho(r_mp)  +  strength * sum_{g in pooled} ||(I - H) phi_{:,g}||^2
               + lambda_E sum_m E_m^2,

    r_mp = log L_m(D_p; theta_m) - log L_mp   (observed, visible points only),
    rho(r) = r^2 (squared) or 2 huber_delta(r) (robust), w_mp point weights,
    H = X (X^T X)^+ X^T the hat matrix of the covariates X [M, C]
        (C = 1: the column of ones, i.e. shrinkage to the across-model mean;
         more columns: the prior mean is a linear function of standardised
         log model size and log zero-shot loss). The prior means are profiled
         out exactly (the hat matrix), which is the MAP of a flat hyper-prior.

(lambda_E, `floor_prior`, optional: a Gaussian prior at 0 on the floor E in
loss units.) `strength` = s^2 / tau^2 is the ratio of the point noise variance to the
prior variance; because the data term is a SUM over points, pooling is
automatically stronger when fewer points are visible. `strength = 0` gives
back independent per-model fits (the published LensLLM curve mode).

Optimisation: Levenberg-Marquardt on the stacked residual vector
[sqrt(w) psi(r) ; sqrt(strength) (I - H) phi] (psi(r)^2 = rho(r)), float64,
a fixed number of steps in one `jax.lax.fori_loop`, `jax.vmap`-ed over
problems (budget views x settings, in chunks of a power-of-two size) and
compiled once per shape. The normal equations are assembled from per-model
Jacobians (`_normal_equations`: 4 tangents per model, not 4 M) and solved by
Cholesky. It starts
from independent fits (`fitting.fit_curves`, best of several restarts per
model: a continuation from strength 0) and from the same fits with every
beta set to the across-model median; the lower MAP objective wins.

Selection: `pooled_lensllm` (one budget view, the signature of the methods in
`selection`) and `pooled_selection` (many views x settings in one batch)
rank models by the pooled fit's L(D*), method name "PooledLensLLM"
(`METHOD_NAME`); they accept
only `core.VisibleCurves`. The early-stopping procedure with this fit
is `plus.candidates.budgeted_candidate_selection` (Pooled candidate). Settings are chosen by
`protocol.leave_one_out`. Under that protocol this fit is the "Pooled"
candidate of `plus.candidates`, and the reported LensLLM+ of
experiments.lensllm_plus is the candidate chosen there (the pooled fit, the
curve PFN, the dynamic-F law or a blend with AtS); single-view
`pooled_lensllm` is the pooled fit with the given (default: untuned) setting.

Measured outcome: results/lensllm_plus/lensllm_plus.md (written by
experiments.lensllm_plus; summarised in docs/lensllm_plus.md).

Everything here is pure; `fit_pooled` enables float64 inside the call.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax import laws
from lensllm_jax.selection import core, metrics

__all__ = [
  "BACKTEST_STRENGTHS",
  "COVARIATES",
  "DEFAULT_CONFIG",
  "METHOD_NAME",
  "POOLABLE",
  "PooledConfig",
  "PooledFit",
  "covariate_matrix",
  "empirical_bayes_strength",
  "fit_pooled",
  "pooled_lensllm",
  "median_beta_start",
  "paule_mandel_tau2",
  "pooled_objective",
  "pooled_selection",
  "pre_power_weights",
  "shape_quantities",
  "view_covariates",
]

POOLABLE = ("beta", "E", "Dt")
COVARIATES = ("none", "size", "size_zero_shot")


@dataclasses.dataclass(frozen=True)
class PooledConfig:
  """Settings (hyper-parameters) of one pooled fit.

  Attributes:
    strength: prior precision ratio s^2 / tau^2 (>= 0); 0 = independent fits.
    pooled: which shape quantities share the prior, a subset of POOLABLE
      ("beta": log beta, "E": log E, "Dt": log of the transition size D_t).
    covariates: prior mean model, one of COVARIATES: "none" (across-model
      mean), "size" (+ standardised log parameter count), "size_zero_shot"
      (+ standardised log zero-shot loss: every model's L(0) must be revealed,
      else `pooled_selection` refuses the view; the others need no zero-shot
      point, nor does the backtest).
    pre_power_weight: weight w of the points before each model's AtS phase
      transition (the zero-shot point included); power-phase points weigh 1.
    huber_delta: None for squared log residuals, else the Huber threshold (in
      log-loss units, or in noise sds if `huber_relative`) of a robust loss.
    huber_relative: if True, the threshold is huber_delta * sigma, sigma the
      point noise sd of the view (sqrt of the s^2 of
      `empirical_bayes_strength`, from the independent fits of the visible
      data): a scale-free threshold (1.345 sigma is the textbook Huber choice).
    empirical_bayes: if True, the prior strength of each pooled quantity g is
      estimated from the visible data (`empirical_bayes_strength`:
      s^2 / tau_g^2) and `strength` is a multiplier kappa on it.
    floor_prior: lambda_E >= 0 of a Gaussian prior centred at 0 on the floor
      E_m itself (loss units): adds lambda_E sum_m E_m^2 to J, pulling the
      saturation level down (0: none).
    backtest: k > 1 chooses the strength per budget view from the visible
      data alone: each strength of BACKTEST_STRENGTHS is fitted on the view
      cut at D_max / k, scored by PearCorr + RelAcc of its predictions of
      the observed losses at the view's largest D against them, and the
      best is refitted on the whole view (`strength` is then ignored; 0 off).
  """
  strength: float = 0.0
  pooled: tuple[str, ...] = ("beta", "E")
  covariates: str = "none"
  pre_power_weight: float = 1.0
  huber_delta: float | None = None
  empirical_bayes: bool = False
  floor_prior: float = 0.0
  backtest: int = 0
  huber_relative: bool = False

  def __post_init__(self):
    if not self.strength >= 0:
      raise ValueError(f"PooledConfig.strength must be >= 0, got {self.strength}")
    bad = [g for g in self.pooled if g not in POOLABLE]
    if bad:
      raise ValueError(f"PooledConfig.pooled: unknown {bad}; expected a subset of {POOLABLE}")
    if self.covariates not in COVARIATES:
      raise ValueError(f"PooledConfig.covariates={self.covariates!r}; expected one of "
                       f"{COVARIATES}")
    if not self.pre_power_weight > 0:
      raise ValueError(f"PooledConfig.pre_power_weight must be > 0, got {self.pre_power_weight}")
    if self.backtest < 0 or self.backtest == 1:
      raise ValueError(f"PooledConfig.backtest must be 0 (off) or > 1, got {self.backtest}")
    if not self.floor_prior >= 0:
      raise ValueError(f"PooledConfig.floor_prior must be >= 0, got {self.floor_prior}")
    if self.huber_delta is not None and not self.huber_delta > 0:
      raise ValueError(f"PooledConfig.huber_delta must be > 0 or None, got {self.huber_delta}")
    if self.huber_relative and self.huber_delta is None:
      raise ValueError("PooledConfig.huber_relative needs a huber_delta (in noise sds)")

  @property
  def name(self) -> str:
    """Short unique label, e.g. 's=0.001,pool=beta+E,cov=none,wpre=1,huber=none'."""
    s = "bt" if self.backtest else f"{self.strength:g}"
    return (f"s={s},pool={'+'.join(self.pooled) or '-'},cov={self.covariates},"
            f"wpre={self.pre_power_weight:g},huber="
            f"{'none' if self.huber_delta is None else f'{self.huber_delta:g}'}"
            + ("sd" if self.huber_relative else "")
            + (",eb" if self.empirical_bayes else "")
            + (f",floor={self.floor_prior:g}" if self.floor_prior else "")
            + (f",backtest={self.backtest}" if self.backtest else ""))

  def arrays(self) -> tuple[np.ndarray, ...]:
    """Traced form: (strength per group [3], covariate column mask [3], w_pre, delta, lambda_E).

    A relative Huber threshold must be resolved first (`pooled_selection` does).
    """
    if self.huber_relative:
      raise ValueError(f"{self.name}: resolve the relative Huber threshold (times the noise sd) "
                       "before fitting; pooled_selection does this")
    group = np.array([self.strength if g in self.pooled else 0.0 for g in POOLABLE])
    cols = {"none": [1, 0, 0], "size": [1, 1, 0], "size_zero_shot": [1, 1, 1]}[self.covariates]
    delta = np.inf if self.huber_delta is None else float(self.huber_delta)
    return (group, np.array(cols, np.float64), np.float64(self.pre_power_weight),
            np.float64(delta), np.float64(self.floor_prior))


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


def view_covariates(view, metadata, use_zero_shot: bool, name: str = "PooledLensLLM") -> np.ndarray:
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


def shape_quantities(raw):
  """phi [..., 3] = [log beta, log E, log D_t] from raw [..., 4] (lensllm order)."""
  beta = jax.nn.softplus(raw[..., 1])
  return jnp.stack([jnp.log(beta), raw[..., 2], raw[..., 3] / beta], axis=-1)


def _hat(x, col_mask):
  """Hat matrix [M, M] of the columns of x [M, C] selected by col_mask [C]."""
  xm = x * col_mask[None, :]
  return xm @ jnp.linalg.pinv(xm, rtol=1e-10)


def _psi(r, delta):
  """Residual transform with psi(r)^2 = r^2 (|r| <= delta) or 2 delta |r| - delta^2."""
  a = jnp.abs(r)
  big = a > delta
  safe = jnp.where(big, 2.0 * delta * a - delta * delta, 1.0)
  return jnp.where(big, jnp.sign(r) * jnp.sqrt(safe), r)


def _residual_vector(x, d, y, mask, weight, hat, group, delta, floor, law):
  """Stacked residuals [M P + 4 M] of one problem; x [M * 4] flat raw params."""
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
    res = _residual_vector(jnp.asarray(np.asarray(raw, np.float64).reshape(-1)),
                           jnp.asarray(np.where(mk, d, 1.0)), jnp.asarray(np.where(mk, y, 0.0)),
                           jnp.asarray(mk), jnp.asarray(w), _hat(jnp.asarray(x), jnp.asarray(cols)),
                           jnp.asarray(group), jnp.asarray(delta), jnp.asarray(floor), law)
    return float(res @ res)


def _normal_equations(x, d, y, mask, weight, hat, group, delta, floor, law):
  """(J^T J [4M, 4M], J^T r [4M], r^T r) of `_residual_vector` without the dense J.

  The data residuals of model m depend on its 4 parameters only, and the prior
  residuals are sqrt(group_g) A phi_{:,g} with A = I - H (symmetric), so

      J^T J = blockdiag_m(sum_p j_mp j_mp^T + floor terms)
              + sum_g group_g (A^T A)[m, m'] dphi_mg dphi_m'g^T,

  which needs 4 forward-mode tangents per model instead of 4 M.
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


def _lm_solve(x0, d, y, mask, weight, x_cov, group, cols, delta, floor, num_steps, law):
  """Levenberg-Marquardt from x0 [M*4]; returns (x, J, data part of J)."""
  hat = _hat(x_cov, cols)

  def normal(x):
    return _normal_equations(x, d, y, mask, weight, hat, group, delta, floor, law)

  def objective(x):
    r = _residual_vector(x, d, y, mask, weight, hat, group, delta, floor, law)
    return r @ r

  def body(_, state):
    x, mu, f = state
    a, g, _, _ = normal(x)
    scale = jnp.trace(a) / a.shape[0]
    lhs = a + jnp.diag(mu * (jnp.diag(a) + 1e-9 * scale) + 1e-300)
    # lhs is symmetric positive definite: Cholesky (a failure gives nan, rejected below).
    step = -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(lhs), g)
    xn = x + step
    fn = objective(xn)
    ok = jnp.isfinite(fn) & (fn < f) & jnp.all(jnp.isfinite(step))
    x = jnp.where(ok, xn, x)
    f = jnp.where(ok, fn, f)
    mu = jnp.clip(jnp.where(ok, mu / 3.0, mu * 4.0), 1e-12, 1e12)
    return x, mu, f

  f0 = objective(x0)
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


# ------------------------------------------------------- empirical Bayes ---


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
  pooled over models; each model's shape quantities phi_m (see module doc)
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


# ------------------------------------------------------------ selection ---

# The pooled fit's method name (tables, registry); "LensLLM+" names only the candidate the
# leave-one-dataset-out protocol chooses (`plus.candidates.PLUS_NAME`).
METHOD_NAME = "PooledLensLLM"


def _view_arrays(views, num_points: int):
  """Padded (d [V, Pp], log L [V, M, Pp], mask [V, M, Pp]) of budget views (all points)."""
  ds, ys, ms = [], [], []
  for v in views:
    p = v.data_sizes.size
    pad = num_points - p
    d = np.concatenate([v.data_sizes, np.full(pad, v.data_sizes[-1])])
    mk = np.concatenate([v.mask, np.zeros((v.num_models, pad), bool)], axis=1)
    y = np.log(np.where(v.mask, v.losses, 1.0))
    y = np.concatenate([y, np.zeros((v.num_models, pad))], axis=1)
    ds.append(d)
    ys.append(np.where(mk, y, 0.0))
    ms.append(mk)
  return np.stack(ds), np.stack(ys), np.stack(ms)


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


BACKTEST_STRENGTHS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)


def _cut_view(view, max_data_num):
  """The part of a VisibleCurves with D <= max_data_num (a budget view itself)."""
  keep = view.data_sizes <= max_data_num
  return core.VisibleCurves(data_sizes=view.data_sizes[keep],
                                 losses=np.where(view.mask, view.losses, 1.0)[:, keep],
                                 mask=view.mask[:, keep], max_data_num=max_data_num)


def _backtest_strengths(views, metadata, configs, *, key, num_restarts, num_steps, fit_options):
  """chosen[config][view] strength; see `PooledConfig.backtest` (visible data only).

  All configs with the same backtest factor share one `pooled_selection` call
  on the cut views (one set of independent fits), candidates config-major.
  """
  chosen = [[c.strength] * len(views) for c in configs]
  for factor in sorted({c.backtest for c in configs if c.backtest}):
    js = [j for j, c in enumerate(configs) if c.backtest == factor]
    subs, targets, idx = [], [], []
    for i, v in enumerate(views):
      cut = _cut_view(v, v.max_data_num / factor)
      last = np.flatnonzero(v.data_sizes > cut.data_sizes[-1])
      # Needs two fine-tuning points below the cut and a visible point above it.
      positive = cut.mask[:, cut.data_sizes > 0]  # the zero-shot column may be absent
      if (cut.data_sizes > 0).sum() < 2 or last.size == 0 or not positive.any(1).all():
        continue
      col = last[-1]
      subs.append(cut)
      targets.append((v.data_sizes[col], v.losses[:, col], v.mask[:, col]))
      idx.append(i)
    if not subs:
      continue
    cands = [dataclasses.replace(configs[j], strength=s, backtest=0)
             for j in js for s in BACKTEST_STRENGTHS]
    res = pooled_selection(subs, metadata, cands, key=key, num_restarts=num_restarts,
                           num_steps=num_steps, fit_options=fit_options)
    ns = len(BACKTEST_STRENGTHS)
    for q, j in enumerate(js):
      for k, i in enumerate(idx):
        d_t, obs, ok = targets[k]
        best, best_val = configs[j].strength, -np.inf
        for c, s in enumerate(BACKTEST_STRENGTHS):
          pred = res[k][q * ns + c].predictor.predict([d_t])[:, 0]
          good = ok & np.isfinite(pred)
          if good.sum() < 3:
            continue
          pc = metrics.pearson_corr(pred[good], obs[good])
          ra = metrics.relative_accuracy(int(np.argmin(pred[good])), obs[good])
          val = (pc if np.isfinite(pc) else -1.0) + ra
          if val > best_val:
            best, best_val = s, val
        chosen[j][i] = best
  return chosen


def pooled_selection(views, metadata, configs: Sequence[PooledConfig], *, key: jax.Array,
                     num_restarts: int = 8, num_steps: int = 60, fit_options=None,
                     name: str = METHOD_NAME, num_points: int = 0):
  """The pooled fit on several budget views x settings: results[view][config].

  Step 1: independent LensLLM curve-mode fits of every model and view
  (`core.fit_law_views`, best of `num_restarts`); step 2: the pooled
  MAP fit of each (view, config) started there (`fit_pooled`); the
  prediction is L(D*) of the pooled fit. The AtS phase test (for the point
  weights) reads the same view. Only `VisibleCurves` views are read, so the
  budget is enforced by construction.

  Args:
    views: sequence of `core.VisibleCurves` over the same M models.
    metadata: `core.Metadata` (sizes for covariates, D*).
    configs: settings to run on every view.
    key: PRNG key of the independent fits' restarts.
    num_restarts, fit_options: passed to the independent fits.
    num_steps: Levenberg-Marquardt steps of the pooled fit.
    name: method name in the results.
    num_points: pad the point axis to at least this many points (fixed
      shapes across calls: one compile for a sequence of growing views).

  Returns:
    list over views of lists over configs of `core.SelectionResult`
    (predicted = feature = L(D*) [M]; predictor: `core.LawPredictor` of
    the pooled fit (raw params [M, 4] of `laws.lensllm_law()`); extras:
    config, data_sizes, mask, independent_raw [M, 4], ...).
  """
  views = list(views)
  for v in views:
    if not isinstance(v, core.VisibleCurves):
      raise TypeError(f"{name} reads budget views only (core.VisibleCurves, built by "
                      f"selection.visible_view), got {type(v).__name__}")
  configs = list(configs)
  # Covariates first: a missing zero-shot loss is refused before any fit.
  needs_zero_shot = any(c.covariates == "size_zero_shot" for c in configs)
  cov = [view_covariates(v, metadata, needs_zero_shot, name) for v in views]
  law = laws.lensllm_law()
  chosen_strength = [[c.strength] * len(views) for c in configs]
  if any(c.backtest for c in configs):
    chosen_strength = _backtest_strengths(views, metadata, configs, key=key,
                                          num_restarts=num_restarts, num_steps=num_steps,
                                          fit_options=fit_options)
  resolved = [[dataclasses.replace(c, strength=chosen_strength[j][i], backtest=0)
               for j, c in enumerate(configs)] for i in range(len(views))]
  indep = core.fit_law_views("LensLLM", law, views, metadata, key=key,
                                  use_zero_shot=True, num_restarts=num_restarts,
                                  fit_options=fit_options)
  num_points = max(int(num_points), max(v.data_sizes.size for v in views))
  d, y, mk = _view_arrays(views, num_points)
  nv = len(views)
  first_d = []
  for v in views:
    a = core.ats(v, metadata)
    first_d.append(a.predictor.first_power_data_size)
  # Problems: view-major, config-minor.
  vi = np.repeat(np.arange(nv), len(configs))
  ci = np.tile(np.arange(len(configs)), nv)
  pcfg = [resolved[i][c] for i, c in zip(vi, ci, strict=True)]
  weights = np.stack([pre_power_weights(d[i], first_d[i], configs[c].pre_power_weight)
                      for i, c in zip(vi, ci, strict=True)])
  init = np.stack([indep[i].predictor.raw_params for i in vi])
  eb = [None] * nv
  if any(c.empirical_bayes or c.huber_relative for c in configs):
    eb = [empirical_bayes_strength(indep[i].predictor.raw_params, d[i], y[i], mk[i])
          for i in range(nv)]
  # A relative Huber threshold becomes delta * sigma of the view (visible data only).
  pcfg = [dataclasses.replace(pc, huber_relative=False, huber_delta=pc.huber_delta * max(
              np.sqrt(eb[i][1]["s2"]), 1e-12)) if pc.huber_relative else pc
          for i, pc in zip(vi, pcfg, strict=True)]
  group = np.stack([pc.strength * eb[i][0] if pc.empirical_bayes else pc.arrays()[0]
                    for i, pc in zip(vi, pcfg, strict=True)])
  # Two starts per problem (independent fits; the same with the median beta),
  # the lower MAP objective wins: the joint problem is non-convex.
  n = init.shape[0]
  starts = np.concatenate([init, median_beta_start(init)])
  both = fit_pooled(starts, np.concatenate([d[vi]] * 2), np.concatenate([y[vi]] * 2),
                    np.concatenate([mk[vi]] * 2), pcfg * 2,
                    covariates=np.stack([cov[i] for i in vi] * 2),
                    weights=np.concatenate([weights] * 2), group_strength=np.concatenate(
                        [group] * 2), num_steps=num_steps)
  obj = np.where(np.isfinite(both.objective), both.objective, np.inf)
  pick = np.where(obj[n:] < obj[:n], n + np.arange(n), np.arange(n))
  fit = PooledFit(both.raw_params[pick], both.objective[pick], both.data_objective[pick],
                  both.law)
  pred = fit.predict(np.array([metadata.target_data_num]))[..., 0]  # [V * C, M]
  out = []
  for i, v in enumerate(views):
    row = []
    for j, cfg in enumerate(configs):
      k = i * len(configs) + j
      p = pred[k]
      bad = ~np.isfinite(p)
      feature = p.copy()
      if bad.any():
        feature[bad] = core.last_visible_loss(v)[0][bad]
      status = tuple("nonfinite" if b else "ok" for b in bad)
      row.append(core.SelectionResult(
          name, feature, core.rank_by(feature), predicted=p, status=status,
          predictor=core.LawPredictor(law, fit.raw_params[k]),
          extras={"config": cfg,
                  "objective": float(fit.objective[k]), "data_sizes": v.data_sizes,
                  "mask": v.mask, "independent_raw": indep[i].predictor.raw_params,
                  "group_strength": group[k], "strength": chosen_strength[j][i],
                  "empirical_bayes": None if eb[i] is None else eb[i][1]}))
    out.append(row)
  return out


def pooled_lensllm(visible, metadata, *, key: jax.Array, config: PooledConfig | None = None,
                   num_restarts: int = 8, num_steps: int = 60, fit_options=None):
  """The pooled LensLLM fit's selection on one budget view (signature of `selection` methods).

  Args:
    visible: `core.VisibleCurves` (the budget-limited curves).
    metadata: `core.Metadata`.
    key: PRNG key of the independent fits.
    config: settings; default `DEFAULT_CONFIG` (the leave-one-dataset-out
      choice is made by `protocol.leave_one_out`; pass it here).

  Returns:
    `core.SelectionResult` named `METHOD_NAME` ("PooledLensLLM").
  """
  cfg = DEFAULT_CONFIG if config is None else config
  return pooled_selection([visible], metadata, [cfg], key=key, num_restarts=num_restarts,
                          num_steps=num_steps, fit_options=fit_options)[0][0]


# A middle-of-the-grid default for direct calls, NOT a tuned value; experiments
# choose settings with `protocol.leave_one_out` instead.
DEFAULT_CONFIG = PooledConfig(strength=1e-2, pooled=("beta",), covariates="none")
