"""Batched fitting of fine-tuning laws: one jit-compiled optax loop for all curves.

`fit_curves` fits a `laws.Law` to C curves with R restarts each. Every
(curve, restart) pair runs the same optax optimiser inside a
`jax.lax.while_loop`; the loop is `jax.vmap`-ed over restarts and curves and
compiled once per (law, optimiser, shapes). All arithmetic is float64
(`jax.enable_x64` is switched on inside the call; callers need no global
config).

Optimisers (measured, see experiments/bench_fit_speed.py and
tests/laws/test_objective_reference.py), chosen per law by `auto_optimizer`:
  * squared-error laws (rectified, lensllm): a damped Newton method written as
    an optax transformation (`scale_by_damped_newton`): with K = 4 parameters
    the exact Hessian is cheap, each step is one eigendecomposition and one
    trial evaluation, with no inner line search;
  * the Huber objective (vanilla): Levenberg-Marquardt on the residual
    Jacobian with IRLS weights (`scale_by_gauss_newton`; J^T W J is K x K).
One pass per step: the trial point's objective, gradient and curvature
matrix come from one call of `laws.Law.objective_derivatives` (closed-form
derivatives for the published laws, automatic differentiation otherwise)
and are carried to the next step, so a step differentiates once.
`optax.lbfgs` (zoom line search) reaches the same optima but its nested,
vmapped line-search loop made it ~10-20x slower here on CPU; it remains
selectable. The pooled fit (`selection.pooled.solver`) drives
`scale_by_gauss_newton` too, in its own fixed-step loop with Marquardt's
damping schedule (damping_schedule "accept_reject").

Work queue. The (curve, restart) lanes need very different numbers of steps
(protocol fits: median ~110, a few hit max_steps), and a vmapped while loop
runs every lane until the slowest stops. By default (`queue_slots="auto"`)
a fixed pool of slots (`auto_queue_slots`) advances together and a slot whose
lane stopped takes the next waiting lane (`_solve_queue`); each lane's
arithmetic is unchanged, the shapes are fixed (one compilation).

Stopping rule per (curve, restart), checked after every step:
  * "converged": ||grad||_inf <= gtol; or the objective changed by at most
    ftol * max(|f|, f_scale) on `patience` consecutive accepted steps; or 40
    consecutive trust-region rejections (no decrease found at any step size);
  * "max_steps": max_steps steps done without converging;
  * "nonfinite": the objective, gradient or parameters became NaN / inf (the
    restart is discarded).
After the best restart is chosen, a curve whose fit reached a degenerate limit
gets status "degenerate" instead of "converged" / "max_steps" (its parameters
are kept, never silently): data that do not decrease (the log loss at the
largest fitted D is >= that at the smallest: a flat or rising curve, which a
decreasing law can only meet in a limit), or a fitted curve whose predicted
loss at a fitted D is non-finite, zero or above `AMPLITUDE_LIMIT`.
`degenerate_reason` says which. Both read the data and the fitted curve only,
never the parameters: on a flat valley of the objective the curve is canonical
and the parameters are not (an amplitude B far out along the valley, even
overflowing, with a finite curve is a minimiser, not a failure; docs/laws.md).
Per curve, the finite restart with the lowest objective is returned; a
curve with no finite restart gets status "nonfinite", objective +inf and NaN
parameters (never silently), and a curve with no valid point gets "no_data".

Canonical point (Huber objectives by default, docs/laws.md): the vanilla
law's Huber objective is L1-like on most points of the public curves and its
minimisers form flat faces of equal objective but different extrapolations,
so where the optimiser stops on a face is decided by rounding (the CPU's
vector instructions). A second stage (`_canonical_stage`) moves every
restart to the least-squares point of its face (damped Newton on the
objective plus CANONICAL_TIE_BREAK / 2 sum_p r_p^2), and among the restarts of
equal objective (CANONICAL_RTOL) the one with the least sum_p r_p^2 wins.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lensllm_jax.laws import forms

__all__ = ["AMPLITUDE_LIMIT", "STATUS_NAMES", "FitOptions", "FitResult", "degenerate_reason",
           "fit_curves",
           "initial_params", "not_decreasing",
           "TrustRegionState", "scale_by_damped_newton", "scale_by_gauss_newton"]

STATUS_NAMES = ("converged", "max_steps", "nonfinite", "no_data", "degenerate")
_CONVERGED, _MAX_STEPS, _NONFINITE, _NO_DATA, _DEGENERATE = range(5)
# A predicted loss at a fitted D above this has overflowed: the law sits in a degenerate
# limit, whatever the optimiser said. Parameters are not read: a vanilla fit with
# log B ~ 3.5e5, beta ~ 9e3 (B = inf) and a finite curve lies on a valley (docs/laws.md).
AMPLITUDE_LIMIT = 1e30
_RUNNING = -1
# Consecutive rejected trust-region steps after which the point is taken as a
# numerical minimum: the damping has grown by 4^40 (to its clip), the step is ~0.
_MAX_REJECTED = 40
# Canonical point (docs/laws.md): weight tau of the tie-break term tau / 2 sum_p r_p^2 and
# the relative tolerance within which two restarts' objectives count as equal.
CANONICAL_TIE_BREAK = 1e-7
CANONICAL_RTOL = 1e-10
# The canonical stage may finish a first-stage stop, lowering the objective by at most this
# much (relative); a lane it carries further has left for another basin and keeps its point.
CANONICAL_MAX_DESCENT = 1e-6
# Relative change of the objective that the canonical stage treats as rounding (its value
# is a sum of ~15 terms computed to ~1e-16 of log L each, i.e. ~1e-14 relative).
CANONICAL_VALUE_RTOL = 1e-12


class FitResult(NamedTuple):
  """Per-curve fit results (numpy, C curves, K parameters, R restarts).

  Attributes:
    law_name: name of the fitted law.
    param_names: [K] names, the raw parameter order.
    raw_params: [C, K] best unconstrained parameters (NaN if status "nonfinite").
    params: dict name -> [C] constrained parameters.
    objective: [C] objective at raw_params (+inf if no finite restart).
    converged: [C] bool, status == "converged".
    status: [C] str, one of STATUS_NAMES.
    num_steps: [C] optimiser steps of the best restart.
    grad_norm: [C] ||grad||_inf at raw_params.
    best_restart: [C] index of the chosen restart.
    restart_objectives: [C, R] final objective of every restart (+inf if discarded).
    restart_status: [C, R] str status of every restart.
    num_points: [C] number of points the objective used.
    not_decreasing: [C] bool, the data are flat or rising (`not_decreasing`).
  """
  law_name: str
  param_names: tuple[str, ...]
  raw_params: np.ndarray
  params: dict
  objective: np.ndarray
  converged: np.ndarray
  status: np.ndarray
  num_steps: np.ndarray
  grad_norm: np.ndarray
  best_restart: np.ndarray
  restart_objectives: np.ndarray
  restart_status: np.ndarray
  num_points: np.ndarray
  not_decreasing: np.ndarray

  def curve_params(self, c: int) -> dict:
    """dict name -> float of curve c."""
    return {k: float(v[c]) for k, v in self.params.items()}


class _LoopState(NamedTuple):
  params: jax.Array        # [K]
  opt_state: Any
  value: jax.Array         # scalar, objective at params
  grad: jax.Array          # [K]
  curvature: jax.Array     # [K, K] Hessian / Gauss-Newton matrix at params ([0] for lbfgs)
  step: jax.Array          # int
  stall: jax.Array         # int, consecutive accepted steps with tiny relative change
  rejected: jax.Array      # int, consecutive rejected (zero) steps
  reason: jax.Array        # int, _RUNNING until stopped


class TrustRegionState(NamedTuple):
  """State of `scale_by_damped_newton` and `scale_by_gauss_newton`.

  value, grad and curvature are the objective, gradient [K] and curvature
  matrix [K, K] at params + the returned updates (the trial point when the
  step was accepted, else the current point): the loop reads them from here
  instead of differentiating again. `init` leaves them empty (+inf / zeros).
  """
  damping: jax.Array    # scalar, Levenberg-Marquardt damping mu
  value: jax.Array
  grad: jax.Array
  curvature: jax.Array


def _trust_region(step_fn, init_damping, min_damping, max_damping, rejected_damping=0.0,
                  value_rtol=0.0, damping_schedule="ratio"):
  """optax transformation: a damped step from (grad, curvature), accepted if f decreases.

  step_fn(grad, curvature, damping) -> (step, predicted decrease). The trial
  point is evaluated once by the extra arg `derivatives_fn` (params -> value,
  grad, curvature), which also gives the next step's curvature. With
  damping_schedule "ratio" the damping adapts to rho = actual / predicted
  decrease (rho > 0.75: / 3; rho < 0.25 or rejected: * 4, and at least
  `rejected_damping` after a rejection); with "accept_reject" (Marquardt's
  schedule) every accepted step divides it by 3 and every rejected one
  multiplies it by 4 (the predicted decrease is not read; needs
  rejected_damping = value_rtol = 0). Either way it is clipped to
  [min_damping, max_damping]. A step is accepted when the trial value is
  finite and lower (from value = +inf: any finite trial value). A rejected
  step returns zero updates and keeps (value, grad, curvature).

  value_rtol > 0: changes of f below value_rtol |f| count as rounding, not as
  information: such a step is accepted (f may rise by that much) and, when
  the predicted decrease is that small too, it counts as a good step
  (rho > 0.75). Near a minimum whose curvature is tiny (the canonical stage),
  the Newton steps then converge to the gradient's root instead of stopping
  where f can no longer tell the trial point from the current one.
  """

  def init_fn(params):
    k = params.shape[-1]
    return TrustRegionState(jnp.asarray(init_damping, dtype=jnp.result_type(params)),
                            jnp.asarray(jnp.inf, dtype=jnp.result_type(params)),
                            jnp.zeros_like(params), jnp.zeros(params.shape + (k,), params.dtype))

  if damping_schedule not in ("ratio", "accept_reject"):
    raise ValueError(f"damping_schedule must be 'ratio' or 'accept_reject', "
                     f"got {damping_schedule!r}")
  if damping_schedule == "accept_reject" and (rejected_damping or value_rtol):
    raise ValueError("damping_schedule 'accept_reject' takes no rejected_damping or value_rtol")

  def update_fn(updates, state, params, *, value, curvature, derivatives_fn, **extra):
    del extra
    grad = updates
    step, predicted = step_fn(grad, curvature, state.damping)
    new_value, new_grad, new_curvature = derivatives_fn(params + step)
    if damping_schedule == "accept_reject":
      # Compared directly: the ratio path's value_rtol * |value| is NaN at value = +inf.
      ok = jnp.isfinite(new_value) & (new_value < value) & jnp.all(jnp.isfinite(step))
      damping = jnp.where(ok, state.damping / 3.0, state.damping * 4.0)
    else:
      actual = value - new_value
      noise = value_rtol * jnp.abs(value)
      rho = jnp.where(predicted <= noise, 1.0, actual / jnp.maximum(predicted, 1e-300))
      ok = jnp.isfinite(new_value) & (actual > -noise) & jnp.all(jnp.isfinite(step))
      ok = ok & ((actual > 0) | (value_rtol > 0))
      damping = jnp.where(ok & (rho > 0.75), state.damping / 3.0,
                          jnp.where(ok & (rho > 0.25), state.damping, state.damping * 4.0))
      damping = jnp.where(ok, damping, jnp.maximum(damping, rejected_damping))
    damping = jnp.clip(damping, min_damping, max_damping)
    keep = functools.partial(jnp.where, ok)
    return keep(step, jnp.zeros_like(step)), TrustRegionState(
      damping, keep(new_value, value), keep(new_grad, grad), keep(new_curvature, curvature))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_damped_newton(init_damping: float = 1e-3, min_damping: float = 1e-15,
                           max_damping: float = 1e15,
                           solver: str = "eigh", rejected_damping: float = 0.0,
                           value_rtol: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """Damped (trust-region style) Newton step as an optax transformation.

  For the small, dense problems here (K <= ~8 parameters) the exact Hessian H
  is cheap. With damping d, the step is
    solver "eigh":     s = -V diag(1 / ((1 + d) |lambda| + d eps)) V^T g,
                       H = V diag(lambda) V^T, eps = 1e-12 (1 + max |lambda|)
                       (a descent direction even where H is indefinite, and
                       scale-free per eigen-direction);
    solver "cholesky": s = -(H + mu I)^-1 g, mu = d (1 + max |H_ii|), rejected
                       when H + mu I is not positive definite.
  The step is accepted when the objective decreases; the damping adapts to
  the ratio rho of actual to model-predicted decrease (rho > 0.75: / 3;
  rho < 0.25 or rejected: * 4). After a rejected step the damping is at
  least `rejected_damping`: with the eigh solver, d <= 1e-3 leaves the step
  all but unchanged outside near-null directions, so climbing from a small
  d by factors of 4 repeats nearly the same rejected trial several times;
  d = 1 at most halves every eigen-direction's step. `fit_curves` uses 1.0
  ("newton"); 0 gives the plain schedule. `value_rtol`: see `_trust_region` (0: a
  step is accepted only if f decreases). A rejected step returns zero updates. Needs
  the extra args `value` (objective at params), `curvature` (the Hessian at
  params) and `derivatives_fn` (params -> objective, gradient, Hessian, e.g.
  `laws.Law.objective_derivatives`); the state holds those of the new point.
  """
  if solver not in ("eigh", "cholesky"):
    raise ValueError(f"solver must be 'eigh' or 'cholesky', got {solver!r}")

  def step_fn(grad, hess, damping):
    if solver == "eigh":
      lam, vec = jnp.linalg.eigh(hess)
      vg = vec.T @ grad
      # Relative damping per eigen-direction: flat directions (e.g. E -> 0
      # along log E) still take full Newton-sized steps.
      abs_lam = jnp.abs(lam)
      coef = vg / ((1.0 + damping) * abs_lam + damping * 1e-12 * (1.0 + jnp.max(abs_lam)))
      return -vec @ coef, jnp.sum(coef * vg) - 0.5 * jnp.sum(coef ** 2 * lam)
    mu = damping * (1.0 + jnp.max(jnp.abs(jnp.diag(hess))))
    chol = jnp.linalg.cholesky(hess + mu * jnp.eye(hess.shape[0], dtype=hess.dtype))
    step = jax.scipy.linalg.cho_solve((chol, True), -grad)
    return step, -(grad @ step) - 0.5 * step @ (hess @ step)

  return _trust_region(step_fn, init_damping, min_damping, max_damping, rejected_damping,
                       value_rtol)


def scale_by_gauss_newton(init_damping: float = 1e-3, min_damping: float = 1e-15,
                          max_damping: float = 1e15, *, diagonal_floor: float = 1e-12,
                          damping_schedule: str = "ratio"
                          ) -> optax.GradientTransformationExtraArgs:
  """Levenberg-Marquardt (IRLS) step on the residuals, as an optax transformation.

  For f(w) = sum_p rho(r_p(w)) with residual Jacobian J [P, K] and IRLS
  weights W = diag(rho'(r) / r) (`laws.Law.residual_weights`: 2 / n for the
  mean of squares, min(1, delta / |r|) for the Huber loss), the gradient is
  g = J^T W r exactly and the Gauss-Newton matrix is G = J^T W J; the step
  solves
      (G + mu (diag(G) + c tr(G) / K)) s = -g,   c = diagonal_floor (1e-12),
  by Cholesky (positive definite for mu > 0; `jnp.linalg.cholesky`, which
  symmetrises its input, so an exactly symmetric G is factored as given).
  The model decrease is -(g.s) - s^T G s / 2; acceptance and the mu
  schedule are those of `scale_by_damped_newton` (damping_schedule "ratio")
  or Marquardt's: mu / 3 on every accepted step, * 4 on every rejected one
  ("accept_reject", `_trust_region`; the pooled fit of `selection.pooled`).
  Needs the extra args `value`, `curvature` (G at params) and
  `derivatives_fn` (params -> objective, gradient, G, e.g.
  `laws.Law.objective_derivatives(..., curvature="gauss_newton")`).
  """

  def step_fn(grad, gn, damping):
    scale = jnp.maximum(jnp.trace(gn), 1e-300) / gn.shape[0]
    chol = jnp.linalg.cholesky(gn + jnp.diag(damping * (jnp.diag(gn) + diagonal_floor * scale)))
    step = jax.scipy.linalg.cho_solve((chol, True), -grad)
    return step, -(grad @ step) - 0.5 * step @ (gn @ step)

  return _trust_region(step_fn, init_damping, min_damping, max_damping,
                       damping_schedule=damping_schedule)


def _make_optimizer(name: str, memory_size: int):
  if name == "newton":
    # Measured on every protocol fit: 18% fewer steps, no objective higher (<= 1.1e-10
    # relative), lower on 82 of 2940 curves (docs/speed.md).
    return scale_by_damped_newton(rejected_damping=1.0)
  if name == "newton_canonical":
    # The canonical stage (`_canonical_stage`): f differences of rounding size do not stop it.
    return scale_by_damped_newton(rejected_damping=1.0, value_rtol=CANONICAL_VALUE_RTOL)
  if name == "newton_cholesky":
    return scale_by_damped_newton(solver="cholesky")
  if name == "gauss_newton":
    return scale_by_gauss_newton()
  if name == "lbfgs":
    return optax.lbfgs(memory_size=memory_size)
  raise ValueError(f"unknown optimizer {name!r}; expected 'auto', 'newton', "
                   "'newton_cholesky', 'gauss_newton' or 'lbfgs'")


def _lane_functions(law, optimizer_name, memory_size):
  """(start, advance) for one (curve, restart) lane.

  start(raw0 [K], data, controls) -> _LoopState and advance(state, data,
  controls) -> _LoopState (one optimiser step; a stopped lane is returned
  unchanged), with data = (data_size [P], log_loss [P], mask [P], aux) and
  controls = (max_steps, gtol, ftol, f_scale, patience) traced scalars, so
  changing them does not recompile. The trust-region optimisers evaluate
  value, gradient and curvature together once per step
  (`laws.Law.objective_derivatives`, closed form where the law has one).
  """
  optimizer = _make_optimizer(optimizer_name, memory_size)
  trust_region = optimizer_name != "lbfgs"
  curvature = "gauss_newton" if optimizer_name == "gauss_newton" else "hessian"

  def derivatives(raw, data):
    d, y, mask, aux = data
    if trust_region:
      return law.objective_derivatives(raw, d, y, mask, aux, curvature=curvature)
    value, grad = jax.value_and_grad(law.objective)(raw, d, y, mask, aux)
    return value, grad, jnp.zeros((0,), raw.dtype)

  def start(raw0, data, controls):
    _, gtol, _, _, _ = controls
    v0, g0, c0 = derivatives(raw0, data)
    ok0 = jnp.isfinite(v0) & jnp.all(jnp.isfinite(g0))
    reason0 = jnp.where(ok0, jnp.where(jnp.max(jnp.abs(g0)) <= gtol, _CONVERGED, _RUNNING),
                        _NONFINITE)
    zero = jnp.array(0, jnp.int32)
    return _LoopState(raw0, optimizer.init(raw0), v0, g0, c0, zero, zero, zero,
                      jnp.asarray(reason0, jnp.int32))

  def advance(s, data, controls):
    d, y, mask, aux = data
    max_steps, gtol, ftol, f_scale, patience = controls
    if trust_region:
      updates, opt_state = optimizer.update(
        s.grad, s.opt_state, s.params, value=s.value, curvature=s.curvature,
        derivatives_fn=lambda raw: derivatives(raw, data))
      params = optax.apply_updates(s.params, updates)
      new_value, new_grad, new_curvature = opt_state.value, opt_state.grad, opt_state.curvature
    else:
      def fun(raw):
        return law.objective(raw, d, y, mask, aux)

      updates, opt_state = optimizer.update(s.grad, s.opt_state, s.params, value=s.value,
                                            grad=s.grad, value_fn=fun)
      params = optax.apply_updates(s.params, updates)
      new_value, new_grad, new_curvature = derivatives(params, data)
    step = s.step + 1
    finite = (jnp.isfinite(new_value) & jnp.all(jnp.isfinite(new_grad))
              & jnp.all(jnp.isfinite(params)))
    # A rejected trust-region step (zero update) is neither progress nor stall.
    moved = jnp.any(updates != 0)
    small = moved & (jnp.abs(s.value - new_value) <= ftol * jnp.maximum(
      jnp.maximum(jnp.abs(new_value), jnp.abs(s.value)), f_scale))
    stall = jnp.where(small, s.stall + 1, jnp.where(moved, 0, s.stall))
    rejected = jnp.where(moved, 0, s.rejected + 1)
    reason = jnp.where(
      ~finite, _NONFINITE,
      jnp.where((jnp.max(jnp.abs(new_grad)) <= gtol) | (stall >= patience)
                | (rejected >= _MAX_REJECTED), _CONVERGED,
                jnp.where(step >= max_steps, _MAX_STEPS, _RUNNING))).astype(jnp.int32)
    new = _LoopState(params, opt_state, new_value, new_grad, new_curvature, step, stall,
                     rejected, reason)
    running = s.reason == _RUNNING
    return jax.tree.map(lambda a, b: jnp.where(running, a, b), new, s)

  return start, advance


def _outputs(s):
  """(raw, value, ||grad||_inf, steps, reason) of lane states."""
  return s.params, s.value, jnp.max(jnp.abs(s.grad), axis=-1), s.step, s.reason


def _solve_lanes(start, advance, raw0, data, controls):
  """Every lane to its stop in one vmapped while loop (lanes that stop early idle)."""
  c, r = raw0.shape[:2]
  curve = jnp.repeat(jnp.arange(c), r)
  lane_data = jax.tree.map(lambda a: a[curve], data)
  states = jax.vmap(start, in_axes=(0, 0, None))(raw0.reshape(c * r, -1), lane_data, controls)
  states = jax.lax.while_loop(
    lambda s: jnp.any(s.reason == _RUNNING),
    lambda s: jax.vmap(advance, in_axes=(0, 0, None))(s, lane_data, controls), states)
  return jax.tree.map(lambda a: a.reshape((c, r) + a.shape[1:]), _outputs(states))


def _solve_queue(start, advance, raw0, data, controls, *, slots, refill_every):
  """Every lane to its stop through a fixed pool of `slots` lanes (a work queue).

  The C * R problems wait in a queue; `slots` of them advance together. Every
  `refill_every` steps the stopped ones write their outputs and free slots
  take the next problems, so a problem that needs many steps no longer makes
  every other lane of the batch wait (each lane's arithmetic is unchanged:
  the outputs equal `_solve_lanes`'). Shapes are fixed: one compilation.
  """
  c, r = raw0.shape[:2]
  n = c * r
  flat0 = raw0.reshape(n, -1)
  vstart = jax.vmap(start, in_axes=(0, 0, None))
  vadvance = jax.vmap(advance, in_axes=(0, 0, None))

  def gather(problem):
    return jax.tree.map(lambda a: a[problem // r], data)

  problem = jnp.arange(slots, dtype=jnp.int32)
  states = vstart(flat0[problem], gather(problem), controls)
  out_shapes = jax.eval_shape(_outputs, jax.tree.map(lambda a: a[0], states))
  outputs = jax.tree.map(lambda x: jnp.zeros((n,) + x.shape, x.dtype), out_shapes)

  def cond(carry):
    return jnp.any(carry[1] >= 0)

  def body(carry):
    states, problem, queued, outputs = carry
    lane_data = gather(jnp.maximum(problem, 0))
    states = jax.lax.fori_loop(0, refill_every, lambda _, s: vadvance(s, lane_data, controls),
                               states)
    done = (problem >= 0) & (states.reason != _RUNNING)
    where = jnp.where(done, problem, n)  # n: out of range, dropped
    outputs = jax.tree.map(lambda o, v: o.at[where].set(v, mode="drop"), outputs,
                           _outputs(states))
    free = done | (problem < 0)
    nxt = queued + jnp.cumsum(free, dtype=jnp.int32) - 1
    take = free & (nxt < n)
    problem = jnp.where(take, nxt, jnp.where(done, -1, problem))
    queued = jnp.minimum(queued + jnp.sum(free, dtype=jnp.int32), n)

    def refill(states):
      fresh = vstart(flat0[jnp.clip(problem, 0, n - 1)], gather(jnp.maximum(problem, 0)),
                     controls)
      return jax.tree.map(lambda f, s: jnp.where(
        take.reshape((-1,) + (1,) * (s.ndim - 1)), f, s), fresh, states)

    states = jax.lax.cond(jnp.any(take), refill, lambda s: s, states)
    return states, problem, queued, outputs

  carry = (states, problem, jnp.asarray(slots, jnp.int32), outputs)
  _, _, _, outputs = jax.lax.while_loop(cond, body, carry)
  return jax.tree.map(lambda a: a.reshape((c, r) + a.shape[1:]), outputs)


@functools.lru_cache(maxsize=64)
def _compiled_fit(law, optimizer_name, memory_size, has_aux, slots=None, refill_every=8):
  """jit of the lanes' solver, cached per law, optimiser and schedule.

  slots=None: all C * R lanes in one vmapped while loop; else the work queue
  of `_solve_queue` with that many slots (callers pass slots < C * R).
  """
  start, advance = _lane_functions(law, optimizer_name, memory_size)

  def solve(raw0, d, y, mask, aux, controls):
    data = (d, y, mask, aux if has_aux else None)
    if slots is None:
      return _solve_lanes(start, advance, raw0, data, controls)
    return _solve_queue(start, advance, raw0, data, controls, slots=slots,
                        refill_every=refill_every)

  return jax.jit(solve)


@functools.lru_cache(maxsize=64)
def _compiled_init(law, has_aux):
  aux_axis = 0 if has_aux else None
  return jax.jit(jax.vmap(law.init_from_uniforms, in_axes=(0, 0, 0, 0, aux_axis)))


def _prepare(law, data_size, log_loss, mask, aux):
  """Validated float64 numpy inputs: (d_in, y_in, valid, num_points, aux_in)."""
  y = np.asarray(log_loss, dtype=np.float64)
  if y.ndim != 2:
    raise ValueError(f"log_loss must be [curves, points], got shape {y.shape}")
  c, p = y.shape
  d = np.asarray(data_size, dtype=np.float64)
  if d.ndim == 1:
    d = np.broadcast_to(d, (c, p))
  if d.shape != (c, p):
    raise ValueError(f"data_size shape {np.shape(data_size)} does not match log_loss {y.shape}")
  m = np.ones((c, p), bool) if mask is None else np.asarray(mask, dtype=bool)
  if m.shape != (c, p):
    raise ValueError(f"mask shape {m.shape} does not match log_loss {y.shape}")
  if law.uses_aux and aux is None:
    raise ValueError(f"law {law.name!r} with an f_term needs aux= (per-curve pytree)")
  valid = m & np.asarray(law.valid_data_size(d)) & np.isfinite(d)
  # Masked entries may be NaN; replace them so no NaN enters any gradient.
  d_in = np.where(valid, d, 1.0)
  y_in = np.where(valid, y, 0.0)
  aux_in = None
  if aux is not None:
    aux_in = jax.tree.map(lambda a: jnp.asarray(a), aux)
    for leaf in jax.tree.leaves(aux_in):
      if leaf.ndim == 0 or leaf.shape[0] != c:
        raise ValueError(f"aux leaves need a leading [curves]={c} axis, got {leaf.shape}")
  return d_in, y_in, valid, valid.sum(axis=1), aux_in


def initial_params(law: forms.Law, data_size, log_loss, mask=None, *, key: jax.Array,
                   num_restarts: int = 8, aux: Any = None) -> np.ndarray:
  """[C, R, K] raw starting points exactly as `fit_curves` draws them (float64).

  Restart 0 of every curve is the law's deterministic (published-style)
  start; the others use U(0, 1) draws from `laws.uniforms_from_key(key,
  [C, R, laws.NUM_INIT_UNIFORMS])`.
  """
  with jax.enable_x64(True):
    d_in, y_in, valid, _, aux_in = _prepare(law, data_size, log_loss, mask, aux)
    return np.asarray(_initial_params(law, d_in, y_in, valid, aux_in, key, num_restarts))


def _initial_params(law, d_in, y_in, valid, aux_in, key, num_restarts, uniforms=None):
  if num_restarts < 1:
    raise ValueError(f"num_restarts must be >= 1, got {num_restarts}")
  shape = (d_in.shape[0], num_restarts, forms.NUM_INIT_UNIFORMS)
  if uniforms is None:
    u = forms.uniforms_from_key(key, shape)
  else:
    u = np.asarray(uniforms, np.float64)
    if u.shape != shape:
      raise ValueError(f"uniforms shape {u.shape} != [curves, restarts, "
                       f"laws.NUM_INIT_UNIFORMS] = {list(shape)}")
  return _compiled_init(law, aux_in is not None)(jnp.asarray(u), d_in, y_in, valid, aux_in)


@dataclasses.dataclass(frozen=True)
class FitOptions:
  """Settings of the fitting engine (`fit_curves`); the defaults are the papers' protocol.

  Attributes:
    optimizer: "auto" (`auto_optimizer`: "gauss_newton" for the Huber
      objective, else "newton"), "newton" (`scale_by_damped_newton`, exact
      Hessian, eigen-decomposition, trust-region style damping),
      "newton_cholesky" (same with a Cholesky solve), "gauss_newton"
      (Levenberg-Marquardt with IRLS weights on the residual Jacobian; on the
      squared-error laws it can stop in worse basins, E -> 0) or "lbfgs"
      (`optax.lbfgs` with zoom line search; same optima, ~10-20x slower here,
      kept for comparison).
    max_steps: step limit per restart (0: the starts, not optimised).
    gtol: gradient tolerance on ||grad||_inf.
    ftol, f_scale, patience: stop when |f_k - f_{k-1}| <= ftol * max(|f|, f_scale)
      for `patience` consecutive steps.
    memory_size: L-BFGS memory (optimizer "lbfgs").
    queue_slots: "auto" (`auto_queue_slots`), an int (lanes advanced together
      by the work queue) or None (one vmapped loop over all lanes). The
      results do not depend on it (up to floating-point vectorisation).
    canonical: "auto" (True for Huber objectives, whose minimisers form flat
      faces), True or False: return the canonical point of the minimisers
      (`_canonical_stage`, docs/laws.md "Canonical point"): among restarts
      within CANONICAL_RTOL of the lowest objective, the one with the least
      sum of squared log residuals, each restart first moved along its face
      to that point. False: the first stage's best restart (rounding decides
      between points of equal objective).

  max_steps, gtol, ftol, f_scale and patience are traced arguments: changing
  them reuses the compiled loop. Another optimizer, memory_size or number of
  queue slots compiles once more.
  """
  optimizer: str = "auto"
  max_steps: int = 500
  gtol: float = 1e-10
  ftol: float = 1e-13
  f_scale: float = 1e-12
  patience: int = 10
  memory_size: int = 10
  queue_slots: int | str | None = "auto"
  canonical: bool | str = "auto"


def fit_curves(law: forms.Law, data_size, log_loss, mask=None, *, key: jax.Array,
               num_restarts: int = 8, aux: Any = None, init_raw=None, uniforms=None,
               options: FitOptions | None = None) -> FitResult:
  """Fits `law` to C curves at once (float64), best of R restarts per curve.

  Minimises law.objective (mean squared log-loss error, or summed Huber for
  the vanilla law) over the law's raw parameters. All (curve, restart) pairs
  run in one jit-compiled `lax.while_loop` of optax updates, vmapped.

  Args:
    law: a `laws.Law` (e.g. `laws.rectified_law()`).
    data_size: [C, P] or [P] (shared grid) numbers of fine-tuning samples D.
    log_loss: [C, P] observed log L.
    mask: [C, P] bool, True where a point is used (default: all). Points where
      the law is undefined (D <= 0 for vanilla) are dropped automatically, and
      masked points may hold any value (NaN included).
    key: PRNG key for the random restarts.
    num_restarts: R >= 1 restarts per curve (restart 0 is the law's
      deterministic, published-style start).
    aux: per-curve pytree with leading axis [C] passed to the law (NTK mode).
    init_raw: optional [C, R, K] starting points replacing the law's initialiser.
    uniforms: optional [C, R, laws.NUM_INIT_UNIFORMS] U(0, 1) draws of the
      law's initialiser replacing those of `key` (e.g. keyed per curve, so
      that a curve's fit does not depend on its batch; budgeted.py).
    options: the engine's settings (`FitOptions`; None: the defaults).

  A new law object, optimizer, input shape or number of queue slots compiles
  once more; the step controls of `FitOptions` are traced (no recompilation).

  Returns:
    FitResult with numpy arrays per curve.
  """
  o = FitOptions() if options is None else options
  if not isinstance(o, FitOptions):
    raise TypeError(f"fit_curves: options must be a fitting.FitOptions, got {type(o).__name__}")
  with jax.enable_x64(True):
    d_in, y_in, valid, num_points, aux_in = _prepare(law, data_size, log_loss, mask, aux)
    c = d_in.shape[0]
    if init_raw is None:
      raw0 = _initial_params(law, d_in, y_in, valid, aux_in, key, num_restarts, uniforms)
    else:
      raw0 = jnp.asarray(init_raw, dtype=jnp.float64)
      if raw0.shape != (c, num_restarts, law.num_params):
        raise ValueError(f"init_raw shape {raw0.shape} != "
                         f"[curves {c}, restarts {num_restarts}, params {law.num_params}]")
    optimizer = auto_optimizer(law) if o.optimizer == "auto" else o.optimizer
    lanes = c * raw0.shape[1]
    slots = auto_queue_slots(lanes) if o.queue_slots == "auto" else o.queue_slots
    if slots is not None and (int(slots) < 1 or int(slots) >= lanes):
      slots = None
    fit = _compiled_fit(law, optimizer, int(o.memory_size), aux_in is not None,
                        None if slots is None else int(slots))
    controls = (jnp.asarray(o.max_steps, jnp.int32), jnp.asarray(o.gtol, jnp.float64),
                jnp.asarray(o.ftol, jnp.float64), jnp.asarray(o.f_scale, jnp.float64),
                jnp.asarray(o.patience, jnp.int32))
    inputs = (jnp.asarray(d_in), jnp.asarray(y_in), jnp.asarray(valid), aux_in)
    raw, value, gnorm, steps, reason = jax.device_get(fit(raw0, *inputs, controls))
    canonical = law.loss == "huber" if o.canonical == "auto" else o.canonical
    tie_key = None
    if canonical:
      raw, value, gnorm, steps, reason, tie_key = _canonical_stage(
        law, (raw, value, gnorm, steps, reason), inputs, controls, slots)
  return _select_best(law, raw, value, gnorm, steps, reason, num_points,
                      not_decreasing(d_in, y_in, valid), tie_key, (d_in, valid, aux_in))


def _canonical_stage(law, stage1, inputs, controls, slots):
  """The canonical point of every lane: damped Newton on the tie-break objective.

  From the endpoint of each finite lane, `stage1` = (raw, value, gnorm,
  steps, reason) [C, R, ...], minimises objective +
  CANONICAL_TIE_BREAK / 2 sum_p r_p^2 (`laws.tie_break_law`) by damped Newton
  to its stationary point (no gradient tolerance: the tie-break's gradient is
  tiny). Returns the lanes' (raw, published objective, ||grad||_inf, steps of
  both stages, first-stage reason, tie key) [C, R, ...]; the tie key is
  sum_p r_p^2 of a canonicalised lane and +inf of the others. Not
  canonicalised (first-stage point kept): lanes that failed in the first
  stage; lanes whose second stage did not converge (it ran down a valley
  whose infimum lies at infinity, where the endpoint depends on the step
  budget and on rounding); lanes whose objective the second stage raised by
  more than CANONICAL_RTOL (relative) or lowered by more than
  CANONICAL_MAX_DESCENT (it left the first stage's basin: from a stall of
  the first stage in a degenerate region it can run into valleys where
  rounding decides the endpoint). A first stage that stopped at max_steps next to a
  minimum is canonicalised like a converged one: which side of the stopping
  rule such a lane ends on is itself a matter of rounding.
  """
  raw1, _, gnorm1, steps1, reason1 = stage1
  max_steps, _, ftol, f_scale, patience = controls
  tie_law = forms.tie_break_law(law, CANONICAL_TIE_BREAK)
  fit = _compiled_fit(tie_law, "newton_canonical", 10, inputs[3] is not None,
                      None if slots is None else int(slots))
  run = reason1 != _NONFINITE
  # A NaN start stops at once ("nonfinite"): the failed lanes take no step.
  start = np.where(run[..., None], raw1, np.nan)
  raw2, _, gnorm2, steps2, reason2 = jax.device_get(fit(
    jnp.asarray(start), *inputs, (max_steps, jnp.zeros((), jnp.float64), ftol, f_scale, patience)))
  summaries = _compiled_summaries(law, inputs[3] is not None)
  value1, _ = jax.device_get(summaries(jnp.asarray(raw1), *inputs))
  value2, sse = jax.device_get(summaries(jnp.asarray(np.where(run[..., None], raw2, raw1)),
                                         *inputs))
  with np.errstate(invalid="ignore"):
    change = (value2 - value1) / np.abs(value1)
  ok2 = (run & (reason2 == _CONVERGED) & np.all(np.isfinite(raw2), axis=-1)
         & (change >= -CANONICAL_MAX_DESCENT) & (change <= CANONICAL_RTOL))
  raw = np.where(ok2[..., None], raw2, raw1)
  value = np.where(ok2, value2, value1)
  steps = steps1 + np.where(ok2, steps2, 0)
  gnorm = np.where(ok2, gnorm2, gnorm1)
  return raw, value, gnorm, steps, reason1, np.where(ok2, sse, np.inf)


@functools.lru_cache(maxsize=64)
def _compiled_summaries(law, has_aux):
  """jit: (published objective, sum_p r_p^2) [C, R] of raw [C, R, K] on the fit's inputs."""

  def one(raw, d, y, mask, aux):
    r = law.residuals(raw, d, y, mask, aux)
    return law.reduce_residuals(r, mask, d), jnp.sum(r * r)

  per_restart = jax.vmap(one, in_axes=(0, None, None, None, None))
  return jax.jit(jax.vmap(per_restart, in_axes=(0, 0, 0, 0, 0 if has_aux else None)))


