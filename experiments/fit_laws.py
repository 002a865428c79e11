r"""Fits the fine-tuning laws to benchmark curve files (interim main job).

For every file of config.benchmarks (a name such as flan / gigaword / wmt19,
or a CSV path) and every law of config.laws (vanilla, rectified, lensllm in
curve mode), fits all
models' curves at once with `fitting.fit_curves` and writes

  OUTPUT_DIR/NAME_LAW.csv   one row per model: status, objective, fitted
                            parameters, RMSE of the loss on the fitted points
                            and, with --max_data_size, on the held-out larger D;
                            note: why a NaN cell of the row is NaN
  OUTPUT_DIR/NAME_curves.png observed curves and fitted laws for a few models

Existing outputs are skipped; a rerun with another config or other curve files
is refused (manifest.json; --config.overwrite=True refits). Example:

  python -m experiments.fit_laws --config=configs/fit_laws.py --output_dir=results/fit_laws \
      --config.max_data_size=204800

Curve files are looked up in config.data_dir, else $LENSLLM_DATA_DIR, else among
the packaged files (flan, gigaword), else downloaded (`benchmarks.load_curves`).
Takes about a minute on 2 CPU cores (mostly one compilation per law).
"""

from __future__ import annotations

import csv
import os
import pathlib
import tempfile
import time

import jax
import numpy as np
from absl import flags, logging

from experiments import common, reporting  # common also defines --compilation_cache_dir
from lensllm_jax import errors, laws, rundir
from lensllm_jax.curves import benchmarks
from lensllm_jax.laws import fitting


def define_flags() -> None:
  """The binary's flags; defined only when it runs as a program (tests import it)."""
  common.define_config_file("configs/fit_laws.py", "Configuration (configs/fit_laws.py).")
  flags.DEFINE_string("output_dir", "results/fit_laws", "Where results go.")

_PARAM_COLUMNS = ("alpha", "B", "D_l", "F", "beta", "E")


def fit_mask(curves: benchmarks.CurveSet, max_data_size: float | None) -> np.ndarray:
  """[M, P] bool: the points a fit may see."""
  if max_data_size is None:
    return np.ones(curves.losses.shape, bool)
  return np.broadcast_to(curves.data_sizes <= max_data_size, curves.losses.shape).copy()


def fit_one_law(curves, law, mask, key, num_restarts: int):
  """Fits `law` to all curves; returns (FitResult, predicted losses [M, P], seconds)."""
  t0 = time.perf_counter()
  result = fitting.fit_curves(law, curves.data_sizes, np.log(curves.losses), mask, key=key,
                              num_restarts=num_restarts)
  seconds = time.perf_counter() - t0
  with np.errstate(invalid="ignore", over="ignore"):
    pred = law.predict(result, curves.data_sizes)
  return result, pred, seconds


def rmse(pred, obs, mask):
  """Per-row RMSE of the loss over mask (NaN where the mask is empty)."""
  with np.errstate(invalid="ignore"):
    sq = np.where(mask, (pred - obs) ** 2, 0.0)
    n = mask.sum(axis=1)
    return np.where(n > 0, np.sqrt(sq.sum(axis=1) / np.maximum(n, 1)), np.nan)


def rows_for(curves, law, result, pred, mask):
  """CSV rows (dicts) of one (benchmark, law) fit."""
  valid = mask & np.asarray(law.valid_data_size(np.broadcast_to(curves.data_sizes, mask.shape)))
  held = ~mask  # empty without --max_data_size: rmse_heldout is then NaN
  fit_err = rmse(pred, curves.losses, valid)
  held_err = rmse(pred, curves.losses, held)
  rows = []
  for m, model in enumerate(curves.models):
    row = {"benchmark": curves.name, "model": model, "family": curves.families[m],
           "size": int(curves.sizes[m]), "law": law.name, "status": result.status[m],
           "converged": bool(result.converged[m]), "objective": float(result.objective[m]),
           "num_points": int(result.num_points[m]), "num_steps": int(result.num_steps[m]),
           "rmse_fit": float(fit_err[m]), "rmse_heldout": float(held_err[m]),
           "pred_last": float(pred[m, -1]), "true_last": float(curves.losses[m, -1])}
    for name in _PARAM_COLUMNS:
      row[name] = float(result.params[name][m]) if name in result.params else ""
    row["note"] = nan_note(row, valid[m].any(), held[m].any())
    rows.append(row)
  return rows


