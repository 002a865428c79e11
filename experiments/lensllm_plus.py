r"""LensLLM+ (the project's recommended predictor) under the leave-one-dataset-out protocol.

    python -m experiments.lensllm_plus --config=configs/lensllm_plus.py \
        --output_dir=results/lensllm_plus

LensLLM+ on a reported file is the candidate of `plus.candidates` (the pooled
LensLLM fit PooledLensLLM, the CurvePFN, the dynamic-F law, the context PFN, their blends
with AtS, AtS) with the best mean criterion (mean PearCorr + mean RelAcc over the ratios) on
the OTHER files. config.benchmarks files are reported;
config.train_only_benchmarks files (the project's own curve files, written by
experiments/lensllm_study.py in the public format) are training files of every
fold and never reported. They are scored on the ratios (relative to their own
D*) that leave at least 2 visible fine-tuning points
(`protocol.training_ratios`; 8..64 for D* = 25600). The reported run uses both
study files; that was decided before any run with them, not from the reported
numbers.

Steps (the expensive ones write their CSV as they go; a rerun skips finished work):

  0. inputs      every file read, its role, ratios and sha256, the PFN weights'
                 sha256 and the fit settings -> inputs.csv; a rerun whose
                 config or inputs changed stops with an error rather than
                 mixing results (manifest.json, lensllm_jax/rundir.py).
  1. grid        every setting of `protocol.default_grid()` on every file,
                 every budget ratio -> grid.csv (dataset,config,ratio,metric,value).
  2. pooled      for each reported file, the PooledLensLLM setting with the best
                 mean criterion on the OTHER files -> chosen.csv; and, for each
                 of those training files t, the setting chosen the same way on
                 the training files other than t (the nested setting
                 PooledLensLLM is scored with on t, `protocol.nested_choices`) ->
                 chosen_nested.csv.
  3. predict     every candidate base and baseline on every file's budget
                 views (`candidates.file_predictions`) -> predictions.csv
                 (dataset,job,key,ratio,values: L(D*) of the models for
                 key = job, the sd of log L(D*) for job_sd, a quantile of
                 L(D*) for job_q<level>; `prediction_rows`); the per-model fit
                 statuses of each job (empty for a job that fits no law) ->
                 fit_status.csv (dataset,job,ratio,statuses); a job is done
                 when both files have its rows.
  4. choose      every candidate scored on every file, PooledLensLLM with the fold's
                 setting on the held-out file and the nested one on each
                 training file -> candidates.csv (fold,dataset,candidate,ratio,metric,
                 value); the chosen candidate of each file, from the other
                 files' rows only -> candidates_chosen.csv; the PFN's 80%
                 interval coverage -> candidates_coverage.csv; the choice's
                 stability (runner-up and margin; the choice without each
                 training file in turn, PooledLensLLM nested again, its new
                 settings predicted in step 3) -> candidates_stability.csv.
  5. report      on each reported file LensLLM+ (= its chosen candidate) beside
                 AtS, RectifiedFit and LensLLM -> results.csv (dataset,ratio,
                 method,metric,value; PearCorr, RelAcc, Spearman, RMSE = RMSE
                 of L(D*) over the models, loss units), and the compute each
                 reads at each ratio relative to AtS at ratio 8 -> cost.csv;
                 why a score of results.csv or candidates.csv is NaN (per
                 file, method and ratio), which of its fits ended degenerate or
                 non-finite (fit_status.csv), or that num_steps=0 left the fits
                 unoptimised -> notes.csv (only when there is a note).
  6. budgeted    the early-stopping procedure of `budgeted.py` with the chosen
                 candidate's own predictive mean and sd of log L(D*)
                 (`candidates.budgeted_candidate_selection`) at several
                 confidence levels -> budgeted.csv (a NaN PearCorr's cause,
                 and the models whose fits read by its decisions ended
                 degenerate or non-finite -> budgeted_notes.csv).
  7. tables      lensllm_plus.md (where its numbers come from, LensLLM+ vs the
                 baselines, the choice's stability, every candidate's means,
                 the targets, compute) and candidates.md (the choice's
                 evidence: every candidate's criterion on each training file;
                 dynamic vs constant F; the PFN's calibration), rendered by
                 `experiments/reporting.py`.

Steps 4 and 5 are recomputed from predictions.csv on every run (cheap).

Held-out evaluation: flan and gigaword are LensLLM+'s development files
(docs/lensllm_plus.md, "How these numbers were made"). A file it was never
defined on, WMT19 of Lin et al. (2024), is fetched by name
(`benchmarks.load_curves`) when added as a reported file, e.g.
`--config.benchmarks="('flan','gigaword','wmt19')" --output_dir=runs/lensllm_plus_wmt19`.
Delete the output directory for a cold run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import time

import jax
import numpy as np
from absl import flags, logging

from experiments import common, reporting
from lensllm_jax import errors, rundir, selection
from lensllm_jax.plus import candidates, pfn, protocol
from lensllm_jax.selection import budgeted, methods, metrics, pooled

PLUS = candidates.PLUS_NAME  # "LensLLM+", the protocol-chosen candidate


def define_flags() -> None:
  """The binary's flags; defined only when it runs as a program, so that tests can
  import it beside experiments.reproduce_selection (same flag names)."""
  common.define_config_file("configs/lensllm_plus.py",
                            "Experiment configuration (configs/lensllm_plus.py[:public]).")
  flags.DEFINE_string("output_dir", None, "Output directory.", required=True)


GRID_HEADER = ("dataset", "config", "ratio", "metric", "value")
CHOSEN_HEADER = ("held_out", "trained_on", "config", "strength", "pooled", "covariates",
                 "pre_power_weight", "huber_delta", "empirical_bayes", "train_criterion")
NESTED_HEADER = ("held_out", "scored_on", "trained_on", "config", "train_criterion")
PRED_HEADER = ("dataset", "job", "key", "ratio", "values")
STATUS_HEADER = ("dataset", "job", "ratio", "statuses")
CAND_HEADER = ("fold", "dataset", "candidate", "ratio", "metric", "value")
CAND_CHOSEN_HEADER = ("held_out", "trained_on", "candidate", "pooled_setting", "train_criterion")
RESULT_HEADER = ("dataset", "ratio", "method", "metric", "value")
COST_HEADER = ("dataset", "method", "setting", "flops", "relative_to_ats8", "RelAcc", "PearCorr")
BUDGET_HEADER = ("dataset", "method", "candidate", "setting", "flops", "relative_to_ats8",
                 "RelAcc", "PearCorr")
BASELINES = candidates.BASELINES  # the papers' proposed methods, AtS first
INPUT_HEADER = ("dataset", "role", "source", "ratios", "sha256")
NOTES_HEADER = common.NOTES_HEADER  # notes.csv, budgeted_notes.csv: why a cell is NaN
STABILITY_HEADER = ("held_out", "left_out", "trained_on", "candidate", "train_criterion",
                    "runner_up", "runner_up_criterion", "margin")
# LensLLM+'s definition was revised while its numbers on these files were visible
# (docs/lensllm_plus.md, "How these numbers were made").
# --------------------------------------------------------------- steps ---


def cached_grid_evaluator(out: pathlib.Path):
  """An `evaluate` for `protocol.leave_one_out` that stores tables in grid.csv."""
  path = out / "grid.csv"

  def evaluate(curves, configs, *, key, options: protocol.ProtocolOptions):
    ratios = options.ratios
    rows = [r for r in common.read_rows(path) if r["dataset"] == curves.name]
    have = {(r["config"], int(r["ratio"]), r["metric"]): float(r["value"]) for r in rows}
    names = [c.name for c in configs]
    todo = [c for c in configs
            if not all((c.name, r, m) in have for r in ratios for m in protocol.METRICS)]
    logging.info("[%s] grid: %d of %d settings already in %s", curves.name,
                 len(configs) - len(todo), len(configs), path)
    if todo:
      logging.info("[%s] grid: fitting %d settings x %d ratios (one batched call)...",
                   curves.name, len(todo), len(ratios))
      t = time.time()
      table, _ = protocol.evaluate_grid(curves, todo, key=key, options=options)
      new = [{"dataset": curves.name, "config": c.name, "ratio": r, "metric": m,
              "value": f"{table[c.name][m][i]:.6f}"}
             for c in todo for i, r in enumerate(ratios) for m in protocol.METRICS]
      common.append_rows(path, GRID_HEADER, new)
      have.update({(row["config"], int(row["ratio"]), row["metric"]): float(row["value"])
                   for row in new})
      dt = time.time() - t
      logging.info("[%s] grid: %d settings x %d ratios in %.1fs (%.2f settings/s)", curves.name,
                   len(todo), len(ratios), dt, len(todo) / dt)
    table = {n: {m: np.array([have[(n, r, m)] for r in ratios]) for m in protocol.METRICS}
             for n in names}
    return table, None

  return evaluate


def load_statuses(out: pathlib.Path, name: str, ratios) -> dict[str, dict[int, list[str]]]:
  """fit_status.csv of one file: job -> ratio -> [M] fit statuses ([] for a job that fits
  no law)."""
  have = {}
  for r in common.read_rows(out / "fit_status.csv"):
    if r["dataset"] == name and int(r["ratio"]) in ratios:
      have.setdefault(r["job"], {})[int(r["ratio"])] = r["statuses"].split()
  return have


# predictions.csv holds one row per (file, job, key, ratio): the key names what the values
# are, `job` the mean L(D*), `job_sd` the sd of log L(D*), `job_q<level>` a quantile of L(D*).
# `prediction_rows` writes this convention and `read_predictions` parses it; everything else
# holds the typed `candidates.BasePrediction`.
SD_SUFFIX, QUANTILE_SUFFIX = "_sd", "_q"


def prediction_rows(dataset: str, job: str, prediction: candidates.BasePrediction,
                    ratios) -> list[dict]:
  """predictions.csv rows of one job's `BasePrediction` [R, M] on one file (values with 17
  significant digits: read back, they are the same float64 numbers)."""
  keys = {job: prediction.mean}
  if prediction.sd_log is not None:
    keys[job + SD_SUFFIX] = prediction.sd_log
  keys.update({f"{job}{QUANTILE_SUFFIX}{q:g}": v for q, v in prediction.quantiles.items()})
  return [{"dataset": dataset, "job": job, "key": k, "ratio": r,
           "values": " ".join(f"{x:.17g}" for x in v[i])}
          for k, v in keys.items() for i, r in enumerate(ratios)]


def status_rows(dataset: str, job: str, prediction: candidates.BasePrediction,
                ratios) -> list[dict]:
  """fit_status.csv rows of one job on one file: its [M] fit statuses per ratio (empty for a
  job that fits no law, status None)."""
  fits = prediction.status
  return [{"dataset": dataset, "job": job, "ratio": r,
           "statuses": " ".join(fits[i]) if fits is not None else ""}
          for i, r in enumerate(ratios)]


def read_predictions(out: pathlib.Path, dataset: str,
                     ratios) -> dict[str, candidates.BasePrediction]:
  """The jobs of one file in predictions.csv (inverse of `prediction_rows`), with their fit
  statuses from fit_status.csv: job -> `BasePrediction` [R, M] over `ratios`.

  Only jobs with a row for every key and ratio are returned (a job cut short is
  redone); `status` is None for a job with no statuses at some ratio or none at
  all (a job that fits no law).
  """
  path = out / "predictions.csv"
  have: dict[str, dict[str, dict[int, np.ndarray]]] = {}
  for n, r in enumerate(common.read_rows(path), start=2):
    if r["dataset"] == dataset and int(r["ratio"]) in ratios:
      job, key = r["job"], r["key"]
      if key != job and key != job + SD_SUFFIX and not key.startswith(job + QUANTILE_SUFFIX):
        raise errors.WorkdirError(f"{path}: line {n}: key {key!r} is not {job!r}, "
                                  f"{job + SD_SUFFIX!r} or {job + QUANTILE_SUFFIX!r}<level>")
      have.setdefault(job, {}).setdefault(key, {})[int(r["ratio"])] = np.array(
        [float(x) for x in r["values"].split()])
  status = load_statuses(out, dataset, ratios)
  preds = {}
  for job, keys in have.items():
    if not all(set(ratios) <= set(per) for per in keys.values()) or job not in keys:
      continue
    col = {k: np.stack([per[r] for r in ratios]) for k, per in keys.items()}
    fits = [status.get(job, {}).get(r) for r in ratios]
    preds[job] = candidates.BasePrediction(
      col.pop(job), col.pop(job + SD_SUFFIX, None),
      {float(k[len(job + QUANTILE_SUFFIX):]): v for k, v in col.items()},
      np.array(fits, dtype=str) if all(fits) else None)
  return preds


def cached_predictions(out: pathlib.Path):
  """A `predict` for `candidates.leave_one_out` that stores every job in predictions.csv
  and its fit statuses in fit_status.csv.

  A job (`candidates.prediction_jobs`) is rerun only if some ratio of the
  file has no row for it in either file (a directory made before fit_status.csv
  existed reruns its jobs for their statuses only); the predictions returned are
  always the ones read back from the CSV (`read_predictions`, 17 significant
  digits), so a rerun scores the same numbers.
  """
  def predict(curves, ratios, *, ctx, pooled_configs, target_data_num):
    jobs = candidates.prediction_jobs(ctx, pooled_configs)
    predicted = read_predictions(out, curves.name, ratios)
    status = load_statuses(out, curves.name, ratios)
    todo = [j for j in jobs if j not in predicted or not set(ratios) <= set(status.get(j, ()))]
    logging.info("[%s] predictions: %d of %d jobs already in %s", curves.name,
                 len(jobs) - len(todo), len(jobs), out / "predictions.csv")
    for job in todo:
      t = time.time()
      _, preds = candidates.file_predictions(curves, ratios, ctx=ctx,
                                             pooled_configs=pooled_configs,
                                             target_data_num=target_data_num, only=[job])
      common.append_rows(out / "fit_status.csv", STATUS_HEADER,
                         status_rows(curves.name, job, preds[job], ratios))
      if job not in predicted:
        common.append_rows(out / "predictions.csv", PRED_HEADER,
                           prediction_rows(curves.name, job, preds[job], ratios))
      logging.info("[%s] predictions: %s in %.1fs", curves.name, job, time.time() - t)
    predicted = read_predictions(out, curves.name, ratios)
    truth = protocol.budget_views(curves, ratios, target_data_num)[1]
    return truth, {j: predicted[j] for j in jobs}

  return predict


def _shown(path) -> str:
  """A path relative to the working directory when inside it (results name no machine)."""
  p = pathlib.Path(path).resolve()
  try:
    return str(p.relative_to(pathlib.Path.cwd().resolve()))
  except ValueError:
    return str(path)


def write_inputs(out, curve_sets, train_only, ratios, *, pfn_dir: pathlib.Path, settings: str):
  """inputs.csv: every file read (role, ratios, sha256), the PFN weights and the fit settings."""
  rows = []
  for role, sets in (("reported", curve_sets), ("train_only", train_only)):
    for c in sets:
      rs = ratios if role == "reported" else protocol.training_ratios(c, ratios)
      digest = hashlib.sha256(pathlib.Path(c.source).read_bytes()).hexdigest()
      rows.append({"dataset": c.name, "role": role, "source": _shown(c.source),
                   "ratios": " ".join(map(str, rs)), "sha256": digest})
  weights = pfn_dir / "weights.msgpack"
  rows.append({"dataset": "CurvePFN", "role": "predictor", "source": _shown(pfn_dir), "ratios": "",
               "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()})
  context = pfn.CONTEXT_PFN_WEIGHTS / "weights.msgpack"
  rows.append({"dataset": "ContextPFN", "role": "predictor",
               "source": _shown(pfn.CONTEXT_PFN_WEIGHTS),
               "ratios": "", "sha256": hashlib.sha256(context.read_bytes()).hexdigest()})
  rows.append({"dataset": "settings", "role": "settings", "source": settings, "ratios": "",
               "sha256": hashlib.sha256(settings.encode()).hexdigest()})
  # Cached rows made from other inputs are refused before this (`rundir.open_output_dir`).
  rewrite(out / "inputs.csv", INPUT_HEADER, rows)


def rewrite(path: pathlib.Path, header, rows) -> None:
  """Replaces a derived CSV (recomputed from the cached rows on every run)."""
  if path.exists():
    path.unlink()
  common.append_rows(path, header, rows)


def table_rows(fold, dataset, name, table, ratios) -> list[dict]:
  return [{"fold": fold, "dataset": dataset, "candidate": name, "ratio": r, "metric": m,
           "value": f"{table[m][k]:.6f}"} for k, r in enumerate(ratios) for m in protocol.METRICS]


def write_choices(out, folds, files) -> None:
  """Steps 2, 4, 5: chosen.csv, candidates*.csv, results.csv, cost.csv (derived)."""
  rows = []
  for f in folds:
    c = f.pooled.config
    rows.append({"held_out": f.held_out, "trained_on": "+".join(f.pooled.trained_on),
                 "config": c.name, "strength": c.strength, "pooled": "+".join(c.pooled),
                 "covariates": c.covariates, "pre_power_weight": c.pre_power_weight,
                 "huber_delta": "none" if c.huber_delta is None else c.huber_delta,
                 "empirical_bayes": c.empirical_bayes,
                 "train_criterion": f"{f.pooled.train_criterion:.6f}"})
  rewrite(out / "chosen.csv", CHOSEN_HEADER, rows)
  rewrite(out / "chosen_nested.csv", NESTED_HEADER, [
    {"held_out": f.held_out, "scored_on": t,
     "trained_on": "+".join(n for n in f.pooled.trained_on if n != t), "config": c.name,
     "train_criterion": f"{val:.6f}"} for f in folds for t, (c, val) in f.pooled.nested.items()])
  cand_rows, chosen_rows = [], []
  for f in folds:
    for ds, tabs in f.tables.items():
      fl = files[ds]
      for name, tab in tabs.items():
        cand_rows += table_rows(f.held_out, ds, name, tab, fl.ratios)
      for m in BASELINES[1:]:
        cand_rows += table_rows(f.held_out, ds, m,
                                candidates.score_table(fl.predictions[m].mean, fl.truth),
                                fl.ratios)
    chosen_rows.append({"held_out": f.held_out, "trained_on": "+".join(f.trained_on),
                        "candidate": f.candidate.name, "pooled_setting": f.pooled.config.name,
                        "train_criterion": f"{f.train_criterion:.6f}"})
    logging.info("[%s] LensLLM+ = %s (criterion on %s: %.4f)", f.held_out, f.candidate.name,
                 "+".join(f.trained_on), f.train_criterion)
  rewrite(out / "candidates.csv", CAND_HEADER, cand_rows)
  rewrite(out / "candidates_chosen.csv", CAND_CHOSEN_HEADER, chosen_rows)
  rewrite(out / "candidates_stability.csv", STABILITY_HEADER, [
    stability_row(f.held_out, t, c) for f in folds
    for t, c in ((None, f.choice), *f.without.items())])
  # Calibration of the PFN on real curves: share of models whose L(D*) lies in the
  # central 80% predictive interval (reported, not used by any choice).
  cover = []
  for ds, f in files.items():
    q = f.predictions["CurvePFN"].quantiles
    inside = ((q[0.1] <= f.truth[None]) & (f.truth[None] <= q[0.9])).mean(1)   # [R]
    cover += [{"dataset": ds, "ratio": r, "coverage80": f"{inside[k]:.6f}"}
              for k, r in enumerate(f.ratios)]
  rewrite(out / "candidates_coverage.csv", ("dataset", "ratio", "coverage80"), cover)


def stability_row(held_out: str, left_out: str | None, choice) -> dict:
  """A candidates_stability.csv row: a fold's choice (on all its training files when
  left_out is None, else on all but left_out) with its runner-up and margin."""
  second = choice.runner_up
  return {"held_out": held_out, "left_out": left_out or "", "trained_on": "+".join(
          choice.trained_on), "candidate": choice.candidate.name,
          "train_criterion": f"{choice.criterion:.6f}",
          "runner_up": second.name if second else "",
          "runner_up_criterion": f"{choice.runner_up_criterion:.6f}",
          "margin": f"{choice.margin:.6f}"}


# Candidate bases that are law fits (config.num_steps optimiser steps), besides the fitted
# baselines (`selection.FITTED_LAWS`).
FITTED_BASES = (pooled.METHOD_NAME, "Spectral")


def prediction_notes(name: str, base: str, prediction, truth, ratios, dataset: str,
                     num_steps: int, status=None, models=()) -> list[dict]:
  """notes.csv rows of one method's [R, M] predicted L(D*) on a file: which of the fits it
  reads (`status`: [R, M] statuses of the fits of `models`, `BasePrediction.status` of its
  base; None: no fits) ended degenerate or non-finite (`common.status_notes`), why a score is
  NaN at a ratio (`common.score_notes`), and that fits with num_steps=0 were not optimised."""
  notes = []
  for k, (ratio, res) in enumerate(zip(ratios, candidates.plus_results(prediction, name),
                                       strict=True)):
    said = common.status_notes(None if status is None else status[k], models,
                               "fit_status.csv")
    said += common.score_notes(res, truth, with_rmse=True)
    if num_steps == 0 and (base in FITTED_BASES or base in selection.FITTED_LAWS):
      said.append("config.num_steps=0: the fits were not optimised (their parameters are not "
                  "optima)")
    notes += [{"dataset": dataset, "method": name, "ratio": ratio, "note": n} for n in said]
  return notes


def candidate_notes(folds, files, num_steps: int, models) -> list[dict]:
  """notes.csv rows of candidates.csv (scored again from the predictions, cheap;
  PooledLensLLM with the setting of each fold and file); models: file -> its model names."""
  by_name = {c.name: c for c in candidates.all_candidates()}
  notes = []
  for f in folds:
    for ds, tabs in f.tables.items():
      fl = files[ds]
      setting = candidates.pooled_setting(f.pooled, ds)
      for name in [*tabs, *BASELINES[1:]]:
        cand = by_name.get(name)
        job = candidates.base_key(cand, setting) if cand else name
        p = (candidates.candidate_prediction(cand, fl.predictions, setting) if cand
             else fl.predictions[name].mean)
        notes += prediction_notes(name, cand.base if cand else name, p, fl.truth, fl.ratios, ds,
                                  num_steps, fl.predictions[job].status, models[ds])
  return notes


def write_notes(path: pathlib.Path, rows) -> None:
  """Replaces a derived notes file; none when there is no note."""
  if path.exists():
    path.unlink()
  if rows:
    common.append_rows(path, NOTES_HEADER, rows)


def write_report(out, folds, files, curve_sets, num_steps: int, models) -> None:
  """Step 5: results.csv and cost.csv of LensLLM+ and the baselines on the reported files;
  notes.csv: why a cell of results.csv or candidates.csv is NaN or may mislead."""
  rows, cost, notes = [], [], candidate_notes(folds, files, num_steps, models)
  for f, curves in zip(folds, curve_sets, strict=True):
    fl = files[f.held_out]
    target = float(np.max(curves.data_sizes))
    ats8 = budgeted.method_flops("AtS", curves.sizes, curves.data_sizes, target / 8)
    preds = {PLUS: candidates.candidate_prediction(f.candidate, fl.predictions, f.pooled.config),
             **{m: fl.predictions[m].mean for m in BASELINES}}
    for m, p in preds.items():
      base = f.candidate.base if m == PLUS else m
      job = candidates.base_key(f.candidate, f.pooled.config) if m == PLUS else m
      notes += prediction_notes(m, base, p, fl.truth, fl.ratios, f.held_out, num_steps,
                                fl.predictions[job].status, curves.models)
      for ratio, res in zip(fl.ratios, candidates.plus_results(p, m), strict=True):
        sc = protocol.score_results(res, fl.truth)
        rows += [{"dataset": f.held_out, "ratio": ratio, "method": m, "metric": k,
                  "value": f"{sc[k]:.6f}"} for k in protocol.METRICS]
        reads = candidates.PLUS_READS if m == PLUS else methods.METHOD_READS[m]
        flops = budgeted.reads_flops(reads, curves.sizes, curves.data_sizes, target / ratio)
        cost.append({"dataset": f.held_out, "method": m, "setting": f"ratio={ratio}",
                     "flops": f"{flops:.6g}", "relative_to_ats8": f"{flops / ats8:.6g}",
                     "RelAcc": f"{sc['RelAcc']:.6f}", "PearCorr": f"{sc['PearCorr']:.6f}"})
  rewrite(out / "results.csv", RESULT_HEADER, rows)
  rewrite(out / "cost.csv", COST_HEADER, cost)
  write_notes(out / "notes.csv", list({tuple(r.values()): r for r in notes}.values()))


def budgeted_dataset(curves, fold, out, *, ctx, levels, max_data_num) -> None:
  """Step 6: early stopping with the chosen candidate (cost relative to AtS at ratio 8)."""
  name, cand = curves.name, fold.candidate
  tag = f"Budgeted{PLUS}"
  done = {r["setting"] for r in common.read_rows(out / "budgeted.csv")
          if r["dataset"] == name and r["candidate"] == cand.name}
  todo = [z for z in levels if f"z={z:g}" not in done]
  if not todo:
    return
  if (out / "budgeted_notes.csv").exists():  # of a level cut short by a kill: redone
    common.drop_rows(out / "budgeted_notes.csv", NOTES_HEADER, lambda r: r["dataset"] == name
                     and r["method"] == tag and r["ratio"] in {f"z={z:g}" for z in todo})
  t = time.time()
  target = float(np.max(curves.data_sizes))
  truth = curves.column(target)
  ats8 = budgeted.method_flops("AtS", curves.sizes, curves.data_sizes, target / 8)
  res = candidates.budgeted_candidate_selection(
    curves, todo, cand, ctx=dataclasses.replace(ctx, pooled_config=fold.pooled.config),
    max_data_num=max_data_num, progress=lambda s: logging.info("[%s] budgeted %s", name, s))
  rows = [{"dataset": name, "method": tag, "candidate": cand.name, "setting": f"z={r.z:g}",
           "flops": f"{r.flops:.6g}", "relative_to_ats8": f"{r.flops / ats8:.6g}",
           "RelAcc": f"{metrics.relative_accuracy(r.selection.chosen, truth):.6f}",
           "PearCorr": f"{metrics.pearson_corr(r.selection.feature, truth):.6f}"} for r in res]
  notes = [{"dataset": name, "method": tag, "ratio": f"z={r.z:g}", "note": n}
           for r in res for n in common.budgeted_status_notes(r, curves.models)
           + common.score_notes(r.selection, truth)]
  if notes:  # before budgeted.csv: a level whose row is written has its notes
    common.append_rows(out / "budgeted_notes.csv", NOTES_HEADER, notes)
  common.append_rows(out / "budgeted.csv", BUDGET_HEADER, rows)
  logging.info("[%s] budgeted %s: %d levels in %.1fs", name, cand.name, len(todo),
               time.time() - t)


# ---------------------------------------------------------------- main ---


def run(cfg, output_dir) -> pathlib.Path:
  """The whole protocol for a configs/lensllm_plus.py config; returns the output directory."""
  t0 = time.time()
  if cfg.protocol != "leave_one_out":
    raise errors.ConfigError(f"config.protocol={cfg.protocol!r}: only 'leave_one_out' exists")
  common.integer_field(cfg, "seed")
  common.integer_field(cfg, "num_restarts", low=1)
  common.integer_field(cfg, "num_steps", low=0)
  ratios = common.parse_ratios(cfg.ratios)
  budget_levels = common.parse_levels(cfg.budget.levels)
  specs = common.nonempty(cfg.benchmarks, "benchmarks")
  train_only_specs = list(cfg.train_only_benchmarks)
  loaded = common.load_all(specs + train_only_specs, cfg.data_dir)
  curve_sets, train_only = loaded[:len(specs)], loaded[len(specs):]
  if len(curve_sets) < 2:
    raise errors.ConfigError("config.benchmarks: leave_one_out needs at least 2 files")
  for c in curve_sets:  # every budget of every file, before any work
    common.budgets_of(c, common.target_of(c, None), ratios)
  for c in train_only:
    try:
      protocol.training_ratios(c, ratios)
    except ValueError as e:
      raise errors.ConfigError(f"config.ratios: {e}") from None
  pfn_dir = pathlib.Path(cfg.pfn_dir) if cfg.pfn_dir else pfn.CURVE_PFN_WEIGHTS
  inputs = {f"curves/{c.name}": c.source for c in loaded}
  inputs.update({"predictor/CurvePFN": pfn_dir,
                 "predictor/ContextPFN": pfn.CONTEXT_PFN_WEIGHTS})
  with rundir.open_output_dir(output_dir, config=cfg, inputs=inputs, outputs=("*.csv", "*.md"),
                              overwrite=cfg.overwrite, ignore=("data_dir",)) as out:
    return _run(cfg, out, curve_sets, train_only, ratios, budget_levels, pfn_dir, t0)


def _run(cfg, out: pathlib.Path, curve_sets, train_only, ratios, budget_levels, pfn_dir,
         t0) -> pathlib.Path:
  write_inputs(out, curve_sets, train_only, ratios, pfn_dir=pfn_dir,
               settings=f"seed={cfg.seed} num_restarts={cfg.num_restarts} "
                        f"num_steps={cfg.num_steps}")
  predictor = pfn.load_predictor(pfn_dir)
  key = jax.random.key(cfg.seed)
  for c in train_only:
    logging.info("[%s] training-only file, ratios %s", c.name, protocol.training_ratios(c, ratios))
  options = protocol.ProtocolOptions(ratios=ratios, num_restarts=cfg.num_restarts,
                                     num_steps=cfg.num_steps)
  folds, files = candidates.leave_one_out(
    curve_sets, key=key, train_only=train_only, options=options, predictor=predictor,
    grid_evaluate=cached_grid_evaluator(out), predict=cached_predictions(out),
    leave_each_out=True)
  write_choices(out, folds, files)
  write_report(out, folds, files, curve_sets, cfg.num_steps,
               {c.name: c.models for c in (*curve_sets, *train_only)})
  if cfg.budget.enabled:
    for i, (curves, fold) in enumerate(zip(curve_sets, folds, strict=True)):
      ctx = candidates.BaseContext(key=jax.random.fold_in(key, 1000 + i),
                                        predictor=predictor, num_restarts=cfg.num_restarts,
                                        num_steps=cfg.num_steps)
      budgeted_dataset(curves, fold, out, ctx=ctx, levels=budget_levels,
                       max_data_num=float(np.max(curves.data_sizes)) / min(ratios))
  (out / "lensllm_plus.md").write_text(reporting.plus_tables(out, ratios) + "\n")
  (out / "candidates.md").write_text(reporting.plus_candidates_md(out) + "\n")
  logging.info("done in %.1fs; outputs in %s", time.time() - t0, out)
  return out


if __name__ == "__main__":
  define_flags()
  common.run_config_binary(run)
