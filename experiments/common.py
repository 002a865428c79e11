"""Helpers shared by the experiment binaries.

CSV rows that survive a killed run (`read_rows`, `append_rows`), flag parsing
(`parse_ratios`, `parse_levels`), loading curve files (`load_all`) and the
scoring of selection results that `reproduce_selection` and `lensllm_study`
share (`heldout_rmse`, `method_cost`; the scores are `metrics.selection_scores`).

Binaries import these rather than each other: importing a binary would
define its absl flags a second time. The one flag defined here is shared by
every binary (each imports this module):

  --compilation_cache_dir  JAX's persistent compilation cache: compiled XLA
      programs are stored there and reused by the next run, so a repeated
      run does not recompile. Default $LENSLLM_COMPILATION_CACHE_DIR, else
      ~/.cache/lensllm_jax/jax_cache; an empty value turns it off. It is
      switched on after flag parsing (`absl.app.call_after_init`), so code
      that imports a binary without running it (tests) never touches it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import pathlib
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from lensllm_jax import benchmarks, budgeted, metrics

CACHE_DIR_ENV = "LENSLLM_COMPILATION_CACHE_DIR"


def default_compilation_cache_dir() -> str:
  """$LENSLLM_COMPILATION_CACHE_DIR if set (may be empty: off), else ~/.cache/lensllm_jax/jax_cache."""
  if CACHE_DIR_ENV in os.environ:
    return os.environ[CACHE_DIR_ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "lensllm_jax", "jax_cache")


_COMPILATION_CACHE_DIR = flags.DEFINE_string(
  "compilation_cache_dir", default_compilation_cache_dir(),
  "JAX persistent compilation cache directory (reused across runs; empty: off). Default "
  f"${CACHE_DIR_ENV}, else ~/.cache/lensllm_jax/jax_cache.")


def enable_compilation_cache(path: str | None) -> str | None:
  """Turns JAX's persistent compilation cache on in `path` (None / "": leaves it off).

  Every compiled program is cached, however short its compilation (the
  protocol's many small programs add up). Returns the directory used.
  """
  if not path:
    return None
  import jax  # the binaries import jax anyway; keep this module light for tests

  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


app.call_after_init(lambda: enable_compilation_cache(_COMPILATION_CACHE_DIR.value))


# Errors that mean "the input is wrong" (a flag, a config, a curve file), not "the code is wrong".
USER_ERRORS = (app.UsageError, flags.Error, benchmarks.CurveFormatError,
               benchmarks.CurveDownloadError, FileNotFoundError)


def fail(message: str) -> None:
  """Ends the program with one line on stderr naming the binary, exit code 2 (bad input).

  A multi-line message (ml_collections embeds the config file's traceback) is
  cut to its first and last lines, which name the flag and the error.
  """
  lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
  text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
  sys.stderr.write(f"{pathlib.Path(sys.argv[0]).stem}: error: {text}\n")
  sys.exit(2)


@contextlib.contextmanager
def _flag_errors_fail(argv):
  """Turns an error of flag parsing into `fail` (one line, exit code 2)."""
  try:
    yield
  except (AttributeError, KeyError) as e:
    # ml_collections' error for an override of a field the config does not have.
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    inner = e
    while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError('...'))
      inner = inner.args[0]
    detail = " ".join(str(inner).split())  # one line
    fail(f"flags: the config has no field {detail} (overrides given: {', '.join(given)})")
  except (flags.Error, TypeError, ValueError, OSError) as e:
    fail(f"flags: {e}")


def define_config_file(default: str, help_string: str) -> None:
  """`--config` (ml_collections, locked), as `config_flags.DEFINE_config_file`.

  When `--config` itself is not on the command line, ml_collections applies
  the `--config.x` overrides to the default file while the flag is DEFINED;
  a bad override then fails here, with the same one line as in `run_main`.
  """
  with _flag_errors_fail(sys.argv):
    config_flags.DEFINE_config_file("config", default, help_string)


def run_config_binary(run, user_errors=()) -> None:
  """`run_main` for a binary whose whole job is run(FLAGS.config, FLAGS.output_dir).

  Positional arguments are refused (one line, exit code 2).
  """
  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    run(flags.FLAGS.config, flags.FLAGS.output_dir)

  run_main(main, user_errors)


def run_main(main, user_errors=()) -> None:
  """`app.run(main)`, where bad input ends the program with one clear line and exit code 2.

  Bad input: an unknown or malformed flag, a `--config` file that does not
  load or a `--config.x` override of a field that does not exist (checked
  while parsing), and inside `main` any of `USER_ERRORS + user_errors` (for
  example `models.CheckpointError` in the binaries that read checkpoints).
  Their messages name the flag, file, line or tensor. Anything else is a bug
  and keeps its traceback.
  """
  def parse(argv):
    with _flag_errors_fail(argv):
      rest = flags.FLAGS(argv)
    for name in flags.FLAGS:
      error = getattr(flags.FLAGS[name].value, "_error", None)  # a --config file that did not load
      if error is not None:
        fail(f"--{name}: {error}")
    return rest

  def guarded(argv):
    try:
      main(argv)
    except USER_ERRORS + tuple(user_errors) as e:
      fail(str(e))

  app.run(guarded, flags_parser=parse)


def read_rows(path: pathlib.Path) -> list[dict]:
  """Rows of a CSV written by `append_rows` ([] if it does not exist yet)."""
  if not path.exists():
    return []
  with path.open(newline="") as f:
    return list(csv.DictReader(f))


def append_rows(path: pathlib.Path, header, rows) -> None:
  """Appends rows (dicts) to a CSV, writing the header if the file is new.

  Flushed and fsynced, so results survive a killed run and a rerun can skip them.
  """
  new = not path.exists()
  with path.open("a", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=header)
    if new:
      writer.writeheader()
    for row in rows:
      writer.writerow(row)
    f.flush()
    os.fsync(f.fileno())


def parse_ratios(values, name: str = "config.ratios") -> list[int]:
  """Budget ratios as positive integers, with an error naming the setting."""
  out = []
  for v in values:
    try:
      r = int(v)
    except (TypeError, ValueError):
      raise app.UsageError(f"{name}: {v!r} is not an integer") from None
    if r < 1:
      raise app.UsageError(f"{name}: {r} must be >= 1")
    out.append(r)
  return out


def parse_levels(values, name: str = "config.budget_levels") -> list[float]:
  """Confidence levels z of the budgeted procedure as floats."""
  try:
    return [float(z) for z in values]
  except (TypeError, ValueError):
    raise app.UsageError(f"{name}: not numbers: {list(values)}") from None


def load_all(specs, data_dir) -> list[benchmarks.CurveSet]:
  """Loads every curve file (name or path); names must be unique, each file >= 3 models,
  every cell measured (`benchmarks.require_complete`)."""
  sets = [benchmarks.require_complete(benchmarks.load_curves(s, data_dir=data_dir))
          for s in specs]
  for c in sets:
    if c.num_models < metrics.MIN_MODELS:
      raise app.UsageError(
          f"{c.source}: {c.num_models} model(s); the selection metrics PearCorr / Spearman need "
          f"at least {metrics.MIN_MODELS} (with 2 models every correlation is +1 or -1)")
  names = [c.name for c in sets]
  if len(set(names)) != len(names):
    raise app.UsageError(f"--benchmark: duplicate dataset names {names}")
  return sets


# ------------------------------------------------ scoring of selections ---


def heldout_rmse(result, curves, max_data_num: float, target_data_num: float):
  """Curve RMSE (loss units) of a result's predictor on the held-out points.

  Held out: the grid sizes D with D_max < D <= D*, which the method never saw.

  Returns:
    (per_model [M], pooled) as `metrics.curve_rmse`.
  """
  d = np.asarray(curves.data_sizes, np.float64)
  held = (d > max_data_num) & (d <= target_data_num)
  pred = result.predictor.predict(d[held])
  return metrics.curve_rmse(pred, np.asarray(curves.losses)[:, held])


def method_cost(method: str, curves, max_data_num: float, target_data_num: float):
  """(FLOPs per token, ratio to FullTuning) of a fixed-budget method (`budgeted.method_flops`)."""
  flops = budgeted.method_flops(method, curves.sizes, curves.data_sizes, max_data_num)
  return flops, flops / budgeted.full_tuning_flops(curves.sizes, target_data_num)