def nan_note(row: dict, fitted_points: bool, held_points: bool) -> str:
  """Why a row's NaN cells are NaN ("" when none is)."""
  nan = [k for k, v in row.items() if isinstance(v, float) and not np.isfinite(v)]
  why = []
  if "rmse_fit" in nan and not fitted_points:
    why.append("rmse_fit: no point in the law's valid range was fitted")
  if "rmse_heldout" in nan and not held_points:
    why.append("rmse_heldout: no held-out point (config.max_data_size not set or above every D)")
  rest = [k for k in nan if k not in ("rmse_fit", "rmse_heldout") or
          (k == "rmse_fit" and fitted_points) or (k == "rmse_heldout" and held_points)]
  if rest:
    why.append(f"{', '.join(rest)}: the fit's status is {row['status']} (its parameters or "
               "predicted curve are not finite)")
  return "; ".join(why)


def write_rows_atomic(path: pathlib.Path, rows):
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  with os.fdopen(fd, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def run_benchmark(cfg, curves, out_dir, law_list, key):
  mask = fit_mask(curves, cfg.max_data_size)
  png = out_dir / f"{curves.name}_curves.png"
  fits = []
  for law in law_list:
    path = out_dir / f"{curves.name}_{law.name}.csv"
    if path.exists() and png.exists():
      logging.info("skip %s (exists)", path)
      continue
    result, pred, seconds = fit_one_law(curves, law, mask, key, cfg.num_restarts)
    write_rows_atomic(path, rows_for(curves, law, result, pred, mask))
    names, counts = np.unique(result.status, return_counts=True)
    logging.info("%s / %s: %d curves in %.2f s (%.1f curves/s, incl. compile), status %s -> %s",
                 curves.name, law.name, curves.num_models, seconds,
                 curves.num_models / seconds, dict(zip(names.tolist(), counts.tolist(),
                                                       strict=True)), path)
    fits.append((law, result))
  if fits and not png.exists():
    reporting.fit_laws_figure(curves, fits, mask, png, cfg.plot_models)
    logging.info("wrote %s", png)


def run(cfg, output_dir) -> pathlib.Path:
  """Every law on every curve file of the config into output_dir (inputs checked first)."""
  try:
    law_list = [laws.get_law(name.strip()) for name in common.nonempty(cfg.laws, "laws")]
  except (KeyError, ValueError) as e:
    if isinstance(e, errors.InputError):
      raise
    raise errors.ConfigError(f"config.laws: {e}") from None
  specs = common.nonempty(cfg.benchmarks, "benchmarks")
  common.integer_field(cfg, "num_restarts", low=1)
  common.integer_field(cfg, "plot_models", low=0)
  common.integer_field(cfg, "seed")
  if cfg.max_data_size is not None and not cfg.max_data_size > 0:
    raise errors.ConfigError(f"config.max_data_size={cfg.max_data_size}: must be > 0")
  curve_sets = [benchmarks.require_complete(benchmarks.load_curves(spec, data_dir=cfg.data_dir))
                for spec in specs]
  names = [c.name for c in curve_sets]
  if len(set(names)) != len(names):
    raise errors.ConfigError(f"config.benchmarks: duplicate file names {names}")
  key = jax.random.PRNGKey(cfg.seed)
  with rundir.open_output_dir(output_dir, config=cfg,
                              inputs={f"curves/{c.name}": c.source for c in curve_sets},
                              outputs=("*.csv", "*.png"), overwrite=cfg.overwrite,
                              ignore=("data_dir", "plot_models")) as out_dir:
    for i, curves in enumerate(curve_sets):
      logging.info("[%d/%d] benchmark %s (%s)", i + 1, len(curve_sets), curves.name,
                   curves.source)
      run_benchmark(cfg, curves, out_dir, law_list, key)
  return out_dir


if __name__ == "__main__":
  define_flags()
  common.run_config_binary(run)
