r"""Which model to fine-tune: predict L(D*) from curves, or select online by fine-tuning.

  python -m experiments.select --config=configs/select.py \
      --config.curves=PATH --config.target_data_num=N --output_dir=DIR
  python -m experiments.select --config=configs/select.py:online --workdir=DIR
  python -m experiments.select --config=configs/select.py:replay --config.replay=flan \
      --output_dir=DIR

Predict (config.curves): `forecast.forecast` on a curve file whose empty cells
are "not measured": every model's predicted L(D*) with its 80 % interval, the
ranking, the pick.

Online (`:online`) and replay (config.replay): the one early-stopping
procedure `budgeted.early_stopping_selection` with the predictor's own mean
and sd of log L(D*) (`forecast.log_prediction_fn`), on the schedule
D_k = d0 * 2^k <= cap, with two oracles: replay pays with the losses of a
complete curve file (`budgeted.CurveOracle`, 6 N D per pair), online pays by
fine-tuning through the sweep's run machinery (`lensllm_jax.training.sweep`: its
runs.jsonl rows, nested subsets, early stopping, orbax resume,
--distributed) and charges each run's own train FLOPs (`FinetuneOracle`).
The procedure is a function of the paid losses, so a rerun replays the
rounds already run from runs.jsonl without training: a killed run resumes
with the same decisions, and a raised cap, an added model or another z
continue from what was run. The workdir is a sweep workdir
(`sweep.open_workdir`: lock and manifest, models and sizes may be added;
another task, training setting or model spec under the same name is refused,
`--config.overwrite=True` recomputes); --output_dir is locked and keyed on
the config and the curve file the same way (`rundir.open_output_dir`).

Outputs (in --output_dir, or --workdir online): selection.md (first line
`fine-tune MODEL: predicted test loss X [lo, hi] at D = N`), selection.csv,
selection.json, selection.png; online / replay also decisions.jsonl (one row
per round: sizes run, models run, active models, predictions with sd,
stopped models, FLOPs so far and as fractions of (a) the exhaustive sweep of
the schedule and (b) fine-tuning every model on D*), curves.csv (empty cells
for sizes not run); replay also tradeoff.md / tradeoff.csv over
config.report_levels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import app, flags, logging

from experiments import common, reporting
from lensllm_jax import errors, rundir, selection, training
from lensllm_jax.curves import benchmarks
from lensllm_jax.plus import forecast
from lensllm_jax.selection import budgeted, metrics
from lensllm_jax.training import sharding, sweep, textdata

FLAGS = flags.FLAGS


def define_flags() -> None:
  common.define_config_file("configs/select.py", "Selection configuration (configs/select.py).")
  flags.DEFINE_string("output_dir", "", "Output directory (predict, replay).")
  flags.DEFINE_string("workdir", "", "Work directory of the online selection (resumable).")
  flags.DEFINE_bool("distributed", False,
                    "Call jax.distributed.initialize() (online, multi-host GPU/TPU).")


# ------------------------------------------------------------------ outputs ---


def band_sizes(curves, target: float) -> list[float]:
  """Query sizes of the figure's predicted curves: from the largest measured D to D*."""
  d = np.asarray(curves.data_sizes, np.float64)
  lo = float(d[np.asarray(curves.measured).any(0)].max())
  lo = max(lo, float(d[d > 0].min())) if (d > 0).any() else target
  return [float(x) for x in np.geomspace(lo, target, 10)] if target > lo else [target]


def predict_and_write(curves, target: float, predictor: str, out: pathlib.Path, *,
                      key, ranking=None, notes=()) -> forecast.Forecast:
  """`forecast.forecast` (optionally with a given final ranking) and its outputs."""
  fc, band = forecast.forecast(curves, target, predictor=predictor, key=key,
                               curve_sizes=band_sizes(curves, target))
  if ranking is not None:
    fc = forecast.reranked(fc, ranking)
  notes = (*notes, *common.status_notes(fc.fit_status, fc.models))
  reporting.select_outputs(out, fc, curves, band, notes)
  logging.info("%s", fc.headline())
  return fc


