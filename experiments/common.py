"""Helpers shared by the experiment binaries.

CSV rows that survive a killed run (`read_rows`, `append_rows`), flag parsing
(`parse_ratios`, `parse_levels`), loading curve files (`load_all`) and the
scoring of selection results that `reproduce_selection` and `lensllm_study`
share (`heldout_rmse`, `method_cost`; the scores are `metrics.selection_scores`).

Binaries import these rather than each other: importing a binary would
define its absl flags a second time. The two flags defined here are shared by
every binary (each imports this module):

  --compilation_cache_dir  JAX's persistent compilation cache: compiled XLA
      programs are stored there and reused by the next run, so a repeated
      run does not recompile. Default $LENSLLM_COMPILATION_CACHE_DIR, else
      ~/.cache/lensllm_jax/jax_cache; an empty value turns it off.
  --reuse_freed_memory  (default on) `host_memory.reuse_freed_memory`: glibc's
      malloc keeps freed memory mapped, so each XLA:CPU train step reuses the
      previous step's buffers instead of faulting in fresh pages.

Both take effect after flag parsing (`absl.app.call_after_init`), so code that
imports a binary without running it (tests) touches neither.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import pathlib
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from lensllm_jax import errors, host_memory
from lensllm_jax.curves import benchmarks
from lensllm_jax.selection import budgeted, metrics

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

_REUSE_FREED_MEMORY = flags.DEFINE_bool(
  "reuse_freed_memory", True,
  "glibc malloc keeps freed memory for reuse (lensllm_jax.host_memory): each XLA:CPU "
  "train step then reuses the last step's buffers instead of faulting in fresh pages.")

# At start, before any computation: threads that already allocated keep their malloc arena.
app.call_after_init(lambda: _REUSE_FREED_MEMORY.value and host_memory.reuse_freed_memory())


# Errors that mean "the input is wrong" (a flag, a config, a file), not "the code is wrong":
# absl's own flag errors and the project's `errors.InputError` hierarchy.
USER_ERRORS = (app.UsageError, flags.Error, errors.InputError)


def fail(message: str) -> None:
  """Ends the program with one line on stderr naming the binary, exit code 2 (bad input).

  A multi-line message (ml_collections embeds the config file's traceback) is
  cut to its first and last lines, which name the flag and the error.
  """
  lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
  text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
  sys.stderr.write(f"{pathlib.Path(sys.argv[0]).stem}: error: {text}\n")
  sys.exit(2)


def repeated_overrides(argv) -> list[str]:
  """The `--config.x` overrides given more than once in argv (refused: never joined)."""
  seen, repeated = set(), []
  for a in argv[1:]:
    if a.startswith("--config."):
      name = a.split("=", 1)[0]
      if name in seen and name not in repeated:
        repeated.append(name)
      seen.add(name)
  return repeated


@contextlib.contextmanager
def _flag_errors_fail(argv):
  """Turns an error of flag parsing into `fail` (one line, exit code 2)."""
  repeated = repeated_overrides(argv)
  if repeated:
    fail(f"flags: {', '.join(repeated)} given more than once; give each override once")
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


def run_config_binary(run) -> None:
  """`run_main` for a binary whose whole job is run(FLAGS.config, FLAGS.output_dir).

  Positional arguments are refused (one line, exit code 2).
  """
  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    run(flags.FLAGS.config, flags.FLAGS.output_dir)

  run_main(main)


def run_main(main) -> None:
  """`app.run(main)`, where bad input ends the program with one clear line and exit code 2.

  Bad input: an unknown or malformed flag, a `--config` file that does not
  load, a `--config.x` override of a field that does not exist or given twice
  (checked while parsing), and inside `main` any of `USER_ERRORS`: absl's
  usage errors and the project's `errors.InputError`
  types (curve file, config, checkpoint, data, workdir). Their messages name
  the flag, file, line or tensor. Anything else is a bug and keeps its
  traceback.
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
    except USER_ERRORS as e:
      fail(str(e))

  app.run(guarded, flags_parser=parse)


def _complete_text(path: pathlib.Path) -> tuple[str, int]:
  """(text of the complete lines, byte length of a cut last line: 0 if none)."""
  data = path.read_bytes()
  cut = len(data) - (data.rfind(b"\n") + 1)
  try:
    return data[:len(data) - cut].decode("utf-8"), cut
  except UnicodeDecodeError as e:
    raise errors.WorkdirError(f"{path}: not UTF-8 text ({e})") from None


def read_rows(path: pathlib.Path) -> list[dict]:
  """Rows of a CSV written by `append_rows` ([] if it does not exist yet or is empty).

  A last line without its newline is the row of a process killed while
  appending it: it is not read (the next `append_rows` removes it), so its
  unit of work is redone. A row with a wrong number of fields is an
  `errors.WorkdirError` naming the file and line.
  """
  if not path.exists():
    return []
  text, cut = _complete_text(path)
  if cut:
    logging.warning("%s: ignoring a cut last row (%d bytes; an interrupted write)", path, cut)
  rows = []
  reader = csv.DictReader(io.StringIO(text))
  for row in reader:
    if None in row or None in row.values():
      raise errors.WorkdirError(f"{path}, line {reader.line_num}: {len(reader.fieldnames)} "
                                "columns in the header, another number in this row")
    rows.append(row)
  return rows


def append_rows(path: pathlib.Path, header, rows) -> None:
  """Appends rows (dicts) to a CSV in one write, with the header if the file is new or empty.

  A cut last row left by a killed run is removed first (its unit was not
  recorded as done and is being redone); a file with another header is an
  `errors.WorkdirError`. Flushed and fsynced, so results survive a killed run
  and a rerun can skip them.
  """
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\r\n")
  with path.open("a+b") as f:
    f.seek(0)
    first = f.readline()
    if not first:
      writer.writeheader()
    elif next(csv.reader([first.decode("utf-8", "replace")]), []) != list(header):
      raise errors.WorkdirError(f"{path}: header {first.decode('utf-8', 'replace').strip()!r}, "
                                f"expected {','.join(header)!r}; not a file of this binary")
    else:
      size = f.seek(0, os.SEEK_END)
      f.seek(max(size - 1, 0))
      if f.read(1) != b"\n":  # a cut last row: drop it
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
        logging.warning("%s: removed a cut last row (an interrupted write)", path)
    for row in rows:
      writer.writerow(row)
    f.write(buf.getvalue().encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


def drop_rows(path: pathlib.Path, header, drop) -> int:
  """Removes the rows r with drop(r) from a CSV of `append_rows` (atomic rewrite); returns
  their count. Used before a unit of work whose rows are incomplete is redone."""
  rows = read_rows(path)
  keep = [r for r in rows if not drop(r)]
  if len(keep) == len(rows):
    return 0
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\r\n")
  writer.writeheader()
  writer.writerows(keep)
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("wb") as f:
    f.write(buf.getvalue().encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(rows) - len(keep)


def _input_file(path, field: str, error) -> pathlib.Path:
  """config.<field>'s file as a Path; `error` (an `errors.InputError` type) if it is missing
  or a directory."""
  p = pathlib.Path(path)
  if p.is_dir():
    raise error(f"{field}: {p} is a directory, not a file")
  if not p.is_file():
    raise error(f"{field}: {p} does not exist")
  return p


def read_json(path, error=errors.ConfigError, field: str = "") -> object:
  """A JSON file's value; `error` naming the file and line where it is not JSON."""
  p = _input_file(path, field or str(path), error)
  try:
    return json.loads(p.read_bytes().decode("utf-8-sig"))
  except UnicodeDecodeError:
    raise error(f"{p}: not UTF-8 text") from None
  except json.JSONDecodeError as e:
    raise error(f"{p}, line {e.lineno}: not valid JSON ({e.msg})") from None


def load_token_ids(path, field: str, vocab_size: int) -> np.ndarray:
  """[N, T] integer token ids of an .npy file (config.<field>), each in [0, vocab_size);
  `errors.DataError` naming the field and file otherwise."""
  p = _input_file(path, field, errors.DataError)
  try:
    ids = np.load(p, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    detail = " ".join(str(e).split())
    raise errors.DataError(f"{field}={p}: not a readable .npy file ({detail})") from None
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
    raise errors.DataError(f"{field}={p}: expected integer token ids [n, T], got {ids.dtype} "
                           f"{ids.shape}")
  if ids.min() < 0 or ids.max() >= vocab_size:
    raise errors.DataError(f"{field}={p}: token ids outside [0, {vocab_size}) (the model's "
                           "vocabulary)")
  return ids


def nonempty(values, name: str) -> list:
  """The list of a config field (methods, benchmarks, laws ...); `ConfigError` if empty or
  with repeats."""
  if isinstance(values, str):
    raise errors.ConfigError(f"config.{name}={values!r}: expected a tuple, e.g. ('{values}',)")
  out = list(values or ())
  if not out:
    raise errors.ConfigError(f"config.{name} is empty: nothing to compute")
  repeated = sorted({str(v) for v in out if out.count(v) > 1})
  if repeated:
    raise errors.ConfigError(f"config.{name}: {repeated} given more than once")
  return out


def integer_field(cfg, name: str, *, low: int | None = None, high: int | None = None,
                  optional: bool = False) -> int | None:
  """cfg.<name> (dotted) as an int in [low, high]; `ConfigError` naming the field otherwise.

  Checked where the config is read, before any work.
  """
  value = cfg
  for part in name.split("."):
    value = value[part]
  if value is None and optional:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise errors.ConfigError(f"config.{name}={value!r}: expected an integer")
  if low is not None and value < low:
    raise errors.ConfigError(f"config.{name}={value}: must be >= {low}")
  if high is not None and value > high:
    raise errors.ConfigError(f"config.{name}={value}: must be <= {high}")
  return int(value)


def validate_sweep_config(cfg) -> None:
  """Range checks of a sweep config's fields (finetune_sweep, select's online mode), before
  any work (`errors.ConfigError` naming the field)."""
  sizes = nonempty(cfg.subsets.sizes, "subsets.sizes")
  for d in sizes:
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
      raise errors.ConfigError(f"config.subsets.sizes: {d!r} must be an integer >= 1 "
                               "(D = 0, the zero-shot point, is always run)")
  names = nonempty([m.name for m in cfg.models], "models (names)")
  if not all(names):
    raise errors.ConfigError("config.models: every model needs a name")
  for name in ("max_len", "num_validation", "num_test", "train.batch_size", "train.max_steps",
               "train.eval_every", "train.eval_batch_size", "train.grad_accum"):
    integer_field(cfg, name, low=1)
  integer_field(cfg, "train.patience", low=0)
  if cfg.task == "synthetic":
    integer_field(cfg, "num_synthetic", low=1)
  if any(not m.hf_dir for m in cfg.models):
    integer_field(cfg, "tokenizer_vocab", low=1)
    integer_field(cfg, "pretrain.batch_size", low=1)


def validate_study_selection(cfg) -> None:
  """config.selection of a study config (ratios, restarts, steps) against its subset sizes."""
  integer_field(cfg, "selection.num_restarts", low=1)
  integer_field(cfg, "selection.max_steps", low=0)
  sizes = nonempty(cfg.subsets.sizes, "subsets.sizes")
  for r in parse_ratios(cfg.selection.ratios, "config.selection.ratios"):
    if max(sizes) / r < min(sizes):
      raise errors.ConfigError(f"config.selection.ratios: ratio {r} gives D_max="
                               f"{max(sizes) / r:g}, below the smallest subset size "
                               f"{min(sizes)} (config.subsets.sizes)")


def validate_study_config(cfg) -> None:
  """Range checks of a configs/study.py config (lensllm_study, build_zoo, ntk_dynamics),
  before any work (`errors.ConfigError` naming the field)."""
  from lensllm_jax.training import study_tasks, zoo  # the study's own modules

  try:
    specs = zoo.zoo_from_dicts([dict(r) for r in nonempty(cfg.zoo, "zoo")])
  except (TypeError, ValueError) as e:
    if isinstance(e, errors.InputError):
      raise
    raise errors.ConfigError(f"config.zoo: {' '.join(str(e).split())}") from None
  for s in specs:
    if s.pretrain_steps < 0:
      raise errors.ConfigError(f"config.zoo[{s.name!r}].pretrain_steps={s.pretrain_steps}: "
                               "must be >= 0")
  for task in nonempty(cfg.tasks, "tasks"):
    if task not in study_tasks.TASK_NAMES:
      raise errors.ConfigError(f"config.tasks: {task!r} is not one of {study_tasks.TASK_NAMES}")
    integer_field(cfg, f"task_max_len.{task}", low=1)
  sizes = nonempty(cfg.subsets.sizes, "subsets.sizes")
  for d in sizes:
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
      raise errors.ConfigError(f"config.subsets.sizes: {d!r} must be an integer >= 1")
  for name in ("tokenizer_vocab", "pretrain_max_len", "num_records", "num_validation",
               "num_test", "pretrain.batch_size", "train.batch_size", "train.eval_every",
               "train.eval_batch_size", "train.max_steps", "ntk.num_probe"):
    integer_field(cfg, name, low=1)
  for name in ("train.patience", "train.min_steps"):
    integer_field(cfg, name, low=0)
  validate_study_selection(cfg)
  # The report's budgeted settings, checked before the hour of zoo and sweeps.
  parse_levels(cfg.selection.budget.levels, "config.selection.budget.levels")
  if cfg.selection.budget.method not in budgeted.BUDGET_METHODS:
    raise errors.ConfigError(f"config.selection.budget.method: {cfg.selection.budget.method!r}; "
                             f"budget methods: {', '.join(budgeted.BUDGET_METHODS)}")
  unknown = sorted(set(cfg.hessian.models) - {s.name for s in specs})
  if unknown:
    raise errors.ConfigError(f"config.hessian.models: {unknown} are not zoo models")
  if cfg.hessian.models:
    for name in ("hessian.num_examples", "hessian.lanczos.iters", "hessian.pac_bayes.examples",
                 "hessian.pac_bayes.iters"):
      integer_field(cfg, name, low=1)
    if cfg.hessian.pac_bayes.examples > cfg.hessian.num_examples:  # a prefix of those
      raise errors.ConfigError(
          f"config.hessian.pac_bayes.examples={cfg.hessian.pac_bayes.examples}: at most "
          f"config.hessian.num_examples={cfg.hessian.num_examples}")


def parse_ratios(values, name: str = "config.ratios") -> list[int]:
  """Budget ratios as positive integers, with an error naming the setting."""
  out = []
  for v in nonempty(values, name.removeprefix("config.")):
    try:
      r = int(v)
    except (TypeError, ValueError):
      raise errors.ConfigError(f"{name}: {v!r} is not an integer") from None
    if r < 1 or (isinstance(v, float) and v != r):
      raise errors.ConfigError(f"{name}: {v!r} must be an integer >= 1")
    out.append(r)
  return out


def parse_levels(values, name: str = "config.budget.levels") -> list[float]:
  """Confidence levels z of the budgeted procedure as finite floats."""
  try:
    out = [float(z) for z in nonempty(values, name.removeprefix("config."))]
  except (TypeError, ValueError):
    raise errors.ConfigError(f"{name}: not numbers: {list(values)}") from None
  if not all(np.isfinite(out)):
    raise errors.ConfigError(f"{name}: {out} must be finite numbers")
  return out


def load_all(specs, data_dir, name: str = "benchmarks") -> list[benchmarks.CurveSet]:
  """Loads every curve file (name or path) of config.<name>; names must be unique, each file
  >= 3 models, every cell measured (`benchmarks.require_complete`)."""
  sets = [benchmarks.require_complete(benchmarks.load_curves(s, data_dir=data_dir))
          for s in specs]
  for c in sets:
    if c.num_models < metrics.MIN_MODELS:
      raise errors.CurveFileError(
          f"{c.source}: {c.num_models} model(s); the selection metrics PearCorr / Spearman need "
          f"at least {metrics.MIN_MODELS} (with 2 models every correlation is +1 or -1)")
  names = [c.name for c in sets]
  if len(set(names)) != len(names):
    raise errors.ConfigError(f"config.{name}: duplicate dataset names {names}")
  return sets


def target_of(curves, target_data_num) -> float:
  """D* of a file: config.target_data_num (a column of the file) or its largest D."""
  d = np.asarray(curves.data_sizes)
  t = float(d.max()) if target_data_num is None else float(target_data_num)
  if not np.any(d == t):
    raise errors.ConfigError(f"config.target_data_num: D*={t:g} is not a column of "
                             f"{curves.source} (columns {d.astype(int).tolist()})")
  return t


def budgets_of(curves, target: float, ratios) -> list[tuple[int, float]]:
  """[(ratio, D_max = D* / ratio)]; `ConfigError` where no fine-tuning point is visible."""
  out = []
  d = np.asarray(curves.data_sizes)
  for r in ratios:
    dmax = target / r
    if not np.any((d > 0) & (d <= dmax)):
      raise errors.ConfigError(f"config.ratios: ratio {r} gives D_max={dmax:g} on "
                               f"{curves.source}, below its smallest fine-tuning size "
                               f"{d[d > 0].min():g}")
    out.append((r, dmax))
  return out


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


def method_cost(reads: str, curves, max_data_num: float, target_data_num: float):
  """(FLOPs per token, ratio to FullTuning) of a fixed-budget method that reads the points
  `reads` names (`Method.reads`, `budgeted.reads_flops`)."""
  flops = budgeted.reads_flops(reads, curves.sizes, curves.data_sizes, max_data_num)
  return flops, flops / budgeted.full_tuning_flops(curves.sizes, target_data_num)


# notes.csv of the binaries that score selections: why a cell of their tables is NaN.
NOTES_HEADER = ("dataset", "method", "ratio", "note")


# Fit statuses (`SelectionResult.status`, `laws.STATUS_NAMES`) that make a result's cells
# mislead, and what each means.
MISLEADING_STATUSES = {
  "degenerate": "in a degenerate limit (the fitted curve overflowed, or the visible curve is "
                "flat or rising)",
  "nonfinite": "non-finite",
}


def status_notes(status, models, listed_in: str | None = None) -> list[str]:
  """Why a result's cells may mislead from its per-model fit statuses [M] (None: no fits):
  how many fits (and which of `models` [M]) ended in a degenerate limit or are non-finite;
  `listed_in`: the file that lists every model's status."""
  status = list(status if status is not None else ())
  where = f" (status in {listed_in})" if listed_in else ""
  return [f"{status.count(st)} of {len(status)} fits {what}: "
          + " ".join(m for m, s in zip(models, status, strict=True) if s == st) + where
          for st, what in MISLEADING_STATUSES.items() if st in status]


def budgeted_status_notes(result, models) -> list[str]:
  """`status_notes` of a `budgeted.BudgetedResult`'s fits [M] (of `models` [M]): those behind
  its final predictions, then the models one of whose fits read by a stopping decision (any
  round) ended degenerate or non-finite."""
  notes = [f"final predictions: {n}" for n in status_notes(result.fit_status or None, models)]
  for st, what in MISLEADING_STATUSES.items():
    ever = np.asarray(result.fit_status_ever.get(st, np.zeros(len(models), bool)))
    if ever.any():
      notes.append(f"{int(ever.sum())} of {len(models)} models had a fit {what} in some round "
                   "of the early stopping: " + " ".join(np.asarray(models)[ever]))
  return notes


def score_notes(result, truth, *, with_rmse: bool = False) -> list[str]:
  """Why the scores of a `SelectionResult` against the true L(D*) [M] are NaN ([] if none is).

  PearCorr and Spearman: `metrics.undefined_reason` (a truth or feature constant to
  rounding, or not finite). With `with_rmse`, the RMSE of L(D*) too: NaN when some
  predicted L(D*) is not finite.
  """
  notes = []
  reason = metrics.undefined_reason(result.feature, truth)
  if reason:
    notes.append(f"PearCorr and Spearman are NaN: {reason}")
  pred = getattr(result, "predicted", None)
  if with_rmse and pred is None:
    notes.append("RMSE is NaN: the method predicts no L(D*) (it only ranks)")
  elif with_rmse and not np.all(np.isfinite(pred)):
    bad = int((~np.isfinite(np.asarray(pred))).sum())
    notes.append(f"RMSE is NaN: the predicted L(D*) is not finite for {bad} of {len(truth)} "
                 "models")
  return notes


def json_float(x):
  """A float for JSON (None for NaN / inf)."""
  x = float(x)
  return x if math.isfinite(x) else None


def atomic_text(path: pathlib.Path, text: str) -> None:
  """Writes `path` whole or not at all (a temporary file renamed over it)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
