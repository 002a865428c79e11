r"""Speed of the jit fitting engine against a per-curve scipy loop (same process).

Fits the rectified law L(D) = B / (D_l + D^beta) + E to every curve of the
given benchmark files (default: flan and gigaword, 60 curves, all 15 points)
with R restarts per curve, twice:

  engine: `fitting.fit_curves` (one jit-compiled loop, vmap over curves and
          restarts, float64); compile time = first call - later call.
  scipy:  a Python loop over curves and the SAME R starting points calling
          `scipy.optimize.minimize` on the same objective (mean squared error
          of log L in the same raw parametrisation, written here in numpy).

Prints both times, the ratio scipy / engine (compile excluded) and the
objective comparison per curve. Usage:

  python -m experiments.bench_fit_speed [--benchmark flan --benchmark gigaword]
      [--num_restarts 8] [--scipy_method BFGS] [--scipy_jac numeric|jax]

Curve files are looked up in --data_dir, else $LENSLLM_DATA_DIR, else among
the packaged files (flan, gigaword), else downloaded (`benchmarks.load_curves`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from absl import app, flags, logging

import experiments.common  # noqa: F401  (defines --compilation_cache_dir)
from lensllm_jax import laws
from lensllm_jax.curves import benchmarks
from lensllm_jax.laws import fitting

_BENCHMARK = flags.DEFINE_multi_string("benchmark", ["flan", "gigaword"],
                                       "Curve file names or paths (repeatable).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory holding NAME.csv files.")
_NUM_RESTARTS = flags.DEFINE_integer("num_restarts", 8, "Restarts per curve (both methods).")
_OPTIMIZER = flags.DEFINE_enum(
  "optimizer", "auto", ["auto", "newton", "newton_cholesky", "gauss_newton", "lbfgs"],
  "Engine optimiser (see fitting.fit_curves).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed engine calls after compilation (min taken).")
_SCIPY_METHOD = flags.DEFINE_string("scipy_method", "BFGS", "scipy.optimize.minimize method.")
_SCIPY_JAC = flags.DEFINE_enum("scipy_jac", "numeric", ["numeric", "jax"],
                               "scipy gradient: finite differences (scipy default, as in the "
                               "published code) or a jitted jax gradient.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the restarts.")



def load_all(specs, data_dir):
  """Stacks curve files: data sizes [C, P], log losses [C, P], labels [C]."""
  sets = [benchmarks.load_curves(s, data_dir=data_dir) for s in specs]
  grids = {tuple(c.data_sizes) for c in sets}
  if len(grids) != 1:
    raise ValueError(f"benchmarks {specs} have different D grids; fit them separately")
  d = np.concatenate([np.broadcast_to(c.data_sizes, c.losses.shape) for c in sets])
  y = np.log(np.concatenate([c.losses for c in sets]))
  labels = [f"{c.name}:{m}" for c in sets for m in c.models]
  return d, y, labels


def numpy_rectified_objective(raw, log_d, y):
  """mean_p (log L_pred - y)^2 with the raw parametrisation of laws.rectified_law."""
  beta = np.logaddexp(0.0, raw[2])
  pred = np.logaddexp(raw[0] - np.logaddexp(0.0, beta * log_d - raw[1]), raw[3])
  return np.mean((pred - y) ** 2)


def time_engine(law, d, y, key):
  """(compile seconds, best run seconds, FitResult)."""
  kwargs = dict(key=key, num_restarts=_NUM_RESTARTS.value,
                options=fitting.FitOptions(optimizer=_OPTIMIZER.value))
  t0 = time.perf_counter()
  result = fitting.fit_curves(law, d, y, **kwargs)
  first = time.perf_counter() - t0
  runs = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    result = fitting.fit_curves(law, d, y, **kwargs)
    runs.append(time.perf_counter() - t0)
  return first - min(runs), min(runs), result


def engine_starts(law, d, y, key):
  """The engine's [C, R, K] starting points (same key and initialiser)."""
  return fitting.initial_params(law, d, y, key=key, num_restarts=_NUM_RESTARTS.value)


