"""Tests of the AtS phase-transition test against a plain per-curve reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lensllm_jax.laws import phases


def _reference_start(log_x, log_y, k, delta):
  """Straightforward per-curve walk (np.polyfit), published conventions."""
  n = len(log_x)
  if n <= k:
    return 0
  for p in range(k, n):
    b, a = np.polyfit(log_x[-p:], log_y[-p:], 1)
    resid = log_y[-p:] - (a + b * log_x[-p:])
    z = abs(log_y[-p - 1] - (a + b * log_x[-p - 1])) / resid.std()
    if z > delta:
      return n - p
  return 1  # published code drops the first point when nothing is rejected


def _power_law_with_knee(knee, n=14, noise=1e-3, seed=0):
  """log L flat-ish (pre-power) before `knee`, exact power law + noise after."""
  rng = np.random.default_rng(seed)
  log_x = np.log(200.0 * 2.0 ** np.arange(n))
  log_y = np.log(3.0) - 0.15 * (log_x - log_x[knee])
  log_y[:knee] = np.log(3.0) + 0.3 * (knee - np.arange(knee))  # far above the line
  return log_x, log_y + noise * rng.standard_normal(n)


@pytest.mark.parametrize("knee", [2, 5, 9])
def test_detects_known_knee(knee):
  log_x, log_y = _power_law_with_knee(knee)
  with jax.enable_x64(True):
    first, num = phases.phase_transition(log_x[None], log_y[None])
  assert int(first[0]) == knee
  assert int(num[0]) == 14 - knee


def test_matches_reference_on_random_curves():
  rng = np.random.default_rng(1)
  curves = []
  for c in range(40):
    knee = int(rng.integers(0, 10))
    log_x, log_y = _power_law_with_knee(knee, noise=10 ** rng.uniform(-4, -1.5), seed=c)
    curves.append((log_x, log_y))
  lx = np.stack([c[0] for c in curves])
  ly = np.stack([c[1] for c in curves])
  for delta in (2.0, 5.0):
    with jax.enable_x64(True):
      first, _ = jax.jit(lambda x, y, d=delta: phases.phase_transition(x, y, delta=d))(lx, ly)
    ref = [_reference_start(x, y, 3, delta) for x, y in curves]
    np.testing.assert_array_equal(np.asarray(first), ref)


def test_mask_equals_truncation():
  """A masked suffix behaves like a shorter curve (budgeted selection uses this)."""
  rng = np.random.default_rng(2)
  lx = np.tile(np.log(200.0 * 2.0 ** np.arange(10)), (6, 1))
  ly = np.log(3.0) - 0.1 * lx + 0.01 * rng.standard_normal(lx.shape)
  lengths = np.array([2, 3, 4, 6, 8, 10])
  mask = np.arange(10)[None, :] < lengths[:, None]
  with jax.enable_x64(True):
    first, num = phases.phase_transition(lx, ly, mask)
    for c, n in enumerate(lengths):
      f1, n1 = phases.phase_transition(lx[c:c + 1, :n], ly[c:c + 1, :n])
      assert int(first[c]) == int(f1[0]) and int(num[c]) == int(n1[0])
      assert int(first[c]) == _reference_start(lx[c, :n], ly[c, :n], 3, 5.0)


def test_short_curves_and_convention():
  lx = np.log(200.0 * 2.0 ** np.arange(6))[None]
  ly = (1.0 - 0.1 * lx)  # exact line: 0/0 never rejects
  with jax.enable_x64(True):
    f_pub, _ = phases.phase_transition(lx, ly)
    f_alt, n_alt = phases.phase_transition(lx, ly, published_convention=False)
    f_short, n_short = phases.phase_transition(lx[:, :3], ly[:, :3])
  assert int(f_pub[0]) == 1 and int(f_alt[0]) == 0 and int(n_alt[0]) == 6
  assert int(f_short[0]) == 0 and int(n_short[0]) == 3


def test_power_phase_line_matches_polyfit():
  rng = np.random.default_rng(3)
  lx = np.tile(np.log(200.0 * 2.0 ** np.arange(8)), (5, 1))
  ly = rng.standard_normal(lx.shape)
  first = np.array([0, 1, 2, 4, 5])
  with jax.enable_x64(True):
    a, b = phases.power_phase_line(jnp.asarray(lx), jnp.asarray(ly), first)
  for c in range(5):
    bb, aa = np.polyfit(lx[c, first[c]:], ly[c, first[c]:], 1)
    np.testing.assert_allclose([a[c], b[c]], [aa, bb], rtol=1e-10, atol=1e-10)