# -------------------------------------------------------- the procedure ---


def schedule(cfg, target: float) -> list[float]:
  """D_k = d0 * 2^k <= cap (config.max_data_num, 0: D* / 8)."""
  if cfg.d0 <= 0:
    raise errors.ConfigError(f"config.d0={cfg.d0}: must be > 0")
  cap = float(cfg.max_data_num) or target / 8.0
  if cap < cfg.d0:
    raise errors.ConfigError(f"config.max_data_num={cap:g} is below config.d0={cfg.d0}")
  if cap > target:
    raise errors.ConfigError(f"config.max_data_num={cap:g} is above D* = {target:g}")
  out, d = [], float(cfg.d0)
  while d <= cap:
    out.append(d)
    d *= 2
  if len(out) < cfg.min_points:
    raise errors.ConfigError(
        f"the schedule {[int(x) for x in out]} (config.d0={cfg.d0}, cap {cap:g}) has "
        f"{len(out)} round(s); the stopping rule starts after config.min_points="
        f"{cfg.min_points}: lower config.d0 (e.g. {int(max(1, cap // 2 ** cfg.min_points))}) "
        "or raise config.max_data_num")
  return out


@dataclasses.dataclass(frozen=True)
class Accounting:
  """The references of the compute log.

  full: (b) fine-tuning every model on D* (6 N D* T, T the tokens per example:
  one epoch); exhaustive: (a) every model at every schedule size, a number
  (replay: 6 N D per pair, exact) or fn() -> number (online: the paid runs'
  own FLOPs plus an estimate of the others, `FinetuneOracle.exhaustive`).
  """
  exhaustive: float | Callable[[], float]
  full: float

  def exhaustive_now(self) -> float:
    return float(self.exhaustive() if callable(self.exhaustive) else self.exhaustive)

  def line(self, k: int, entry: dict, models) -> str:
    m = len(models)
    return (f"round {k}: D={int(entry['data_size'])}, active {int(entry['active'].sum())}/{m}, "
            f"spent {100 * entry['flops'] / self.full:.3g} % of full fine-tuning "
            f"({100 * entry['flops'] / self.exhaustive_now():.3g} % of the exhaustive sweep)")