def time_scipy(law, d, y, starts):
  """Per-curve scipy loop over the same starts: (seconds, best objective [C])."""
  log_d = np.log(np.maximum(d, law.zero_data_size))
  jac = None
  if _SCIPY_JAC.value == "jax":
    with jax.enable_x64(True):
      vg = jax.jit(jax.value_and_grad(lambda r, dd, yy: law.objective(r, dd, yy, dd >= 0)))
      vg(jnp.asarray(starts[0, 0]), jnp.asarray(d[0]), jnp.asarray(y[0]))  # compile

    def fun_and_grad(raw, c):
      with jax.enable_x64(True):
        v, g = vg(jnp.asarray(raw), jnp.asarray(d[c]), jnp.asarray(y[c]))
      return float(v), np.asarray(g)

    jac = True
  best = np.full(d.shape[0], np.inf)
  t0 = time.perf_counter()
  for c in range(d.shape[0]):
    for r in range(starts.shape[1]):
      if jac:
        res = scipy.optimize.minimize(fun_and_grad, starts[c, r], args=(c,), jac=True,
                                      method=_SCIPY_METHOD.value)
      else:
        res = scipy.optimize.minimize(numpy_rectified_objective, starts[c, r],
                                      args=(log_d[c], y[c]), method=_SCIPY_METHOD.value)
      if np.isfinite(res.fun):
        best[c] = min(best[c], res.fun)
  return time.perf_counter() - t0, best


def main(argv):
  del argv
  data_dir = _DATA_DIR.value
  d, y, labels = load_all(_BENCHMARK.value, data_dir)
  law = laws.rectified_law()
  key = jax.random.PRNGKey(_SEED.value)
  logging.info("fitting %d curves x %d restarts", d.shape[0], _NUM_RESTARTS.value)
  compile_s, run_s, result = time_engine(law, d, y, key)
  starts = engine_starts(law, d, y, key)
  scipy_s, scipy_best = time_scipy(law, d, y, starts)

  # Objective check: the engine's own objective, re-evaluated in numpy.
  log_d = np.log(np.maximum(d, law.zero_data_size))
  engine_obj = np.array([numpy_rectified_objective(result.raw_params[c], log_d[c], y[c])
                         if np.all(np.isfinite(result.raw_params[c])) else np.inf
                         for c in range(d.shape[0])])
  diff = engine_obj - scipy_best
  worst = int(np.argmax(diff))
  print(f"curves: {d.shape[0]} ({', '.join(_BENCHMARK.value)}), points per curve: {d.shape[1]}, "
        f"restarts: {_NUM_RESTARTS.value}, optimizer: {_OPTIMIZER.value}")
  names, counts = np.unique(result.status, return_counts=True)
  status_counts = {str(k): int(v) for k, v in zip(names, counts, strict=True)}
  print(f"engine status counts: {status_counts}")
  print(f"engine compile time: {compile_s:.2f} s")
  print(f"engine run time (min of {_REPEATS.value}): {run_s:.3f} s")
  print(f"scipy loop ({_SCIPY_METHOD.value}, jac={_SCIPY_JAC.value}) time: {scipy_s:.2f} s")
  print(f"speed ratio scipy / engine (compile excluded): {scipy_s / run_s:.1f}x")
  print(f"speed ratio scipy / (engine compile + run): {scipy_s / (compile_s + run_s):.2f}x")
  print(f"objective engine - scipy best: max {diff.max():.3e} ({labels[worst]}), "
        f"median {np.median(diff):.3e}; engine better or equal (1e-6) on "
        f"{np.sum(diff <= 1e-6)}/{len(diff)} curves, strictly better (by > 1e-9) on "
        f"{np.sum(diff < -1e-9)}")


if __name__ == "__main__":
  app.run(main)
