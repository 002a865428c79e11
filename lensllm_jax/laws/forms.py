"""Fine-tuning laws L(D) in log space, with constraints by re-parametrisation.

D is the number of fine-tuning samples, L the test loss. Three laws
(docs/laws.md):

  vanilla    L(D) = (B / D^beta + E)^alpha          (Lin et al. 2024, "vanilla")
  rectified  L(D) = B / (D_l + D^beta) + E          (Lin et al. 2024)
  lensllm    L(D) = B / (F + D^beta) + E            (Zeng et al. 2025, eq. 10)

For lensllm, F is either a fitted scalar F >= 0 ("curve mode", same
functional form as the rectified law) or F = f_term(t, aux), a jax-traceable
function of a fitted time t >= 0 and per-curve data `aux` (e.g. NTK
eigenvalues and projections, "NTK mode").

A law is a `Law` object whose `log_loss(raw [K], data_size [P], aux) -> [P]`
returns log L for one curve from unconstrained raw parameters; `constrain`
maps raw to the named parameters. All positive parameters are `exp` (scales:
B, D_l, E, F, t) or `softplus` (exponents: alpha, beta) of raw values, so
any raw vector is feasible and no clipping is ever done. log L is assembled
with logaddexp / softplus, so it stays finite where the loss itself would
under- or overflow.

D = 0 (the zero-shot point):
  * rectified and lensllm follow the published code of Lin et al. (their
    `our_fit_select` feeds log(1e-10) for D = 0): every D < `zero_data_size`
    (default 1e-10) is evaluated at D = `zero_data_size`, so
    L(0) = B / (D_l + 1e-10^beta) + E, which is B / D_l + E up to 1e-10^beta.
  * vanilla is undefined at D = 0 (it diverges); `log_loss` returns +inf
    there and `valid_data_size` is False, so `fitting.fit_curves` drops the
    point through the mask (the published vanilla fit never uses D = 0).

Objectives (as published): rectified and lensllm minimise the mean over
valid points of (log L_pred - log L)^2; vanilla minimises the sum of Huber
losses of the same residuals with delta = 1e-3 (Lin et al., `fit_vanilla_law`).

Restarts (what was adopted from Lin et al.'s `fit_law.py`): their rectified
fit starts from A = max L, E = exp((log max L + log min L) / 2), D_l = 1
(their B = 0), beta = 1, and uses that same start on every repeat; it is our
restart 0 for rectified / lensllm. Their vanilla fit draws each of
(alpha, B', beta, E) from U(0, 1) for 10 restarts; our vanilla restarts 1..R-1
do the same (with B = 1 / B'). Our other restarts are random (see each
initialiser). Lin et al. optimise with scipy BFGS (rectified: a two-stage
surrogate fit); we do not copy that, `fitting.fit_curves` minimises the
objective directly.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "Law",
  "inverse_softplus",
  "lensllm_law",
  "rectified_law",
  "tie_break_law",
  "vanilla_law",
  "LAW_FACTORIES",
  "get_law",
]

Array = jax.Array
NUM_INIT_UNIFORMS = 4  # U(0, 1) draws per restart used by the initialisers
ZERO_DATA_SIZE = 1e-10  # published stand-in for D = 0 (Lin et al.)
VANILLA_HUBER_DELTA = 1e-3  # published delta of the vanilla law's Huber loss


def inverse_softplus(x):
  """raw with softplus(raw) = x for x > 0 (numpy or jax), stable for small/large x."""
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.asarray(x, dtype=xp.float64) if xp is np else x
  return x + xp.log(-xp.expm1(-x))


@dataclasses.dataclass(frozen=True, eq=False)
class Law:
  """A fine-tuning law in log space (see module docstring).

  Attributes:
    name: "vanilla", "rectified" or "lensllm".
    param_names: names of the K constrained parameters, in raw order.
    log_loss_fn: (raw [K], data_size [P], aux) -> log L [P].
    constrain_fn: raw [..., K] -> dict name -> [...] constrained values.
    unconstrain_fn: dict name -> [...] -> raw [..., K] (inverse of constrain).
    init_fn: (u [R, NUM_INIT_UNIFORMS], data_size [P], log_loss [P], mask [P], aux)
      -> raw [R, K] restart starting points from U(0, 1) draws u (row 0 unused:
      restart 0 is deterministic).
    loss: "squared" (mean of squared log residuals) or "huber" (sum of Huber).
    huber_delta: Huber threshold in log-loss units (loss == "huber").
    zero_data_size: stand-in for D = 0, or None when D <= 0 is invalid.
    uses_aux: whether log_loss_fn reads per-curve aux data (NTK mode).
    log_loss_derivatives_fn: optional closed form (raw [K], data_size [P], aux)
      -> (log L [P], d log L / d raw [P, K], d^2 log L / d raw^2 [P, K, K]),
      used by `objective_derivatives` instead of automatic differentiation.
    tie_break: weight tau >= 0 of the term tau / 2 sum_p r_p^2 added to the
      objective (0 for the published objectives; `tie_break_law` gives the
      canonical stage of `fitting.fit_curves` its law).
  """
  name: str
  param_names: tuple[str, ...]
  log_loss_fn: Callable[..., Array]
  constrain_fn: Callable[[Any], dict]
  unconstrain_fn: Callable[[Mapping[str, Any]], Any]
  init_fn: Callable[..., Array]
  loss: str = "squared"
  huber_delta: float = VANILLA_HUBER_DELTA
  zero_data_size: float | None = ZERO_DATA_SIZE
  uses_aux: bool = False
  log_loss_derivatives_fn: Callable[..., tuple[Array, Array, Array]] | None = None
  tie_break: float = 0.0

  @property
  def num_params(self) -> int:
    return len(self.param_names)

  def log_loss(self, raw: Array, data_size: Array, aux: Any = None) -> Array:
    """log L [P] at data sizes [P] for one curve's raw parameters [K]."""
    return self.log_loss_fn(raw, data_size, aux)

  def constrain(self, raw) -> dict:
    """dict name -> constrained value(s) from raw [..., K] (jax or numpy)."""
    return self.constrain_fn(raw)

  def unconstrain(self, params: Mapping[str, Any]):
    """raw [..., K] from a dict of constrained values (inverse of constrain)."""
    return self.unconstrain_fn(params)

  def init(self, key: Array, data_size: Array, log_loss: Array, mask: Array,
           num_restarts: int, aux: Any = None) -> Array:
    """[R, K] raw starting points for one curve (restart 0 is deterministic).

    The U(0, 1) draws come from `uniforms_from_key(key, ...)` (host-side);
    `fitting.initial_params` gives the starts `fit_curves` uses for a batch.
    """
    u = uniforms_from_key(key, (num_restarts, NUM_INIT_UNIFORMS))
    return self.init_fn(jnp.asarray(u), data_size, log_loss, mask, aux)

  def init_from_uniforms(self, u: Array, data_size: Array, log_loss: Array, mask: Array,
                         aux: Any = None) -> Array:
    """[R, K] raw starting points from U(0, 1) draws u [R, NUM_INIT_UNIFORMS]."""
    return self.init_fn(u, data_size, log_loss, mask, aux)

  def valid_data_size(self, data_size: Array) -> Array:
    """bool [P]: where the law is defined (vanilla excludes D <= 0)."""
    data_size = jnp.asarray(data_size)
    if self.zero_data_size is None:
      return data_size > 0
    return data_size >= 0

  def residuals(self, raw: Array, data_size: Array, log_loss: Array, mask: Array,
                aux: Any = None) -> Array:
    """[P] log residuals r = log L_pred - log L, exactly 0 where masked / invalid."""
    mask = jnp.logical_and(mask, self.valid_data_size(data_size))
    safe_d = jnp.where(mask, data_size, 1.0)
    safe_y = jnp.where(mask, log_loss, 0.0)
    return jnp.where(mask, self.log_loss_fn(raw, safe_d, aux) - safe_y, 0.0)

  def reduce_residuals(self, r: Array, mask: Array, data_size: Array) -> Array:
    """Objective from residuals [P] (see `objective`)."""
    mask = jnp.logical_and(mask, self.valid_data_size(data_size))
    if self.loss == "huber":
      a = jnp.abs(r)
      d = self.huber_delta
      h = jnp.where(a < d, 0.5 * r * r, d * (a - 0.5 * d))
      value = jnp.sum(jnp.where(mask, h, 0.0))
    else:
      value = jnp.sum(r * r) / jnp.maximum(1.0, jnp.sum(mask))
    if self.tie_break:
      value = value + 0.5 * self.tie_break * jnp.sum(jnp.where(mask, r * r, 0.0))
    return value

  def residual_weights(self, r: Array, mask: Array, data_size: Array) -> Array:
    """[P] IRLS weights w with d objective / d r = w * r (Gauss-Newton: G = J^T diag(w) J).

    squared: w = 2 / max(1, n) on used points; huber: w = min(1, delta / |r|)
    (the Huber loss's psi(r) / r); plus `tie_break`. 0 where masked / invalid.
    """
    mask = jnp.logical_and(mask, self.valid_data_size(data_size))
    if self.loss == "huber":
      a = jnp.abs(r)
      w = jnp.where(a < self.huber_delta, 1.0, self.huber_delta / jnp.maximum(a, 1e-300))
    else:
      w = jnp.full_like(r, 2.0) / jnp.maximum(1.0, jnp.sum(mask))
    return jnp.where(mask, w + self.tie_break, 0.0)

  def objective(self, raw: Array, data_size: Array, log_loss: Array, mask: Array,
                aux: Any = None) -> Array:
    """Scalar fit objective of one curve (see module docstring).

    squared: sum_p mask_p r_p^2 / max(1, sum_p mask_p), r = log L_pred - log L.
    huber:   sum_p mask_p h(r_p), h(r) = r^2 / 2 if |r| < delta else
             delta (|r| - delta / 2).
    plus tie_break / 2 sum_p mask_p r_p^2 (0 for the published laws).
    Masked-out points (and D <= 0 for vanilla) contribute exactly 0, also when
    they hold non-finite values.
    """
    r = self.residuals(raw, data_size, log_loss, mask, aux)
    return self.reduce_residuals(r, mask, data_size)

  def log_loss_derivatives(self, raw: Array, data_size: Array,
                           aux: Any = None) -> tuple[Array, Array, Array]:
    """(log L [P], Jacobian [P, K], per-point Hessians [P, K, K]) w.r.t. raw for one curve.

    The law's closed form (`log_loss_derivatives_fn`) where it has one, else
    forward-mode automatic differentiation of `log_loss`.
    """
    if self.log_loss_derivatives_fn is not None:
      return self.log_loss_derivatives_fn(raw, data_size, aux)

    def f(r):
      return self.log_loss_fn(r, data_size, aux)

    return f(raw), jax.jacfwd(f)(raw), jax.jacfwd(jax.jacfwd(f))(raw)

  def objective_derivatives(self, raw: Array, data_size: Array, log_loss: Array, mask: Array,
                            aux: Any = None, *,
                            curvature: str = "hessian") -> tuple[Array, Array, Array]:
    """(objective, gradient [K], curvature [K, K]) of one curve in one pass (float64).

    With residuals r [P], their Jacobian J [P, K] and per-point Hessians H_p,
    and the loss rho (squared: rho(r) = r^2 / n, n used points; huber: h(r),
    see `objective`):
      gradient  g = J^T rho'(r);
      curvature "hessian":      J^T diag(rho''(r)) J + sum_p rho'(r_p) H_p (exact);
                "gauss_newton": J^T diag(w) J, w = `residual_weights` (rho'(r) / r).
    Laws with a closed form (`log_loss_derivatives_fn`) assemble these from it;
    the others use automatic differentiation of `objective` (exact Hessian:
    forward over reverse) or of `residuals` (Gauss-Newton).
    """
    if curvature not in ("hessian", "gauss_newton"):
      raise ValueError(f"curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")
    used = jnp.logical_and(mask, self.valid_data_size(data_size))
    if self.log_loss_derivatives_fn is None:
      if curvature == "gauss_newton":
        r, jvp_fn = jax.linearize(lambda x: self.residuals(x, data_size, log_loss, mask, aux),
                                  raw)
        jac = jax.vmap(jvp_fn, out_axes=1)(jnp.eye(raw.shape[0], dtype=raw.dtype))
        w = self.residual_weights(r, mask, data_size)
        return (self.reduce_residuals(r, mask, data_size), jac.T @ (w * r),
                jac.T @ (w[:, None] * jac))

      def grad_and_value(x):
        v, g = jax.value_and_grad(self.objective)(x, data_size, log_loss, mask, aux)
        return g, (v, g)

      hess, (value, grad) = jax.jacfwd(grad_and_value, has_aux=True)(raw)
      return value, grad, 0.5 * (hess + hess.T)
    safe_d = jnp.where(used, data_size, 1.0)
    out, jac, hess_p = self.log_loss_derivatives_fn(raw, safe_d, aux)
    r = jnp.where(used, out - jnp.where(used, log_loss, 0.0), 0.0)
    jac = jnp.where(used[:, None], jac, 0.0)
    w = self.residual_weights(r, mask, data_size)
    value = self.reduce_residuals(r, mask, data_size)
    grad = jac.T @ (w * r)
    if curvature == "gauss_newton":
      return value, grad, jac.T @ (w[:, None] * jac)
    if self.loss == "huber":  # rho'' = 1 inside the quadratic zone, 0 outside
      w2 = jnp.where(used & (jnp.abs(r) < self.huber_delta), 1.0, 0.0)
      w2 = jnp.where(used, w2 + self.tie_break, 0.0)
    else:
      w2 = w
    hess = jac.T @ (w2[:, None] * jac) + jnp.einsum("p,pij->ij", jnp.where(used, w * r, 0.0),
                                                    hess_p)
    return value, grad, 0.5 * (hess + hess.T)

  def predict(self, params, data_size, aux: Any = None, curve: int | None = None) -> np.ndarray:
    """Loss L (not log) of fitted curves at new data sizes, float64 numpy.

    Args:
      params: a `fitting.FitResult` (all curves, or one with `curve=`), a dict
        name -> scalar / [C] constrained values, or raw parameters [K] / [C, K].
      data_size: [P] data sizes (shared by all curves), or [C, P].
      aux: per-curve aux pytree with leading axis [C] (NTK mode), or one curve's.
      curve: select one curve of a FitResult / batched params.

    Returns:
      [P] for one curve, [C, P] for several. NaN where params are NaN
      (curves whose fit failed; check `FitResult.status`).
    """
    with jax.enable_x64(True):
      if hasattr(params, "raw_params"):
        raw = jnp.asarray(params.raw_params, dtype=jnp.float64)
      elif isinstance(params, Mapping):
        raw = jnp.asarray(self.unconstrain(
          {k: np.asarray(params[k], dtype=np.float64) for k in self.param_names}))
      else:
        raw = jnp.asarray(params, dtype=jnp.float64)
      if curve is not None:
        raw = raw[curve]
        if aux is not None and raw.ndim == 1 and _leading(aux) is not None:
          aux = jax.tree.map(lambda a: jnp.asarray(a)[curve], aux)
      d = jnp.asarray(data_size, dtype=jnp.float64)
      if raw.ndim == 1:
        return np.asarray(jnp.exp(self.log_loss_fn(raw, d, aux)))
      d_axis = 0 if d.ndim == 2 else None
      aux_axis = 0 if aux is not None else None
      # Pad the data sizes to a multiple of 16 (elementwise, sliced off): one compilation
      # for the varying point counts of held-out evaluations instead of one per count.
      p = d.shape[-1] if d.ndim else None
      if p:
        pad = [(0, 0)] * (d.ndim - 1) + [(0, -(-p // 16) * 16 - p)]
        d = jnp.asarray(np.pad(np.asarray(data_size, np.float64), pad, mode="edge"))
      return np.asarray(_batched_loss(self, d_axis, aux_axis)(raw, d, aux))[..., :p]


@functools.lru_cache(maxsize=64)
def _batched_loss(law: Law, d_axis, aux_axis):
  """jit(exp(vmap(log_loss))) over curves: traced once per law and shapes, not per call."""
  return jax.jit(lambda raw, d, aux: jnp.exp(jax.vmap(law.log_loss_fn, in_axes=(
    0, d_axis, aux_axis))(raw, d, aux)))


def _leading(aux):
  leaves = jax.tree.leaves(aux)
  return leaves[0].shape[0] if leaves and np.ndim(leaves[0]) > 0 else None


def _stack(params: Mapping[str, Any], names, transforms):
  cols = [t(np.asarray(params[n], dtype=np.float64)) for n, t in zip(names, transforms, strict=True)]
  return np.stack(cols, axis=-1)


def _log_d(data_size, zero_data_size):
  """log max(D, zero_data_size): the published D = 0 -> 1e-10 mapping."""
  d = jnp.asarray(data_size, dtype=jnp.result_type(float))
  return jnp.log(jnp.maximum(d, zero_data_size))


def _curve_stats(log_loss, mask):
  """(max, min) of the masked log losses of one curve (jax scalars)."""
  big = 1e30
  y_max = jnp.max(jnp.where(mask, log_loss, -big))
  y_min = jnp.min(jnp.where(mask, log_loss, big))
  return y_max, y_min


def _log_uniform(u, lo, hi):
  """Maps u ~ U(0, 1) to logU(lo, hi)."""
  return jnp.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))


def _uniform(u, lo, hi):
  return lo + u * (hi - lo)


def uniforms_from_key(key, shape) -> np.ndarray:
  """float64 U(0, 1) draws of `shape` from a numpy generator seeded by a JAX key.

  Host-side on purpose: a jax.random draw costs a multi-second XLA compile per
  new shape on CPU, while the draws here are a few hundred numbers.
  """
  seed = np.asarray(jax.random.key_data(key) if jnp.issubdtype(
    getattr(key, "dtype", np.uint32), jax.dtypes.prng_key) else key, dtype=np.uint32)
  return np.random.default_rng(seed.ravel().tolist()).uniform(size=shape)


def _logaddexp_and_weight(a, b):
  """(log(e^a + e^b), e^a / (e^a + e^b)) with one exp: jnp.logaddexp's own formula.

  The first output equals jnp.logaddexp(a, b) bit for bit (same operations),
  the second is the derivative of logaddexp w.r.t. a (sigmoid(a - b)).
  """
  amax = jnp.maximum(a, b)
  delta = a - b
  t = jnp.exp(-jnp.abs(delta))
  out = jnp.where(jnp.isnan(delta), a + b, amax + jnp.log1p(t))
  return out, jnp.where(delta >= 0, 1.0, t) / (1.0 + t)


def _outer(u, v):
  """[P, K, K] per-point outer products of [P, K] rows."""
  return u[:, :, None] * v[:, None, :]


def _lse_derivatives(q, grad_q, curv_q, e_index, log_e):
  """Derivatives of out = logaddexp(q, log_e) with log_e = raw[e_index].

  Args: q [P] and its gradient [P, K] and Hessians [P, K, K] w.r.t. raw.
  Returns (out [P], gradient [P, K], Hessians [P, K, K]):
    grad out = w grad q + (1 - w) e_E,  w = sigmoid(q - log_e);
    hess out = w (1 - w) (grad q - e_E)(grad q - e_E)^T + w hess q.
  """
  out, w = _logaddexp_and_weight(q, log_e)
  unit_e = jnp.zeros(grad_q.shape[1], q.dtype).at[e_index].set(1.0)
  diff = grad_q - unit_e
  grad = w[:, None] * diff + unit_e
  hess = (w * (1.0 - w))[:, None, None] * _outer(diff, diff) + w[:, None, None] * curv_q
  return out, grad, hess


def _saturating_derivatives(raw, order, log_d):
  """Closed-form (log L, Jacobian, Hessians) of the saturating laws.

  log L = logaddexp(a - softplus(u), e), u = softplus(rb) log D - s, with
  (a, s, rb, e) = raw[order] (log amplitude, log scale, raw beta, log E).
  grad u = (0, -1, beta' log D, 0), hess u = beta'' log D at (rb, rb);
  q = a - softplus(u): grad q = e_a - sigma(u) grad u,
  hess q = -(sigma(u) (1 - sigma(u)) grad u grad u^T + sigma(u) hess u).
  """
  ia, i_s, ib, ie = order
  k = raw.shape[0]
  beta, beta_1 = _logaddexp_and_weight(raw[ib], 0.0)  # softplus and its derivative
  beta_2 = beta_1 * (1.0 - beta_1)
  sp_u, sig_u = _logaddexp_and_weight(beta * log_d - raw[i_s], 0.0)
  q = raw[ia] - sp_u
  zero = jnp.zeros((log_d.shape[0], k), log_d.dtype)
  grad_u = zero.at[:, i_s].set(-1.0).at[:, ib].set(beta_1 * log_d)
  grad_q = zero.at[:, ia].set(1.0) - sig_u[:, None] * grad_u
  curv_q = -(sig_u * (1.0 - sig_u))[:, None, None] * _outer(grad_u, grad_u)
  curv_q = curv_q.at[:, ib, ib].add(-sig_u * beta_2 * log_d)
  return _lse_derivatives(q, grad_q, curv_q, ie, raw[ie])


# ---------------------------------------------------------------- rectified ---
# raw = [log(B / D_l), log D_l, softplus^-1(beta), log E]. Parametrising the
# amplitude B / D_l = L(0) - E (Lin et al.'s A - E) instead of B keeps the
# raw coordinates weakly coupled: L = (B/D_l) / (1 + D^beta / D_l) + E.


def _saturating_log_loss(log_amp, log_scale, beta, log_e, log_d):
  """log(exp(log_amp) / (1 + D^beta / exp(log_scale)) + exp(log_e))."""
  return jnp.logaddexp(log_amp - jax.nn.softplus(beta * log_d - log_scale), log_e)


def _saturating_init(u, data_size, log_loss, mask):
  """Restart starting points (A - E, D_l, beta, E) for the saturating laws.

  Restart 0 is the published initialisation of Lin et al. (`fit_our_law`):
  A = max L, E = exp((log max L + log min L) / 2) (geometric mean), D_l = 1,
  beta = 1. The others are random: beta ~ logU(0.05, 2), the transition
  D_t = D_l^(1/beta) ~ logU(20, 2e7), E ~ U(0.05, 0.95) min L,
  A ~ max L * U(0.9, 1.3).
  """
  y_max, y_min = _curve_stats(log_loss, mask)
  a0, e0 = jnp.exp(y_max), jnp.exp(0.5 * (y_max + y_min))
  amp0 = jnp.maximum(a0 - e0, 1e-3 * a0)
  first = jnp.stack([jnp.log(amp0), 0.0, inverse_softplus(jnp.asarray(1.0)), jnp.log(e0)])
  u = u[1:]
  beta = _log_uniform(u[:, 0], 0.05, 2.0)
  log_dt = jnp.log(_log_uniform(u[:, 1], 20.0, 2e7))
  e = jnp.exp(y_min) * _uniform(u[:, 2], 0.05, 0.95)
  a = jnp.exp(y_max) * _uniform(u[:, 3], 0.9, 1.3)
  rest = jnp.stack([jnp.log(a - e), beta * log_dt, inverse_softplus(beta), jnp.log(e)], -1)
  return jnp.concatenate([first[None], rest], axis=0)


@functools.cache
def rectified_law(zero_data_size: float = ZERO_DATA_SIZE) -> Law:
  """Rectified law L(D) = B / (D_l + D^beta) + E (Lin et al. 2024).

  Parameters (B, D_l, beta, E), all > 0; raw = [log(B / D_l), log D_l,
  softplus^-1(beta), log E]. D below `zero_data_size` (so D = 0) is evaluated
  at `zero_data_size` = 1e-10 as in the published code. Objective: mean
  squared error of log L.
  """
  names = ("B", "D_l", "beta", "E")

  def log_loss(raw, data_size, aux=None):
    del aux
    return _saturating_log_loss(raw[0], raw[1], jax.nn.softplus(raw[2]), raw[3],
                                _log_d(data_size, zero_data_size))

  def constrain(raw):
    xp = np if isinstance(raw, np.ndarray) else jnp
    sp = (lambda x: np.logaddexp(0.0, x)) if xp is np else jax.nn.softplus
    return {"B": xp.exp(raw[..., 0] + raw[..., 1]), "D_l": xp.exp(raw[..., 1]),
            "beta": sp(raw[..., 2]), "E": xp.exp(raw[..., 3])}

  def unconstrain(p):
    b, dl = np.asarray(p["B"], np.float64), np.asarray(p["D_l"], np.float64)
    return np.stack([np.log(b) - np.log(dl), np.log(dl), inverse_softplus(
      np.asarray(p["beta"], np.float64)), np.log(np.asarray(p["E"], np.float64))], -1)

  def init(u, data_size, log_loss_obs, mask, aux=None):
    del aux
    return _saturating_init(u, data_size, log_loss_obs, mask)

  def derivatives(raw, data_size, aux=None):
    del aux
    return _saturating_derivatives(raw, (0, 1, 2, 3), _log_d(data_size, zero_data_size))

  return Law("rectified", names, log_loss, constrain, unconstrain, init,
             loss="squared", zero_data_size=zero_data_size, log_loss_derivatives_fn=derivatives)


# ------------------------------------------------------------------ lensllm ---


LAW_CACHE_SIZE = 32  # NTK-mode laws kept by `lensllm_law` (least recently used dropped)
_law_cache: collections.OrderedDict = collections.OrderedDict()
_law_cache_lock = threading.Lock()


def _hashable(x) -> bool:
  try:
    hash(x)
  except TypeError:
    return False
  return True


def f_term_key(f_term) -> Hashable:
  """Cache key of an `f_term`: equal for functions that compute the same thing.

  A plain function or lambda is keyed by (module, qualified name, code object,
  closure cell values, defaults, keyword defaults) when all of these are
  hashable, so re-creating `lambda t, aux: c * t` with an equal `c` gives the
  same key, and a different `c` (or different code) a different one. A
  `functools.partial` is keyed by its function's key and its arguments.
  Anything else (a callable object, a closure over an unhashable value such as
  an array) is keyed by itself (identity or its own __eq__). Global names the
  function reads are looked up when it runs, not part of the key.
  """
  if isinstance(f_term, functools.partial):
    parts = (f_term_key(f_term.func), f_term.args, tuple(sorted(f_term.keywords.items())))
    return ("partial",) + parts if _hashable(parts) else f_term
  code = getattr(f_term, "__code__", None)
  if code is None:
    return f_term
  cells = tuple(c.cell_contents for c in (f_term.__closure__ or ()))
  kwdefaults = tuple(sorted((f_term.__kwdefaults__ or {}).items()))
  parts = (getattr(f_term, "__module__", None), getattr(f_term, "__qualname__", None), code,
           cells, f_term.__defaults__, kwdefaults)
  return ("function",) + parts if _hashable(parts) else f_term


def law_cache_size() -> int:
  """Number of NTK-mode laws `lensllm_law` holds (at most `LAW_CACHE_SIZE`)."""
  return len(_law_cache)


def lensllm_law(f_term: Callable[[Array, Any], Array] | None = None, *,
                zero_data_size: float = ZERO_DATA_SIZE,
                t_range: tuple[float, float] = (1e-2, 1e4), key: Hashable | None = None) -> Law:
  """LensLLM law L(D) = B / (F + D^beta) + E (Zeng et al. 2025, eq. 10).

  Laws are cached, so that equal arguments give the SAME `Law` object and the
  fits compiled for it (`fitting` caches programs per law) are reused. Curve
  mode has one law per (zero_data_size, t_range). NTK-mode laws live in a
  bounded LRU cache (`LAW_CACHE_SIZE` entries) keyed by `key` if given, else
  by `f_term_key(f_term)`: equal lambdas re-created at every call share one
  law; functions with different code, closure values or defaults do not. A
  caller whose `f_term` closes over arrays (unhashable, so keyed by identity)
  can pass an explicit `key` naming what the function computes.

  Args:
    f_term: None for curve mode: F > 0 is a fitted scalar and the parameters
      are (B, beta, E, F), raw = [log(B / F), softplus^-1(beta), log E, log F]
      (same form and objective as the rectified law). Otherwise a
      jax-traceable F(t, aux) -> scalar >= 0 (e.g. `ntk.ntk_test_loss` bound
      to one curve's eigenvalues / projections via aux); the parameters are
      (B, beta, E, t), raw = [log B, softplus^-1(beta), log E, log t].
    zero_data_size: stand-in for D = 0 (published 1e-10).
    t_range: NTK mode: restarts draw t log-uniformly from this range
      (restart 0 uses its geometric mean).
    key: NTK mode: optional hashable cache key standing for `f_term` (two
      calls with the same key get the first call's law).

  Returns:
    The Law. Objective: mean squared error of log L. In NTK mode
    log(F + D^beta) is computed directly (F may be 0: D^beta > 0 keeps it
    finite).
  """
  zero_data_size, t_range = float(zero_data_size), tuple(float(t) for t in t_range)
  if f_term is None:
    if key is not None:
      raise ValueError("lensllm_law: `key` names an f_term; curve mode (f_term=None) has none")
    return _curve_mode_law(zero_data_size)
  cache_key = (f_term_key(f_term) if key is None else ("key", key), zero_data_size, t_range)
  with _law_cache_lock:
    law = _law_cache.get(cache_key)
    if law is not None:
      _law_cache.move_to_end(cache_key)
      return law
  law = _ntk_mode_law(f_term, zero_data_size, t_range)
  with _law_cache_lock:
    law = _law_cache.setdefault(cache_key, law)
    _law_cache.move_to_end(cache_key)
    while len(_law_cache) > LAW_CACHE_SIZE:
      _law_cache.popitem(last=False)
  return law


@functools.cache
def _curve_mode_law(zero_data_size: float) -> Law:
  """The curve-mode LensLLM law (see `lensllm_law`)."""
  names = ("B", "beta", "E", "F")

  def log_loss(raw, data_size, aux=None):
    del aux
    return _saturating_log_loss(raw[0], raw[3], jax.nn.softplus(raw[1]), raw[2],
                                _log_d(data_size, zero_data_size))

  def constrain(raw):
    xp = np if isinstance(raw, np.ndarray) else jnp
    sp = (lambda x: np.logaddexp(0.0, x)) if xp is np else jax.nn.softplus
    return {"B": xp.exp(raw[..., 0] + raw[..., 3]), "beta": sp(raw[..., 1]),
            "E": xp.exp(raw[..., 2]), "F": xp.exp(raw[..., 3])}

  def unconstrain(p):
    b, f = np.asarray(p["B"], np.float64), np.asarray(p["F"], np.float64)
    return np.stack([np.log(b) - np.log(f), inverse_softplus(np.asarray(p["beta"],
                     np.float64)), np.log(np.asarray(p["E"], np.float64)), np.log(f)], -1)

  def init(u, data_size, log_loss_obs, mask, aux=None):
    del aux
    r = _saturating_init(u, data_size, log_loss_obs, mask)
    return r[:, jnp.array([0, 2, 3, 1])]

  def derivatives(raw, data_size, aux=None):
    del aux
    return _saturating_derivatives(raw, (0, 3, 1, 2), _log_d(data_size, zero_data_size))

  return Law("lensllm", names, log_loss, constrain, unconstrain, init, loss="squared",
             zero_data_size=zero_data_size, log_loss_derivatives_fn=derivatives)


def _ntk_mode_law(f_term, zero_data_size: float, t_range: tuple[float, float]) -> Law:
  """The NTK-mode LensLLM law with F = f_term(t, aux) (see `lensllm_law`)."""
  names = ("B", "beta", "E", "t")

  def log_loss_ntk(raw, data_size, aux):
    beta = jax.nn.softplus(raw[1])
    f = f_term(jnp.exp(raw[3]), aux)
    log_d = _log_d(data_size, zero_data_size)
    return jnp.logaddexp(raw[0] - jnp.log(f + jnp.exp(beta * log_d)), raw[2])

  def constrain_ntk(raw):
    xp = np if isinstance(raw, np.ndarray) else jnp
    sp = (lambda x: np.logaddexp(0.0, x)) if xp is np else jax.nn.softplus
    return {"B": xp.exp(raw[..., 0]), "beta": sp(raw[..., 1]), "E": xp.exp(raw[..., 2]),
            "t": xp.exp(raw[..., 3])}

  def unconstrain_ntk(p):
    return np.stack([np.log(np.asarray(p["B"], np.float64)),
                     inverse_softplus(np.asarray(p["beta"], np.float64)),
                     np.log(np.asarray(p["E"], np.float64)),
                     np.log(np.asarray(p["t"], np.float64))], -1)

  def init_ntk(u, data_size, log_loss_obs, mask, aux):
    """t log-uniform; B so that L(0) matches: B = (A - E) (F(t) + D0^beta).

    Restart 0: t = sqrt(t_lo t_hi), beta = 0.5, E = min L / 2, A = max L.
    Others: t ~ logU(t_range), beta ~ logU(0.05, 2), E ~ U(0.05, 0.95) min L,
    A ~ max L * U(0.9, 1.3).
    """
    y_max, y_min = _curve_stats(log_loss_obs, mask)
    lo, hi = t_range
    first = jnp.ones_like(u[:1, 0])
    t = jnp.concatenate([np.sqrt(lo * hi) * first, _log_uniform(u[1:, 0], lo, hi)])
    beta = jnp.concatenate([0.5 * first, _log_uniform(u[1:, 1], 0.05, 2.0)])
    frac_e = jnp.concatenate([0.5 * first, _uniform(u[1:, 2], 0.05, 0.95)])
    e = jnp.exp(y_min) * frac_e
    a = jnp.exp(y_max) * jnp.concatenate([first, _uniform(u[1:, 3], 0.9, 1.3)])
    f = jax.vmap(lambda tt: f_term(tt, aux))(t)
    d0 = zero_data_size ** beta
    log_b = jnp.log(a - e) + jnp.log(f + d0)
    return jnp.stack([log_b, inverse_softplus(beta), jnp.log(e), jnp.log(t)], -1)

  return Law("lensllm", names, log_loss_ntk, constrain_ntk, unconstrain_ntk, init_ntk,
             loss="squared", zero_data_size=zero_data_size, uses_aux=True)


# ------------------------------------------------------------------ vanilla ---
# raw = [softplus^-1(alpha), log B, softplus^-1(beta), log E];
# log L = alpha * logaddexp(log B - beta log D, log E).


@functools.cache
def vanilla_law(huber_delta: float = VANILLA_HUBER_DELTA) -> Law:
  """Vanilla power law L(D) = (B / D^beta + E)^alpha (Lin et al. 2024).

  Parameters (alpha, B, beta, E), all > 0; raw = [softplus^-1(alpha), log B,
  softplus^-1(beta), log E]. Undefined at D <= 0: log_loss is +inf there and
  `valid_data_size` excludes it from fits. Objective: sum of Huber losses
  (delta = 1e-3, as published) of the log residuals. Lin et al. write the
  law as (1 / (B' D^beta) + |E|)^alpha; here B = 1 / B'.
  """
  names = ("alpha", "B", "beta", "E")

  def log_loss(raw, data_size, aux=None):
    del aux
    d = jnp.asarray(data_size, dtype=jnp.result_type(float))
    pos = d > 0
    log_d = jnp.log(jnp.where(pos, d, 1.0))
    alpha, beta = jax.nn.softplus(raw[0]), jax.nn.softplus(raw[2])
    out = alpha * jnp.logaddexp(raw[1] - beta * log_d, raw[3])
    return jnp.where(pos, out, jnp.inf)

  def constrain(raw):
    xp = np if isinstance(raw, np.ndarray) else jnp
    sp = (lambda x: np.logaddexp(0.0, x)) if xp is np else jax.nn.softplus
    return {"alpha": sp(raw[..., 0]), "B": xp.exp(raw[..., 1]), "beta": sp(raw[..., 2]),
            "E": xp.exp(raw[..., 3])}

  def unconstrain(p):
    return _stack(p, names, (inverse_softplus, np.log, inverse_softplus, np.log))

  def init(u, data_size, log_loss_obs, mask, aux=None):
    """Published initialisation: (alpha, B', beta, E) ~ U(0, 1) each, B = 1 / B'.

    Restart 0 is deterministic instead: alpha = 1, beta = 0.3, E = min L / 2 and
    B matched to the first valid point, B = (L_1 - E) D_1^beta.
    """
    del aux
    mask = jnp.logical_and(mask, data_size > 0)
    y_max, y_min = _curve_stats(log_loss_obs, mask)
    idx = jnp.argmax(mask)
    d1 = jnp.where(mask[idx], data_size[idx], 1.0)
    l1 = jnp.where(mask[idx], jnp.exp(log_loss_obs[idx]), jnp.exp(y_max))
    e0 = 0.5 * jnp.exp(y_min)
    b0 = jnp.maximum(l1 - e0, 1e-3) * d1 ** 0.3
    first = jnp.stack([inverse_softplus(jnp.asarray(1.0)), jnp.log(b0),
                       inverse_softplus(jnp.asarray(0.3)), jnp.log(e0)])
    u = _uniform(u[1:], 1e-3, 1.0)
    rest = jnp.stack([inverse_softplus(u[:, 0]), -jnp.log(u[:, 1]), inverse_softplus(u[:, 2]),
                      jnp.log(u[:, 3])], -1)
    return jnp.concatenate([first[None], rest], axis=0)

  def derivatives(raw, data_size, aux=None):
    """log L = alpha L_in, L_in = logaddexp(log B - beta log D, log E) (closed form).

    grad log L = alpha grad L_in + alpha' L_in e_alpha, hess log L = alpha hess L_in
    + alpha' (e_alpha grad L_in^T + grad L_in e_alpha^T) + alpha'' L_in e_alpha e_alpha^T.
    +inf (zero derivatives) where D <= 0, as `log_loss`.
    """
    del aux
    d = jnp.asarray(data_size, dtype=jnp.result_type(float))
    pos = d > 0
    log_d = jnp.log(jnp.where(pos, d, 1.0))
    alpha, alpha_1 = _logaddexp_and_weight(raw[0], 0.0)
    beta, beta_1 = _logaddexp_and_weight(raw[2], 0.0)
    zero = jnp.zeros((log_d.shape[0], 4), log_d.dtype)
    grad_q = zero.at[:, 1].set(1.0).at[:, 2].set(-beta_1 * log_d)
    curv_q = jnp.zeros((log_d.shape[0], 4, 4), log_d.dtype).at[:, 2, 2].set(
      -beta_1 * (1.0 - beta_1) * log_d)
    inner, grad_in, hess_in = _lse_derivatives(raw[1] - beta * log_d, grad_q, curv_q, 3, raw[3])
    # grad L_in has no alpha component, so the alpha row / column are added once.
    grad = (alpha * grad_in).at[:, 0].set(alpha_1 * inner)
    hess = ((alpha * hess_in).at[:, 0, :].add(alpha_1 * grad_in)
            .at[:, :, 0].add(alpha_1 * grad_in)
            .at[:, 0, 0].add(alpha_1 * (1.0 - alpha_1) * inner))
    keep = pos[:, None]
    return (jnp.where(pos, alpha * inner, jnp.inf), jnp.where(keep, grad, 0.0),
            jnp.where(keep[:, :, None], hess, 0.0))

  return Law("vanilla", names, log_loss, constrain, unconstrain, init, loss="huber",
             huber_delta=huber_delta, zero_data_size=None, log_loss_derivatives_fn=derivatives)


@functools.lru_cache(maxsize=64)
def tie_break_law(law: Law, tie_break: float) -> Law:
  """`law` with objective + tie_break / 2 sum_p r_p^2 (the same object for equal arguments).

  The law's published objective is unchanged; this copy is what the canonical
  stage of `fitting.fit_curves` minimises (docs/laws.md, "Canonical point").
  """
  if tie_break < 0:
    raise ValueError(f"tie_break must be >= 0, got {tie_break}")
  return dataclasses.replace(law, tie_break=float(tie_break))


# The laws by name: name -> factory (lensllm_law takes an optional F term).
LAW_FACTORIES: dict[str, Callable[..., Law]] = {
    "vanilla": vanilla_law, "rectified": rectified_law, "lensllm": lensllm_law}


def get_law(name: str) -> Law:
  """Law by name: "vanilla", "rectified" or "lensllm" (curve mode)."""
  if name not in LAW_FACTORIES:
    raise ValueError(f"unknown law {name!r}; expected one of {sorted(LAW_FACTORIES)}")
  return LAW_FACTORIES[name]()