class DecisionLog:
  """decisions.jsonl, rewritten from round 0 by every run of the procedure.

  The procedure is a function of the paid losses, so a rerun (after a kill,
  or with a raised cap / an added model / another z) replays the rounds
  already paid for without training and writes the same rows.
  """

  def __init__(self, path: pathlib.Path, models, accounting: Accounting, level_index: int = 0):
    self.path, self.models, self.acc, self.level = path, tuple(models), accounting, level_index
    self.rows = []
    self.primary = sharding.is_primary()  # with --distributed, process 0 writes
    if self.primary:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text("")

  def __call__(self, i: int, entry: dict) -> None:
    if i != self.level:
      return
    k = len(self.rows)
    pred = np.exp(entry["log_pred"])
    row = {"round": k, "data_size": entry["data_size"],
           "ran": [self.models[j] for j in np.flatnonzero(entry["active"])],
           "active": [self.models[j] for j in np.flatnonzero(entry["active"] & ~entry["stopped"])],
           "stopped": [self.models[j] for j in np.flatnonzero(entry["stopped"])],
           "predictions": {self.models[j]: {"predicted": common.json_float(pred[j]),
                                            "sd_log": common.json_float(entry["sd"][j])}
                           for j in range(len(self.models))},
           "flops": entry["flops"], "fraction_of_full": entry["flops"] / self.acc.full,
           "fraction_of_exhaustive": entry["flops"] / self.acc.exhaustive_now()}
    if "ended_by" in entry:
      row["ended_by"] = entry["ended_by"]
    self.rows.append(row)
    if self.primary:
      with open(self.path, "ab") as f:
        f.write((json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    logging.info("%s", self.acc.line(k, entry, self.models))
    if row["fraction_of_exhaustive"] > 1:
      logging.warning("round %d: spent more than the exhaustive sweep of the schedule would "
                      "(%.3g x)", k, row["fraction_of_exhaustive"])
    if row["fraction_of_full"] > 1:
      logging.warning("round %d: spent more than fine-tuning every model on D* would (%.3g x): "
                      "the schedule is too long for this D*", k, row["fraction_of_full"])


def run_procedure(oracles, levels, meta, steps, cfg, accounting: Accounting, *, on_step=None):
  """`budgeted.early_stopping_selection` with the config's predictor, caps and levels."""
  predict = forecast.log_prediction_fn(cfg.predictor, meta, key=jax.random.key(cfg.seed))
  max_flops = cfg.max_compute_fraction * accounting.full if cfg.max_compute_fraction else None
  return budgeted.early_stopping_selection(
      None, levels, name=cfg.predictor, max_data_num=max(steps),
      target_data_num=meta.target_data_num, min_points=cfg.min_points, predict_views=predict,
      oracles=oracles, steps=steps, max_flops=max_flops, on_step=on_step)


def revealed_curves(view: selection.VisibleCurves, meta: selection.Metadata, source: str):
  """A CurveSet of the paid points (NaN elsewhere; columns with no paid point dropped)."""
  keep = view.mask.any(0)
  return benchmarks.CurveSet(
      name=pathlib.Path(source).stem, source=source, models=meta.models, sizes=meta.sizes,
      families=meta.families, data_sizes=view.data_sizes[keep],
      losses=np.where(view.mask, view.losses, np.nan)[:, keep])


def finish(out: pathlib.Path, result: budgeted.BudgetedResult, view, meta, cfg, accounting):
  """curves.csv, the selection outputs of the procedure's final ranking, the end line."""
  curves = revealed_curves(view, meta, str(out / "curves.csv"))
  benchmarks.write_curves(curves, out / "curves.csv")
  ended = {"one model left": "one model left",
           "size cap": f"the size cap ended it (D = {int(max(view.data_sizes))})",
           "compute cap": "the compute cap ended it"}[result.ended_by]
  note = (f"Online selection at z = {result.z:g}: {ended}; spent "
          f"{100 * result.flops / accounting.full:.3g} % of fine-tuning every model on D* "
          f"({100 * result.flops / accounting.exhaustive_now():.3g} % of the exhaustive sweep of "
          "the schedule). Stopped models are ranked after the survivors.")
  fc = predict_and_write(curves, meta.target_data_num, cfg.predictor, out,
                         key=jax.random.key(cfg.seed), ranking=result.selection.ranking,
                         notes=(note,))
  logging.info("%s", note)
  return fc


# ------------------------------------------------------------------ modes ---


# What the binary writes in --output_dir (and, besides the sweep's files, in --workdir).
OUTPUTS = ("selection.*", "decisions.jsonl", "curves.csv", "tradeoff.*")
# Settings of the procedure, not of the fine-tuning runs: a rerun of an online workdir may
# change them (another z, a raised cap, D*, the predictor) and continue from what was run.
PROCEDURE_FIELDS = ("mode", "curves", "replay", "data_dir", "target_data_num", "predictor",
                    "seed", "max_data_num", "z", "max_compute_fraction", "min_points",
                    "report_levels")


def open_output_dir(cfg, out: pathlib.Path, curves):
  """`rundir.open_output_dir` of predict / replay: keyed on the config, the curve file and
  the files the predictor reads (`forecast.predictor_inputs`)."""
  return rundir.open_output_dir(out, config=cfg, inputs={
      "curves": curves.source, **forecast.predictor_inputs(cfg.predictor)}, outputs=OUTPUTS,
      overwrite=cfg.overwrite)


def open_online_workdir(cfg, workdir: pathlib.Path):
  """`sweep.open_workdir` of the online selection: lock and manifest, where the
  PROCEDURE_FIELDS may change, models and schedule sizes may be added (`sweep.WORKDIR_MERGE`)
  and everything else (task, splits, training, a model's spec) must be unchanged."""
  return sweep.open_workdir(cfg, workdir, overwrite=cfg.overwrite, ignore=PROCEDURE_FIELDS,
                            outputs=OUTPUTS)


def run_predict(cfg, out: pathlib.Path) -> None:
  if not cfg.curves:
    raise errors.ConfigError("config.curves: give a curve file (--config.curves=PATH)")
  curves = benchmarks.load_curves(cfg.curves, data_dir=cfg.data_dir)
  if cfg.target_data_num <= 0:
    raise errors.ConfigError("config.target_data_num: give D*, your fine-tuning set size (> 0)")
  with open_output_dir(cfg, out, curves):
    predict_and_write(curves, float(cfg.target_data_num), cfg.predictor, out,
                      key=jax.random.key(cfg.seed))


def run_replay(cfg, out: pathlib.Path) -> None:
  # Unmeasured cells are allowed where the procedure never pays (an online run's curves.csv).
  curves = benchmarks.load_curves(cfg.replay, data_dir=cfg.data_dir)
  grid = np.asarray(curves.data_sizes, np.float64)
  target = float(cfg.target_data_num) or float(grid.max())
  steps = schedule(cfg, target)
  missing = [d for d in steps if d not in grid]
  if missing:
    raise errors.ConfigError(f"config.replay: {curves.source} has no column for the schedule "
                             f"sizes {[int(d) for d in missing]} (d0={cfg.d0}, "
                             f"cap={int(max(steps))})")
  with open_output_dir(cfg, out, curves):
    meta = selection.metadata_of(curves, target)
    acc = Accounting(exhaustive=float(budgeted.pair_flops(curves.sizes, steps).sum()),
                     full=budgeted.full_tuning_flops(curves.sizes, target))
    # A file with unmeasured cells (an online run's curves.csv) replays config.z only: the
    # other levels would pay for cells it does not have.
    complete = bool(np.asarray(curves.measured).all())
    levels = list(dict.fromkeys([float(cfg.z), *(map(float, cfg.report_levels) if complete
                                                  else ())]))
    log = DecisionLog(out / "decisions.jsonl", curves.models, acc)
    oracles = [budgeted.CurveOracle(curves) for _ in levels]
    try:
      results = run_procedure(oracles, levels, meta, steps, cfg, acc, on_step=log)
    except KeyError as e:  # a paid cell the file does not have
      raise errors.ConfigError(f"config.replay: {e.args[0]}") from None
    finish(out, results[0], oracles[0].view(max(steps)), meta, cfg, acc)
    truth = curves.column(target) if target in grid else None
    truth = truth if truth is not None and np.isfinite(truth).all() else None
    rows, notes = tradeoff_rows(curves, results, acc, truth, target)
    for line in reporting.select_tradeoff_tables(out, curves.name, rows, notes):
      logging.info("%s: %s", curves.name, line)


def tradeoff_rows(curves, results, acc: Accounting, truth, target: float):
  """Per level: the pick, its RelAcc, PearCorr of the final ranking, compute fractions;
  and the notes saying why a RelAcc / PearCorr cell is NaN.

  Returns:
    (rows sorted by z, notes: list of str).
  """
  rows, notes = [], []
  if truth is None:
    notes.append(f"RelAcc and PearCorr are NaN: {curves.source} has no complete column at "
                 f"D* = {target:g} (the true losses)")
  elif curves.num_models < metrics.MIN_MODELS:
    notes.append(f"RelAcc and PearCorr are NaN: {curves.num_models} models, the metrics need "
                 f"at least {metrics.MIN_MODELS}")
  for r in results:
    scores = (metrics.selection_scores(r.selection, truth)
              if truth is not None and curves.num_models >= metrics.MIN_MODELS else {})
    if scores:
      notes += [f"z = {r.z:g}: {n}" for n in common.score_notes(r.selection, truth)]
    notes += [f"z = {r.z:g}: {n}" for n in common.budgeted_status_notes(r, curves.models)]
    rows.append({"z": r.z, "pick": curves.models[r.selection.chosen],
                 "RelAcc": scores.get("RelAcc", math.nan),
                 "PearCorr": scores.get("PearCorr", math.nan),
                 "fraction_of_full": r.flops / acc.full,
                 "fraction_of_exhaustive": r.flops / acc.exhaustive_now(),
                 "rounds": len(r.history), "survivors": int(r.selection.extras["active"].sum()),
                 "ended_by": r.ended_by})
  rows.sort(key=lambda r: r["z"])
  return rows, notes


# ------------------------------------------------------------------ online ---

class Progress:
  """Rounds and runs with an ETA: a bar on a terminal (stderr), else log lines."""

  def __init__(self, total_rounds: int):
    self.total_rounds, self.round, self.t0 = total_rounds, 0, time.time()
    self.runs_done, self.runs_total, self.run_t0 = 0, 0, time.time()
    self.tty = sys.stderr.isatty()

  def _where(self) -> str:
    return "zero-shot" if self.round < 0 else f"round {self.round + 1}/{self.total_rounds}"

  def start_round(self, k: int, num_runs: int) -> None:
    """k = -1: the zero-shot evaluations."""
    self.round, self.runs_done, self.runs_total, self.run_t0 = k, 0, num_runs, time.time()
    self._show(f"{self._where()}: {num_runs} run(s) to do")

  def run_done(self, rec: dict) -> None:
    self.runs_done += 1
    rate = (time.time() - self.run_t0) / self.runs_done
    eta = rate * max(self.runs_total - self.runs_done, 0)
    self._show(f"{self._where()} run {self.runs_done}/{self.runs_total}: {rec['model']} "
               f"D={rec['data_size']} test loss {rec['test_loss']:.4f} "
               f"({rec['wall_seconds']:.1f}s; {rate:.1f}s/run, round ETA {eta:.0f}s)")

  def _show(self, text: str) -> None:
    if self.tty:
      done = int(20 * self.round / max(self.total_rounds, 1))
      sys.stderr.write(f"\r[{'#' * done}{'.' * (20 - done)}] {text}\033[K")
      sys.stderr.flush()
    else:
      logging.info("%s", text)


class FinetuneOracle:
  """The oracle of the online procedure: it pays for a loss by fine-tuning.

  Same interface as `budgeted.CurveOracle` (data_sizes [P] = [0, schedule],
  revealed [M, P], flops, reveal, view, cost). reveal(models, D) runs what
  runs.jsonl lacks (`sweep.sweep_model`, one size) and charges each run's own
  `train_flops`; a run already in runs.jsonl (a killed or earlier invocation)
  is read, not redone, and charged the same, so the procedure's decisions and
  spend do not depend on what was run before. The zero-shot point of every
  model is evaluated at construction (free: no training).
  """

  def __init__(self, cfg, workdir: pathlib.Path, steps, *, mesh, progress: Progress):
    self.cfg, self.workdir, self.mesh, self.progress = cfg, workdir, mesh, progress
    self.tcfg = training.TrainConfig(**cfg.train.to_dict())
    self.runs = sweep.read_runs(workdir / "runs.jsonl")
    self.splits = sweep.load_splits(cfg, workdir)
    self.specs = {spec.name: spec for spec in cfg.models}
    self.names = tuple(self.specs)
    self.data_sizes = np.asarray([0.0, *steps])
    m, p = len(self.names), self.data_sizes.size
    self.revealed = np.zeros((m, p), bool)
    self.losses = np.full((m, p), np.nan)
    self.run_flops = np.zeros((m, p))
    self.flops = 0.0
    self._loaded = None
    progress.start_round(-1, sum((n, 0) not in self.runs for n in self.names))
    for j, name in enumerate(self.names):
      if (name, 0) not in self.runs:
        self._run(name, 0)
      self.losses[j, 0] = self.runs[(name, 0)]["test_loss"]
    self.revealed[:, 0] = True
    zero = [self.runs[(n, 0)] for n in self.names]
    self.sizes = np.asarray([r["size"] for r in zero], np.int64)
    self.families = tuple(r["family"] for r in zero)
    self.seq_len = np.asarray([r["max_len"] for r in zero], np.float64)

  def _run(self, name: str, d: int) -> None:
    if self._loaded is None or self._loaded[0].name != name:
      self._loaded = None  # one model in memory at a time
      m = sweep.load_model(self.specs[name], self.cfg, self.workdir, self.splits, self.mesh)
      data = {k: textdata.encode_examples(v, m.tokenizer, self.cfg.max_len,
                                          encoder_decoder=m.config.is_encoder_decoder)
              for k, v in self.splits.items()}
      self._loaded = (m, data)
    m, data = self._loaded
    sweep.sweep_model(m, data, self.cfg, self.tcfg, self.workdir, self.runs, mesh=self.mesh,
                      sizes=[d], progress=self.progress.run_done)

  def _column(self, data_size: float) -> int:
    cols = np.flatnonzero(self.data_sizes == data_size)
    if cols.size != 1:
      raise KeyError(f"D={data_size:g} is not on the schedule {self.data_sizes.tolist()}")
    return int(cols[0])

  def sixnd(self, data_size: float) -> np.ndarray:
    """[M] 6 N D T: one epoch over D examples of T (padded) tokens, per model."""
    return 6.0 * self.sizes * data_size * self.seq_len

  def cost(self, models, data_size: float) -> float:
    """Estimated cost of a round: a model's last paid run scaled by D / D_last, else 6 N D T.

    Only paid points enter, so the estimate (and a compute-cap decision) is the
    same whether or not the runs are already in runs.jsonl.
    """
    col = self._column(data_size)
    total = 0.0
    for j in np.asarray(models, int):
      if self.revealed[j, col]:
        continue
      paid = np.flatnonzero(self.revealed[j, 1:]) + 1
      total += (self.run_flops[j, paid[-1]] * data_size / self.data_sizes[paid[-1]]
                if paid.size else float(self.sixnd(data_size)[j]))
    return total

  def exhaustive(self) -> float:
    """(a): the paid runs' FLOPs plus the `cost` estimate of every unpaid (model, D_k)."""
    every = np.arange(len(self.names))
    return self.flops + sum(self.cost(every, d) for d in self.data_sizes[1:])

  def reveal(self, models, data_size: float) -> None:
    col = self._column(data_size)
    todo = [j for j in np.asarray(models, int) if not self.revealed[j, col]]
    self.progress.start_round(col - 1, sum((self.names[j], int(data_size)) not in self.runs
                                           for j in todo))
    for j in todo:
      name = self.names[j]
      if (name, int(data_size)) not in self.runs:
        self._run(name, int(data_size))
      rec = self.runs[(name, int(data_size))]
      self.losses[j, col] = rec["test_loss"]
      self.run_flops[j, col] = rec["train_flops"]
      self.flops += float(rec["train_flops"])
      self.revealed[j, col] = True

  def view(self, max_data_num: float) -> selection.VisibleCurves:
    keep = self.data_sizes <= max_data_num
    return selection.VisibleCurves(data_sizes=self.data_sizes[keep], losses=self.losses[:, keep],
                                   mask=self.revealed[:, keep], max_data_num=max_data_num)


def run_online(cfg, workdir: pathlib.Path, *, distributed: bool = False) -> None:
  """The online selection (module docstring); resumable and extendable."""
  logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname)
  sharding.initialize_distributed(distributed)
  target = float(cfg.target_data_num)
  if target <= 0:
    raise errors.ConfigError("config.target_data_num: give D*, your fine-tuning set size (> 0)")
  if len(cfg.models) < 2:
    raise errors.ConfigError(f"config.models: {len(cfg.models)} model(s); selection needs >= 2")
  if tuple(cfg.subsets.sizes):
    raise errors.ConfigError(f"config.subsets.sizes={tuple(cfg.subsets.sizes)}: the online "
                             "selection runs its own schedule (config.d0, config.max_data_num);"
                             " leave it empty")
  steps = schedule(cfg, target)
  # The sweep's subsets block holds the schedule: load_splits checks the pool against it.
  cfg.subsets.sizes = tuple(int(d) for d in steps)
  common.validate_sweep_config(cfg)
  with open_online_workdir(cfg, workdir):
    mesh = sharding.make_mesh() if cfg.data_parallel else None
    t0 = time.time()
    oracle = FinetuneOracle(cfg, workdir, steps, mesh=mesh, progress=Progress(len(steps)))
    meta = selection.Metadata(name=cfg.name, models=oracle.names, sizes=oracle.sizes,
                              families=oracle.families, target_data_num=target)
    acc = Accounting(exhaustive=oracle.exhaustive, full=float(oracle.sixnd(target).sum()))
    log = DecisionLog(workdir / "decisions.jsonl", oracle.names, acc)
    result = run_procedure([oracle], [float(cfg.z)], meta, steps, cfg, acc, on_step=log)[0]
    if sys.stderr.isatty():
      sys.stderr.write("\n")
    if sharding.is_primary():
      finish(workdir, result, oracle.view(max(steps)), meta, cfg, acc)
    logging.info("online selection: %d fine-tuning runs, %.1fs", int(oracle.revealed[:, 1:].sum()),
                 time.time() - t0)


def validate_config(cfg) -> None:
  """The procedure's settings, before any file is read or directory made (`errors.ConfigError`
  naming the field)."""
  if cfg.predictor not in forecast.predictor_names():
    raise errors.ConfigError(f"config.predictor={cfg.predictor!r}: unknown; known: "
                             f"{', '.join(forecast.predictor_names())}")
  common.integer_field(cfg, "seed")
  common.integer_field(cfg, "target_data_num", low=0)
  common.integer_field(cfg, "d0", low=1)
  common.integer_field(cfg, "max_data_num", low=0)
  common.integer_field(cfg, "min_points", low=1)
  z = common.parse_levels((cfg.z,), "config.z")[0]
  if z < 0:
    raise errors.ConfigError(f"config.z={z:g}: must be >= 0")
  if not 0 <= cfg.max_compute_fraction < math.inf:
    raise errors.ConfigError(f"config.max_compute_fraction={cfg.max_compute_fraction}: must be "
                             ">= 0 (0: no cap)")
  if cfg.replay:
    common.parse_levels(cfg.report_levels, "config.report_levels")


def run(cfg, output_dir: str = "", workdir: str = "", *, distributed: bool = False) -> None:
  """The mode of the config (module docstring): predict or replay into output_dir, online
  into workdir; every setting checked first (`validate_config`)."""
  validate_config(cfg)
  if cfg.mode == "online" and not cfg.replay:
    if not workdir:
      raise errors.WorkdirError("--workdir: the online selection needs a work directory")
    run_online(cfg, pathlib.Path(workdir), distributed=distributed)
    return
  out = pathlib.Path(output_dir or workdir or "")
  if not str(out) or str(out) == ".":
    raise errors.WorkdirError("--output_dir: give an output directory")
  t0 = time.time()
  if cfg.replay:
    run_replay(cfg, out)
  else:
    run_predict(cfg, out)
  logging.info("wrote %s in %.1fs", out, time.time() - t0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  run(FLAGS.config, FLAGS.output_dir, FLAGS.workdir, distributed=FLAGS.distributed)


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
