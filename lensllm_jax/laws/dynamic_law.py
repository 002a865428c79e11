"""LensLLM with NTK dynamics: the pre-power term F decays as the fine-tuning set grows.

LensLLM (Zeng et al. 2025, eq. 10) writes the fine-tuned loss as

    L(D) = B / (F(Theta, t) + D^beta) + E,
    F(Theta, t) = sum_k exp(-2 eta lambda_k t) p_k^2    (`ntk.ntk_test_loss`),

with Theta the NTK of the pre-trained model, (lambda_k, p_k) its eigenvalues
and the projections of the initial residual, eta the learning rate. The
curve-mode law of `forms.lensllm_law()` freezes t, so F is one constant. But
the fine-tuning run on D samples takes t = steps(D) optimisation steps
(an epoch of D / batch steps, clipped to [min_steps, max_steps] in the
study), so F(Theta, t(D)) DECAYS with D: the NTK spectrum then shapes the
pre-power phase instead of being a constant. Two laws here:

  * `spectral_lensllm_law(num_terms)` (curve mode, no kernel): a low-rank
    spectral form of F with t proportional to D,

        F(D) = F0 (w_0 + sum_{k=1..K} w_k exp(-D / D_k)),   w = softmax([0, v_1..v_K]),

    i.e. K decaying eigen-directions (time constants D_k > 0) plus a
    constant for the directions that do not move within the grid (w_0). At
    D = 0, F = F0, so L(0) = B / F0 + E exactly as in curve mode, and D_k -> inf
    (or w_0 -> 1) gives back constant-F LensLLM. Parameters (B, beta, E, F0,
    v_1..v_K, D_1..D_K); raw = [log(B / F0), softplus^-1(beta), log E, log F0,
    v_1..v_K, log D_1..log D_K] (4 + 2K).
  * `ntk_dynamic_law(steps_fn)` (NTK mode, needs the kernel): F =
    `ntk.ntk_test_loss(eigvals, proj, eta, tau * steps(D))` with a fitted
    time scale tau > 0 (steps(D) from the training schedule, e.g.
    `study_steps`); aux = (eigvals [n], proj [n], eta []) per curve, as for
    `ntk.ntk_f_term`. Parameters (B, beta, E, tau); raw = [log B,
    softplus^-1(beta), log E, log tau].

Both are `forms.Law` objects (squared log residuals, the published D = 0 ->
1e-10 convention), fitted by `fitting.fit_curves` in float64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.laws import forms
from lensllm_jax.theory import ntk

__all__ = ["ntk_dynamic_law", "spectral_f", "spectral_lensllm_law", "study_steps"]


def study_steps(data_size, *, batch_size: int = 16, epochs: float = 1.0, min_steps: int = 40,
                max_steps: int = 1600):
  """Steps of the study's schedule: clip(ceil(epochs D / batch), min, max); 0 at D = 0.

  (configs/study.py, full preset: one epoch of batches of 16, 40 to 1600 steps.)
  jax-traceable.
  """
  d = jnp.asarray(data_size, jnp.result_type(float))
  s = jnp.clip(jnp.ceil(epochs * d / batch_size), min_steps, max_steps)
  return jnp.where(d > 0, s, 0.0)


def spectral_f(raw, data_size, num_terms: int):
  """log F(D) [P] of `spectral_lensllm_law` from raw [4 + 2K] (jax)."""
  d = jnp.asarray(data_size, jnp.result_type(float))
  logits = jnp.concatenate([jnp.zeros(1, raw.dtype), raw[4:4 + num_terms]])
  log_w = jax.nn.log_softmax(logits)                       # [K + 1]
  log_dk = raw[4 + num_terms:4 + 2 * num_terms]            # [K]
  terms = jnp.concatenate([jnp.broadcast_to(log_w[0], d.shape)[None],
                           log_w[1:, None] - d[None, :] / jnp.exp(log_dk)[:, None]])
  return raw[3] + jax.scipy.special.logsumexp(terms, axis=0)


@functools.cache
def spectral_lensllm_law(num_terms: int = 1, zero_data_size: float = forms.ZERO_DATA_SIZE
                         ) -> forms.Law:
  """Curve-mode LensLLM with F(D) = F0 (w_0 + sum_k w_k e^(-D / D_k)) (module docstring)."""
  if num_terms < 1:
    raise ValueError(f"spectral_lensllm_law: num_terms must be >= 1, got {num_terms}")
  k = num_terms
  names = ("B", "beta", "E", "F0") + tuple(f"v{i}" for i in range(1, k + 1)) + tuple(
    f"D{i}" for i in range(1, k + 1))

  def log_loss(raw, data_size, aux=None):
    del aux
    beta = jax.nn.softplus(raw[1])
    log_f = spectral_f(raw, data_size, k)
    log_d = jnp.log(jnp.maximum(jnp.asarray(data_size, jnp.result_type(float)), zero_data_size))
    return jnp.logaddexp(raw[0] + raw[3] - jnp.logaddexp(log_f, beta * log_d), raw[2])

  def constrain(raw):
    xp = np if isinstance(raw, np.ndarray) else jnp
    sp = (lambda x: np.logaddexp(0.0, x)) if xp is np else jax.nn.softplus
    out = {"B": xp.exp(raw[..., 0] + raw[..., 3]), "beta": sp(raw[..., 1]),
           "E": xp.exp(raw[..., 2]), "F0": xp.exp(raw[..., 3])}
    for i in range(k):
      out[f"v{i + 1}"] = raw[..., 4 + i]
      out[f"D{i + 1}"] = xp.exp(raw[..., 4 + k + i])
    return out

  def unconstrain(p):
    b, f0 = np.asarray(p["B"], np.float64), np.asarray(p["F0"], np.float64)
    cols = [np.log(b) - np.log(f0), forms.inverse_softplus(np.asarray(p["beta"], np.float64)),
            np.log(np.asarray(p["E"], np.float64)), np.log(f0)]
    cols += [np.asarray(p[f"v{i}"], np.float64) for i in range(1, k + 1)]
    cols += [np.log(np.asarray(p[f"D{i}"], np.float64)) for i in range(1, k + 1)]
    return np.stack(np.broadcast_arrays(*cols), -1)

  base = forms.lensllm_law()

  def init(u, data_size, log_loss_obs, mask, aux=None):
    """The constant-F starts of `forms.lensllm_law()`, plus w_0 = w_k (v = 0) and D_k
    spread log-uniformly over [10, 1e7] (restart 0: geometric means)."""
    del aux
    r0 = base.init_fn(u, data_size, log_loss_obs, mask, None)        # [R, 4]
    n = r0.shape[0]
    frac = jnp.concatenate([jnp.full((1,), 0.5), u[1:, 0]])
    log_dk = jnp.stack([jnp.log(10.0) + (frac + i) / k * (jnp.log(1e7) - jnp.log(10.0))
                        for i in range(k)], -1)                      # [R, K]
    return jnp.concatenate([r0, jnp.zeros((n, k), r0.dtype), log_dk], -1)

  return forms.Law(f"lensllm-spectral{k}", names, log_loss, constrain, unconstrain, init,
                  loss="squared", zero_data_size=zero_data_size)


@functools.cache
def ntk_dynamic_law(steps_fn: Callable = study_steps, *,
                    zero_data_size: float = forms.ZERO_DATA_SIZE,
                    tau_range: tuple[float, float] = (1e-3, 1e2)) -> forms.Law:
  """NTK-mode LensLLM with t = tau * steps(D): F(D) = F(Theta, tau steps(D)) (module doc).

  aux per curve: (eigvals [n], proj [n], eta []) (as `ntk.ntk_f_term`).
  Restarts: tau ~ logU(tau_range) (restart 0: its geometric mean), the rest
  as `forms.lensllm_law(f_term)` (B matched to L(0) = B / F(0) + E).
  """
  names = ("B", "beta", "E", "tau")

  def log_f(log_tau, data_size, aux):
    eigvals, proj, eta = aux
    t = jnp.exp(log_tau) * steps_fn(data_size)
    return jnp.log(jnp.maximum(ntk.ntk_test_loss(eigvals, proj, eta, t), 1e-300))

  def log_loss(raw, data_size, aux):
    beta = jax.nn.softplus(raw[1])
    d = jnp.asarray(data_size, jnp.result_type(float))
    log_d = jnp.log(jnp.maximum(d, zero_data_size))
    return jnp.logaddexp(raw[0] - jnp.logaddexp(log_f(raw[3], d, aux), beta * log_d), raw[2])

  def constrain(raw):
    xp = np if isinstance(raw, np.ndarray) else jnp
    sp = (lambda x: np.logaddexp(0.0, x)) if xp is np else jax.nn.softplus
    return {"B": xp.exp(raw[..., 0]), "beta": sp(raw[..., 1]), "E": xp.exp(raw[..., 2]),
            "tau": xp.exp(raw[..., 3])}

  def unconstrain(p):
    return np.stack([np.log(np.asarray(p["B"], np.float64)),
                     forms.inverse_softplus(np.asarray(p["beta"], np.float64)),
                     np.log(np.asarray(p["E"], np.float64)),
                     np.log(np.asarray(p["tau"], np.float64))], -1)

  def init(u, data_size, log_loss_obs, mask, aux):
    big = 1e30
    y_max = jnp.max(jnp.where(mask, log_loss_obs, -big))
    y_min = jnp.min(jnp.where(mask, log_loss_obs, big))
    lo, hi = tau_range
    first = jnp.ones_like(u[:1, 0])
    tau = jnp.concatenate([np.sqrt(lo * hi) * first,
                           jnp.exp(np.log(lo) + u[1:, 0] * (np.log(hi) - np.log(lo)))])
    beta = jnp.concatenate([0.5 * first, jnp.exp(np.log(0.05) + u[1:, 1] * np.log(40.0))])
    e = jnp.exp(y_min) * jnp.concatenate([0.5 * first, 0.05 + 0.9 * u[1:, 2]])
    a = jnp.exp(y_max) * jnp.concatenate([first, 0.9 + 0.4 * u[1:, 3]])
    f0 = jnp.exp(log_f(0.0, jnp.zeros(1), aux))[0]     # F at t = 0 (steps(0) = 0)
    log_b = jnp.log(a - e) + jnp.log(f0 + zero_data_size ** beta)
    return jnp.stack([log_b, forms.inverse_softplus(beta), jnp.log(e), jnp.log(tau)], -1)

  return forms.Law("lensllm-ntk-dynamic", names, log_loss, constrain, unconstrain, init,
                  loss="squared", zero_data_size=zero_data_size, uses_aux=True)