def auto_optimizer(law: forms.Law) -> str:
  """The default optimiser of a law: "gauss_newton" for Huber objectives, else "newton".

  Measured on every fit of the selection protocol (tests/laws/test_objective_reference.py):
  on the vanilla law's Huber objective, Levenberg-Marquardt with IRLS weights
  stops converged where damped Newton crawls to max_steps (the Huber loss is
  not twice differentiable at |r| = delta) and reaches a lower objective on
  40 of 210 curves; on the squared-error laws Gauss-Newton ends in a worse
  basin than damped Newton on ~6% of the LensLLM curves (up to 76% higher),
  so damped Newton stays their default. Caveat (docs/speed.md): some of the
  vanilla law's lower objectives sit in a degenerate limit of the law (raw
  log B ~ 3.5e5, beta ~ 9e3), which changes its extrapolations; damped Newton
  on the same fits is not reproducible either (its crawling lanes move by up
  to ~3% under 1-ulp changes of the batch layout).
  """
  return "gauss_newton" if law.loss == "huber" else "newton"


def auto_queue_slots(lanes: int) -> int:
  """Work-queue width for `lanes` (curve, restart) problems: lanes / 32, a multiple of 32.

  Measured (2 shared cores, CPU time): with one derivative pass per step the
  cost per lane-step is nearly independent of the width, and a narrower pool
  wastes fewer steps on the last lanes: for the protocol fits (210 curves x 8
  restarts = 1680 lanes, RectifiedFit + LensLLM on flan and gigaword) 32, 64
  and 96 slots took 1.69-1.72 s and 128 slots 1.95 s (load 3.4); for 60 x 8
  lanes 16-32 slots took 0.075-0.077 s, 48 0.079 s, 64 0.085 s. Refilling
  every 4, 8 or 16 steps made no difference. (The older engine, with two
  derivative passes per step, was measured 8x faster with 128 slots than
  one vmapped loop over all 1680 lanes.)
  """
  return max(32, -(-lanes // 32 // 32) * 32)


def not_decreasing(d, y, valid) -> np.ndarray:
  """[C] bool: the curve's log loss y at its largest valid D is >= that at its smallest
  (flat or rising); False with fewer than 2 valid points. d, y, valid: [C, P]."""
  d = np.where(valid, d, np.nan)
  has = valid.sum(axis=1) >= 2
  rows = np.arange(d.shape[0])
  with np.errstate(invalid="ignore"):
    lo = np.nanargmin(np.where(has[:, None], d, 0.0), axis=1)
    hi = np.nanargmax(np.where(has[:, None], d, 0.0), axis=1)
  return has & (y[rows, hi] >= y[rows, lo])


def degenerate_reason(result: FitResult, c: int) -> str:
  """Why curve c's fit has status "degenerate" ("" otherwise)."""
  if result.status[c] != "degenerate":
    return ""
  if result.not_decreasing[c]:
    return "the fitted losses do not decrease with D (flat or rising curve)"
  return (f"the fitted {result.law_name} curve overflowed (a predicted loss at a fitted D is "
          f"non-finite, zero or above {AMPLITUDE_LIMIT:g})")


def _select_best(law, raw, value, gnorm, steps, reason, num_points, flat,
                 tie_key=None, grid=None) -> FitResult:
  """Picks the best finite restart per curve (numpy, [C, R, ...] inputs); flat: [C] bool
  from `not_decreasing`; grid: (data sizes [C, P], valid [C, P], aux) of the fit, where
  the chosen curve's predicted loss must be finite, > 0 and <= AMPLITUDE_LIMIT (None:
  not checked).

  With `tie_key` [C, R] (canonical stage): among the finite restarts whose
  objective is within CANONICAL_RTOL (relative) of the lowest, the one with
  the smallest tie_key (+inf: not canonicalised), then the lowest objective,
  then the lowest index.
  """
  raw, value = np.asarray(raw), np.asarray(value)
  reason = np.asarray(reason).copy()
  ok = (reason != _NONFINITE) & np.isfinite(value) & np.all(np.isfinite(raw), axis=-1)
  reason[~ok] = _NONFINITE
  masked_value = np.where(ok, value, np.inf)
  best = np.argmin(masked_value, axis=1)
  if tie_key is not None:
    lowest = masked_value[np.arange(raw.shape[0]), best][:, None]
    equal = ok & (masked_value <= lowest + CANONICAL_RTOL * np.abs(lowest))
    index = np.broadcast_to(np.arange(raw.shape[1]), equal.shape)
    # Sort keys, last is primary: equal objective first, then the tie key, objective, index.
    order = np.lexsort((index, masked_value, np.where(equal, tie_key, np.inf), ~equal), axis=1)
    best = order[:, 0]
  rows = np.arange(raw.shape[0])
  any_ok = ok.any(axis=1)
  best_reason = np.where(any_ok, reason[rows, best], _NONFINITE)
  best_reason = np.where(num_points == 0, _NO_DATA, best_reason)
  best_raw = np.where(any_ok[:, None], raw[rows, best], np.nan)
  best_raw = np.where((num_points == 0)[:, None], np.nan, best_raw)
  objective = np.where(any_ok & (num_points > 0), masked_value[rows, best], np.inf)
  with np.errstate(invalid="ignore", over="ignore"):  # NaN rows of failed curves stay NaN
    params = {k: np.asarray(v, dtype=np.float64) for k, v in law.constrain(best_raw).items()}
  fitted = any_ok & (num_points > 0)
  overflow = np.zeros(raw.shape[0], bool)
  if grid is not None and fitted.any():
    d, valid, aux = grid
    # The fitted curve, canonical where the parameters are not (docs/laws.md).
    loss = law.predict(np.where(fitted[:, None], best_raw, 0.0), d, aux)
    overflow = np.any(valid & ~((loss > 0) & (loss <= AMPLITUDE_LIMIT)), axis=1)
  best_reason = np.where(fitted & (overflow | flat), _DEGENERATE, best_reason)
  names = np.asarray(STATUS_NAMES, dtype=object)
  status = names[best_reason]
  return FitResult(
    law_name=law.name,
    param_names=law.param_names,
    raw_params=best_raw,
    params=params,
    objective=objective,
    converged=best_reason == _CONVERGED,
    status=status,
    num_steps=np.asarray(steps)[rows, best],
    grad_norm=np.where(any_ok, np.asarray(gnorm)[rows, best], np.nan),
    best_restart=best,
    restart_objectives=masked_value,
    restart_status=names[reason],
    num_points=num_points,
    not_decreasing=np.asarray(flat, bool),
  )
