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

    J(theta) = sum_{m,p} w_mp rho(r_mp)  +  strength * sum_{g in pooled} ||(I - H) phi_{:,g}||^2,

    r_mp = log L_m(D_p; theta_m) - log L_mp   (observed, visible points only),
    rho(r) = r^2 (squared) or 2 huber_delta(r) (robust), w_mp point weights,
    H = X (X^T X)^+ X^T the hat matrix of the covariates X [M, C]
        (C = 1: the column of ones, i.e. shrinkage to the across-model mean;
         more columns: the prior mean is a linear function of standardised
         log model size and log zero-shot loss). The prior means are profiled
         out exactly (the hat matrix), which is the MAP of a flat hyper-prior.

`strength` = s^2 / tau^2 is the ratio of the point noise variance to the
prior variance; because the data term is a SUM over points, pooling is
automatically stronger when fewer points are visible. `strength = 0` gives
back independent per-model fits (the published LensLLM curve mode).

Optimisation: Levenberg-Marquardt on the stacked residual vector
[sqrt(w) psi(r) ; sqrt(strength) (I - H) phi] (psi(r)^2 = rho(r)), float64,
a fixed number of steps in one `jax.lax.fori_loop`, `jax.vmap`-ed over
problems (budget views x settings) and compiled once per shape. It starts
from independent fits (`fitting.fit_curves`, best of several restarts per
model): a continuation from strength 0.

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

