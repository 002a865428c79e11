"""Pre-power -> power phase transition test of Lin et al. (2024) ("AtS").

Walk backwards from the largest data size D. For p = k, k+1, ... fit the line
log L = a + b log D by least squares to the last p points of a curve, with
residual standard deviation s_p (population std, ddof = 0). The next smaller
point j = n - p - 1 is tested with the standardised residual

    z_p = |log L_j - (a + b log D_j)| / s_p.

The first p with z_p > delta stops the walk: the power phase is the last p
points, i.e. it starts at valid point n - p. If no point is rejected the
published code (linhaowei1/Fine-tuning-Scaling-Law, `_estimate_phase_transition`)
still drops the first point (power phase = points 1..n-1); curves with
n <= k points are entirely in the power phase (start 0). `published_convention`
keeps that behaviour (needed to reproduce the published AtS numbers exactly);
set it to False to start at 0 when nothing is rejected.

Everything is vectorised over curves with a [curves, points] validity mask;
the loop over p is a `lax.fori_loop` (p < points), so the functions jit.
Call them under `jax.enable_x64(True)` with float64 inputs for decisions that
match float64 references bit for bit near the threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _positions(mask):
  """Position of each valid point among the valid points of its curve; [C, P] int."""
  return jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1


def _weighted_line(x, y, w):
  """Least-squares line y ~ a + b x with 0/1 weights w, per curve. Returns (a, b) [C]."""
  sw = w.sum(1)
  sx = (w * x).sum(1)
  sy = (w * y).sum(1)
  sxx = (w * x * x).sum(1)
  sxy = (w * x * y).sum(1)
  den = sw * sxx - sx * sx
  # One distinct x (e.g. a single point): slope 0, like sklearn's LinearRegression.
  b = jnp.where(den != 0, (sw * sxy - sx * sy) / jnp.where(den != 0, den, 1.0), 0.0)
  a = (sy - b * sx) / sw
  return a, b


def phase_transition(log_d, log_l, mask=None, *, k: int = 3, delta: float = 5.0,
                     published_convention: bool = True):
  """Index of the first power-phase point of each curve (AtS test).

  Args:
    log_d: [C, P] log data sizes (D > 0), increasing along P.
    log_l: [C, P] log test losses.
    mask: optional [C, P] bool, True for points the test may use (default all).
      Masked points are skipped (the walk goes over the valid points only).
    k: minimum number of points in the first line fit (published default 3).
    delta: rejection threshold in residual standard deviations (default 5).
    published_convention: see the module docstring.

  Returns:
    (first_index [C] int32: column index into P of the first power-phase point;
     num_power [C] int32: number of valid points from there on).
  """
  log_d = jnp.asarray(log_d)
  log_l = jnp.asarray(log_l, dtype=log_d.dtype)
  if mask is None:
    mask = jnp.ones(log_d.shape, bool)
  mask = jnp.asarray(mask, bool)
  num_points = log_d.shape[1]
  pos = _positions(mask)
  n = mask.sum(1).astype(jnp.int32)  # [C]
  # Replace masked entries by finite values so that 0 * junk stays 0.
  x = jnp.where(mask, log_d, 0.0)
  y = jnp.where(mask, log_l, 0.0)

  def walk(p, carry):
    found, start = carry
    in_window = mask & (pos >= (n - p)[:, None])
    a, b = _weighted_line(x, y, in_window.astype(x.dtype))
    resid = jnp.where(in_window, y - (a[:, None] + b[:, None] * x), 0.0)
    std = jnp.sqrt((resid**2).sum(1) / p.astype(x.dtype))
    is_test = mask & (pos == (n - p - 1)[:, None])
    test = jnp.abs(jnp.where(is_test, y - (a[:, None] + b[:, None] * x), 0.0)).sum(1)
    # Same semantics as numpy: x/0 = inf rejects, 0/0 = nan does not.
    z = test / std
    broke = (p <= n - 1) & (z > delta) & ~found
    return found | broke, jnp.where(broke, n - p, start)

  # A rolled loop: the unrolled one took seconds to compile at P = 16.
  found, start = jax.lax.fori_loop(k, max(k, num_points), walk, (
      jnp.zeros(n.shape, bool), jnp.zeros(n.shape, jnp.int32)))
  no_break = 1 if published_convention else 0
  start = jnp.where(found, start, jnp.where(n > k, no_break, 0))
  # Valid position -> column index.
  first_index = jnp.argmax(mask & (pos == start[:, None]), axis=1).astype(jnp.int32)
  return first_index, (n - start).astype(jnp.int32)


def power_phase_line(log_d, log_l, first_index, mask=None):
  """Least-squares line through the power-phase points (column >= first_index).

  Args:
    log_d, log_l: [C, P] as in `phase_transition`.
    first_index: [C] column index of the first power-phase point.
    mask: optional [C, P] validity mask.

  Returns:
    (intercept [C], slope [C]) of log L = intercept + slope * log D.
  """
  log_d = jnp.asarray(log_d)
  log_l = jnp.asarray(log_l, dtype=log_d.dtype)
  if mask is None:
    mask = jnp.ones(log_d.shape, bool)
  cols = jnp.arange(log_d.shape[1])[None, :]
  w = (jnp.asarray(mask, bool) & (cols >= jnp.asarray(first_index)[:, None])).astype(log_d.dtype)
  x = jnp.where(w > 0, log_d, 0.0)
  y = jnp.where(w > 0, log_l, 0.0)
  return _weighted_line(x, y, w)