__all__ = [
  "POOLABLE",
  "COVARIATES",
  "PooledConfig",
  "PooledFit",
  "covariate_matrix",
  "fit_pooled",
  "pooled_objective",
  "shape_quantities",
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
      (+ standardised log zero-shot loss).
    pre_power_weight: weight w of the points before each model's AtS phase
      transition (the zero-shot point included); power-phase points weigh 1.
    huber_delta: None for squared log residuals, else the Huber threshold (in
      log-loss units) of a robust loss.
  """
  strength: float = 0.0
  pooled: tuple[str, ...] = ("beta", "E")
  covariates: str = "none"
  pre_power_weight: float = 1.0
  huber_delta: float | None = None

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
    if self.huber_delta is not None and not self.huber_delta > 0:
      raise ValueError(f"PooledConfig.huber_delta must be > 0 or None, got {self.huber_delta}")

  @property
  def name(self) -> str:
    """Short unique label, e.g. 's=0.001,pool=beta+E,cov=none,wpre=1,huber=none'."""
    return (f"s={self.strength:g},pool={'+'.join(self.pooled) or '-'},cov={self.covariates},"
            f"wpre={self.pre_power_weight:g},huber="
            f"{'none' if self.huber_delta is None else f'{self.huber_delta:g}'}")

  def arrays(self) -> tuple[np.ndarray, ...]:
    """Traced form: (strength per group [3], covariate column mask [3], w_pre, delta)."""
    group = np.array([self.strength if g in self.pooled else 0.0 for g in POOLABLE])
    cols = {"none": [1, 0, 0], "size": [1, 1, 0], "size_zero_shot": [1, 1, 1]}[self.covariates]
    delta = np.inf if self.huber_delta is None else float(self.huber_delta)
    return group, np.array(cols, np.float64), np.float64(self.pre_power_weight), np.float64(delta)


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


def _residual_vector(x, d, y, mask, weight, hat, group, delta, law):
  """Stacked residuals [M P + 3 M] of one problem; x [M * 4] flat raw params."""
  m = y.shape[0]
  raw = x.reshape(m, 4)
  pred = jax.vmap(law.log_loss_fn, in_axes=(0, 0, None))(raw, d, None)
  r = jnp.where(mask, pred - y, 0.0)
  data = jnp.sqrt(weight) * _psi(r, delta)
  phi = shape_quantities(raw)
  prior = jnp.sqrt(group)[None, :] * (phi - hat @ phi)
  return jnp.concatenate([data.reshape(-1), prior.reshape(-1)])


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
    group, cols, _, delta = config.arrays()
    law = laws.lensllm_law()
    res = _residual_vector(jnp.asarray(np.asarray(raw, np.float64).reshape(-1)),
                           jnp.asarray(np.where(mk, d, 1.0)), jnp.asarray(np.where(mk, y, 0.0)),
                           jnp.asarray(mk), jnp.asarray(w), _hat(jnp.asarray(x), jnp.asarray(cols)),
                           jnp.asarray(group), jnp.asarray(delta), law)
    return float(res @ res)


def _lm_solve(x0, d, y, mask, weight, x_cov, group, cols, delta, num_steps, law):
  """Levenberg-Marquardt from x0 [M*4]; returns (x, J, data part of J)."""
  hat = _hat(x_cov, cols)

  def res(x):
    return _residual_vector(x, d, y, mask, weight, hat, group, delta, law)

  n_data = y.size

  def body(_, state):
    x, mu, f = state
    r = res(x)
    jac = jax.jacfwd(res)(x)
    a = jac.T @ jac
    g = jac.T @ r
    scale = jnp.trace(a) / a.shape[0]
    lhs = a + jnp.diag(mu * (jnp.diag(a) + 1e-9 * scale) + 1e-300)
    step = -jnp.linalg.solve(lhs, g)
    xn = x + step
    rn = res(xn)
    fn = rn @ rn
    ok = jnp.isfinite(fn) & (fn < f) & jnp.all(jnp.isfinite(step))
    x = jnp.where(ok, xn, x)
    f = jnp.where(ok, fn, f)
    mu = jnp.clip(jnp.where(ok, mu / 3.0, mu * 4.0), 1e-12, 1e12)
    return x, mu, f

  r0 = res(x0)
  f0 = jnp.where(jnp.all(jnp.isfinite(r0)), r0 @ r0, jnp.inf)
  x, _, f = jax.lax.fori_loop(0, num_steps, body, (x0, jnp.asarray(1e-3, x0.dtype), f0))
  r = res(x)
  return x, f, r[:n_data] @ r[:n_data]


@functools.lru_cache(maxsize=16)
def _compiled(num_steps: int):
  law = laws.lensllm_law()
  one = functools.partial(_lm_solve, num_steps=num_steps, law=law)
  # Problems share nothing: vmap over all inputs.
  return jax.jit(jax.vmap(one))


def fit_pooled(init_raw, data_size, log_loss, mask, configs: Sequence[PooledConfig], *,
               covariates, weights=None, num_steps: int = 60) -> PooledFit:
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
    num_steps: Levenberg-Marquardt steps.

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
    cols = np.stack([a[1] for a in arrs])
    delta = np.array([a[3] for a in arrs])
    x, f, fdata = _compiled(int(num_steps))(
        jnp.asarray(raw0.reshape(v, m * 4)), jnp.asarray(np.where(mk, d, 1.0)),
        jnp.asarray(np.where(mk, y, 0.0)), jnp.asarray(mk), jnp.asarray(w), jnp.asarray(x_cov),
        jnp.asarray(group), jnp.asarray(cols), jnp.asarray(delta))
    x, f, fdata = jax.device_get((x, f, fdata))
  return PooledFit(np.asarray(x).reshape(v, m, 4), f, fdata, law)


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


# ------------------------------------------------------------ selection ---

METHOD_NAME = "LensLLM+"


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


def pooled_selection(views, metadata, configs: Sequence[PooledConfig], *, key: jax.Array,
                     num_restarts: int = 8, num_steps: int = 60, fit_options=None,
                     name: str = METHOD_NAME):
  """LensLLM+ on several budget views x settings: results[view][config].

  Step 1: independent LensLLM curve-mode fits of every model and view
  (`selection.fit_law_views`, best of `num_restarts`); step 2: the pooled
  MAP fit of each (view, config) started there (`fit_pooled`); the
  prediction is L(D*) of the pooled fit. The AtS phase test (for the point
  weights) reads the same view. Only `VisibleCurves` views are read, so the
  budget is enforced by construction.

  Args:
    views: sequence of `selection.VisibleCurves` over the same M models.
    metadata: `selection.Metadata` (sizes for covariates, D*).
    configs: settings to run on every view.
    key: PRNG key of the independent fits' restarts.
    num_restarts, fit_options: passed to the independent fits.
    num_steps: Levenberg-Marquardt steps of the pooled fit.
    name: method name in the results.

  Returns:
    list over views of lists over configs of `selection.SelectionResult`
    (predicted = feature = L(D*) [M]; extras: law, raw_params [M, 4],
    config, data_sizes, mask, independent_raw [M, 4]).
  """
  from lensllm_jax import selection  # selection may register this method: import late.

  views = list(views)
  for v in views:
    if not isinstance(v, selection.VisibleCurves):
      raise TypeError(f"{name} reads budget views only (selection.VisibleCurves, built by "
                      f"selection.visible_view), got {type(v).__name__}")
  configs = list(configs)
  law = laws.lensllm_law()
  indep = selection.fit_law_views("LensLLM", law, views, metadata, key=key,
                                  use_zero_shot=True, num_restarts=num_restarts,
                                  fit_options=fit_options)
  num_points = max(v.data_sizes.size for v in views)
  d, y, mk = _view_arrays(views, num_points)
  nv, m = len(views), views[0].num_models
  first_d = []
  for v in views:
    a = selection.ats(v, metadata)
    first_d.append(a.extras["data_sizes"][a.extras["first_index"]])
  cov = [covariate_matrix(metadata.sizes, v.column(0.0) if v.data_sizes[0] == 0
                          else np.ones(m)) for v in views]
  # Problems: view-major, config-minor.
  vi = np.repeat(np.arange(nv), len(configs))
  ci = np.tile(np.arange(len(configs)), nv)
  weights = np.stack([pre_power_weights(d[i], first_d[i], configs[c].pre_power_weight)
                      for i, c in zip(vi, ci, strict=True)])
  init = np.stack([indep[i].extras["raw_params"] for i in vi])
  fit = fit_pooled(init, d[vi], y[vi], mk[vi], [configs[c] for c in ci],
                   covariates=np.stack([cov[i] for i in vi]), weights=weights,
                   num_steps=num_steps)
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
        feature[bad] = selection.last_visible_loss(v)[0][bad]
      status = tuple("nonfinite" if b else "ok" for b in bad)
      row.append(selection.SelectionResult(
          name, feature, selection.rank_by(feature), predicted=p, status=status,
          extras={"law": law, "raw_params": fit.raw_params[k], "config": cfg,
                  "objective": float(fit.objective[k]), "data_sizes": v.data_sizes,
                  "mask": v.mask, "independent_raw": indep[i].extras["raw_params"]}))
    out.append(row)
  return out


def lensllm_plus(visible, metadata, *, key: jax.Array, config: PooledConfig | None = None,
                 num_restarts: int = 8, num_steps: int = 60, fit_options=None):
  """LensLLM+ selection on one budget view (signature of `selection` methods).

  Args:
    visible: `selection.VisibleCurves` (the budget-limited curves).
    metadata: `selection.Metadata`.
    key: PRNG key of the independent fits.
    config: settings; default `DEFAULT_CONFIG` (the leave-one-dataset-out
      choice is made by `protocol.leave_one_out`; pass it here).

  Returns:
    `selection.SelectionResult` named "LensLLM+".
  """
  cfg = DEFAULT_CONFIG if config is None else config
  return pooled_selection([visible], metadata, [cfg], key=key, num_restarts=num_restarts,
                          num_steps=num_steps, fit_options=fit_options)[0][0]


# A middle-of-the-grid default for direct calls; experiments choose settings
# with `protocol.leave_one_out` instead.
DEFAULT_CONFIG = PooledConfig(strength=1e-3, pooled=("beta", "E"), covariates="none")
