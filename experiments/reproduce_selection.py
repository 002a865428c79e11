r"""Reproduces the LLM-selection tables of Lin et al. (2024) / Zeng et al. (2025).

    python -m experiments.reproduce_selection --config=configs/selection.py \
        --output_dir=results/selection [--config.figures=False]

For every curve file (`config.benchmarks`: a packaged name, a name looked up
in config.data_dir / $LENSLLM_DATA_DIR, or a path), every budget ratio
D*/D_max and every method, it runs the selection on the budget-limited view of
the curves and writes to --output_dir:

  selection.csv  dataset,ratio,max_data_num,method,metric,value (PearCorr,
                 RelAcc, Spearman as fractions)
  rmse.csv       dataset,model,max_data_num,law,rmse (held-out D > D_max, loss
                 units; model "ALL" = pooled over the dataset's models)
  cost.csv       dataset,method,setting,flops,relative_flops,RelAcc,PearCorr
                 (FLOPs per token, 6 N D per (model, D) pair read)
  fits.csv       fitted raw parameters and status per model (used by the figures;
                 "degenerate": flat data or an overflowing fitted curve, fitting.py)
  notes.csv      dataset,method,ratio,note: why cells may mislead or are NaN
                 (degenerate or failed fits, constant truth, max_steps=0); only
                 written when there is a note, and listed under the tables
  selection.md, selection.tex  paper-style tables, published values beside ours
  headline.md    mean PearCorr / RelAcc over the ratios per file and method
  selection_vs_ratio_<ds>.png, curves_<ds>.png, pareto_<ds>.png

Results are appended as each (dataset, method) finishes; a rerun skips the
(dataset, method) pairs already complete in the CSVs and only regenerates
the tables and figures. Delete the output directory for a cold run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import time

import jax
import numpy as np
from absl import flags, logging

from experiments import common, reporting
from lensllm_jax import errors, rundir, selection
from lensllm_jax.laws import fitting
from lensllm_jax.plus import candidates, pfn, protocol
from lensllm_jax.selection import budgeted, metrics, pooled
from lensllm_jax.selection import methods as methods_lib

SELECTION_HEADER = ("dataset", "ratio", "max_data_num", "method", "metric", "value")
RMSE_HEADER = ("dataset", "model", "max_data_num", "law", "rmse")
COST_HEADER = ("dataset", "method", "setting", "flops", "relative_flops", "RelAcc", "PearCorr")
FITS_HEADER = ("dataset", "method", "max_data_num", "model", "status", "params")
NOTES_HEADER = common.NOTES_HEADER
# What a run writes in --output_dir (removed by --config.overwrite=True when the inputs changed).
OUTPUTS = ("*.csv", "*.md", "*.tex", "*.png")
# Config fields that do not change the results (left out of the manifest).
MANIFEST_IGNORE = ("threads", "figures", "data_dir")

def define_flags() -> None:
  """The binary's flags; defined only when it runs as a program (tests import it beside
  experiments.lensllm_plus, which has the same flag names)."""
  common.define_config_file("configs/selection.py",
                            "Experiment configuration (configs/selection.py[:plus]).")
  flags.DEFINE_string("output_dir", None, "Output directory.", required=True)


# ------------------------------------------------------------------ I/O ---


# --------------------------------------------------------------- steps ---


def score_rows(dataset, ratio, dmax, result, truth) -> list[dict]:
  vals = metrics.selection_scores(result, truth)
  return [{"dataset": dataset, "ratio": ratio, "max_data_num": int(dmax),
           "method": result.method, "metric": k, "value": f"{v:.6f}"} for k, v in vals.items()]


def rmse_rows(dataset, dmax, result, curves, target) -> list[dict]:
  per_model, pooled = common.heldout_rmse(result, curves, dmax, target)
  law = methods_lib.CURVES[result.method]
  rows = [{"dataset": dataset, "model": mname, "max_data_num": int(dmax), "law": law,
           "rmse": f"{v:.6g}"} for mname, v in zip(curves.models, per_model, strict=True)]
  rows.append({"dataset": dataset, "model": "ALL", "max_data_num": int(dmax), "law": law,
               "rmse": f"{pooled:.6g}"})
  return rows


def fit_rows(dataset, dmax, result, curves) -> list[dict]:
  rows = []
  for i, mname in enumerate(curves.models):
    params = result.predictor.parameters()[i]
    rows.append({"dataset": dataset, "method": result.method, "max_data_num": int(dmax),
                 "model": mname, "status": result.status[i] if result.status else "ok",
                 "params": " ".join(f"{float(p):.17g}" for p in params)})
  return rows


def run_dataset(curves, methods, ratios, out: pathlib.Path, *, target, key, num_restarts,
                fit_options, budget: budgeted.BudgetOptions | None, t0, plus_results=None,
                threads: int = 1) -> None:
  """All methods (and the budgeted procedure) on one curve file; appends to the CSVs.

  `threads` methods are computed at once (results do not depend on it).
  """
  name = curves.name
  meta = selection.metadata_of(curves, target)
  truth = curves.column(target)
  budgets = common.budgets_of(curves, target, ratios)
  views = [selection.visible_view(curves, dmax) for _, dmax in budgets]
  # A (method, ratio) is done when its every metric row is in selection.csv (the last file
  # a unit writes); the rows of a unit cut short by a kill are dropped and the unit redone.
  metrics_of = collections.defaultdict(set)
  for r in common.read_rows(out / "selection.csv"):
    if r["dataset"] == name:
      metrics_of[(r["method"], int(r["ratio"]))].add(r["metric"])
  done = {k for k, v in metrics_of.items() if v >= set(metrics.SCORES)}
  full = budgeted.full_tuning_flops(curves.sizes, target)
  min_curves = len(budgets) * len(curves.models)
  def compute(mi, method):
    if method == candidates.PLUS_NAME:
      return plus_results  # the leave-one-dataset-out choice (`choose_plus`)
    if method == pooled.METHOD_NAME:
      return [r[0] for r in pooled.pooled_selection(
          views, meta, [pooled.DEFAULT_CONFIG], key=jax.random.fold_in(key, mi),
          num_restarts=num_restarts, fit_options=fit_options)]
    if method in methods_lib.FITTED_METHODS:
      return selection.run_fitted_batch(method, views, meta, key=jax.random.fold_in(key, mi),
                                        num_restarts=num_restarts, fit_options=fit_options,
                                        min_curves=min_curves)
    return [methods_lib.run_method(method, v, meta) for v in views]

  todo = []
  for mi, method in enumerate(methods):
    if all((method, r) in done for r, _ in budgets):
      logging.info("[%s] %s: already done, skipping", name, method)
    else:
      todo.append((mi, method))
      drop_unit_rows(out, name, method)
  # The methods are independent: XLA compiles and runs them on separate threads
  # (it releases the GIL), and the rows are still written in method order.
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    t = time.time()
    futures = [(method, pool.submit(compute, mi, method)) for mi, method in todo]
    for method, future in futures:
      results = future.result()
      sel, rm, fits, cost, notes = [], [], [], [], []
      for (ratio, dmax), res in zip(budgets, results, strict=True):
        sel += score_rows(name, ratio, dmax, res, truth)
        notes += [{"dataset": name, "method": method, "ratio": ratio, "note": n}
                  for n in result_notes(method, res, truth, fit_options, curves.models)]
        if method in methods_lib.CURVES:  # rmse.csv's law column: `Method.curve`
          rm += rmse_rows(name, dmax, res, curves, target)
          fits += fit_rows(name, dmax, res, curves)
        reads = (candidates.PLUS_READS if method == candidates.PLUS_NAME
                 else methods_lib.METHOD_READS[method])
        flops, relative = common.method_cost(reads, curves, dmax, target)
        cost.append({"dataset": name, "method": method, "setting": f"ratio={ratio}",
                     "flops": f"{flops:.6g}", "relative_flops": f"{relative:.6g}",
                     "RelAcc": f"{metrics.relative_accuracy(res.chosen, truth):.6f}",
                     "PearCorr": f"{metrics.pearson_corr(res.feature, truth):.6f}"})
      # Write the secondary files first: a crash can then only leave work that is redone.
      if rm:
        common.append_rows(out / "rmse.csv", RMSE_HEADER, rm)
        common.append_rows(out / "fits.csv", FITS_HEADER, fits)
      common.append_rows(out / "cost.csv", COST_HEADER, cost)
      if notes:
        common.append_rows(out / "notes.csv", NOTES_HEADER, notes)
      common.append_rows(out / "selection.csv", SELECTION_HEADER, sel)
      logging.info("[%s] %s: %d budgets done %.1fs after the file's start (total %.1fs)", name,
                   method, len(budgets), time.time() - t, time.time() - t0)
  if budget is not None:
    run_budgeted(curves, out, budget, target=target, key=jax.random.fold_in(key, 1000), full=full,
                 truth=truth, num_restarts=num_restarts, fit_options=fit_options, t0=t0)


def result_notes(method, result, truth, fit_options, models) -> list[str]:
  """Why a result's cells may mislead or be empty: degenerate or failed fits (of `models`),
  undefined correlations (constant truth or feature), fits that were not run (max_steps = 0)."""
  notes = common.status_notes(result.status, models, "fits.csv")
  notes += common.score_notes(result, truth)
  if method in methods_lib.FITTED_LAWS and fit_options.max_steps == 0:
    notes.append("config.max_steps=0: the fits were not optimised (their parameters are "
                 "not optima)")
  return notes


def drop_unit_rows(out: pathlib.Path, dataset: str, method: str) -> None:
  """Removes every row of one (dataset, method) unit from the CSVs before it is redone."""
  law = methods_lib.CURVES.get(method)
  for file, header, drop in (
      ("selection.csv", SELECTION_HEADER, lambda r: r["method"] == method),
      ("rmse.csv", RMSE_HEADER, lambda r: law is not None and r["law"] == law),
      ("fits.csv", FITS_HEADER, lambda r: r["method"] == method),
      ("cost.csv", COST_HEADER,
       lambda r: r["method"] == method and r["setting"].startswith("ratio=")),
      ("notes.csv", NOTES_HEADER, lambda r: r["method"] == method)):
    path = out / file
    if path.exists():
      n = common.drop_rows(path, header, lambda r, drop=drop: r["dataset"] == dataset and drop(r))
      if n:
        logging.info("[%s] %s: removed %d rows of an unfinished run from %s", dataset, method,
                     n, file)


def run_budgeted(curves, out, budget: budgeted.BudgetOptions, *, target, key, full, truth,
                 num_restarts, fit_options, t0) -> None:
  """Budgeted early stopping at the levels of `budget` not yet done; appends cost.csv rows
  (and notes.csv rows, setting z=..., where a PearCorr is NaN or a fit it read ended
  degenerate or non-finite)."""
  name = curves.name
  tag = f"Budgeted{budget.method}"
  done = {r["setting"] for r in common.read_rows(out / "cost.csv")
          if r["dataset"] == name and r["method"] == tag}
  todo = [z for z in budget.levels if f"z={z:g}" not in done]
  rows, notes = [], []
  if todo:
    if (out / "notes.csv").exists():  # of a level cut short by a kill: redone
      common.drop_rows(out / "notes.csv", NOTES_HEADER, lambda r: r["dataset"] == name and (
          r["method"] == tag and r["ratio"] in {f"z={z:g}" for z in todo}))
    t = time.time()
    results = budgeted.budgeted_selection(
        curves, dataclasses.replace(budget, levels=todo), key=key, num_restarts=num_restarts,
        fit_options=fit_options, target_data_num=target,
        progress=lambda s: logging.info("[%s] budgeted %s", name, s))
    for r in results:
      rows.append({"dataset": name, "method": tag, "setting": f"z={r.z:g}",
                   "flops": f"{r.flops:.6g}", "relative_flops": f"{r.flops / full:.6g}",
                   "RelAcc": f"{metrics.relative_accuracy(r.selection.chosen, truth):.6f}",
                   "PearCorr": f"{metrics.pearson_corr(r.selection.feature, truth):.6f}"})
      notes += [{"dataset": name, "method": tag, "ratio": f"z={r.z:g}", "note": n}
                for n in common.budgeted_status_notes(r, curves.models)
                + common.score_notes(r.selection, truth)]
    logging.info("[%s] budgeted: %d levels in %.1fs (total %.1fs)", name, len(todo),
                 time.time() - t, time.time() - t0)
  if "FullTuning" not in {r["method"] for r in common.read_rows(out / "cost.csv")
                          if r["dataset"] == name}:
    rows.append({"dataset": name, "method": "FullTuning", "setting": f"D*={int(target)}",
                 "flops": f"{full:.6g}", "relative_flops": "1", "RelAcc": "1.000000",
                 "PearCorr": "1.000000"})
  if notes:  # before cost.csv: a level whose row is written has its notes
    common.append_rows(out / "notes.csv", NOTES_HEADER, notes)
  if rows:
    common.append_rows(out / "cost.csv", COST_HEADER, rows)


def lodo_rows(out: pathlib.Path, datasets, tag: str) -> list[dict]:
  """Leave-one-dataset-out choice of the budgeted confidence level z.

  For each dataset, z is chosen on the OTHER datasets only: the z with the
  highest mean RelAcc there, ties broken by the lower mean relative FLOPs.
  The row reports the held-out dataset's own result at that z.
  """
  cost = [r for r in common.read_rows(out / "cost.csv") if r["method"] == tag]
  by = {(r["dataset"], r["setting"]): r for r in cost}
  rows = []
  for ds in datasets:
    others = [o for o in datasets if o != ds]
    settings = {r["setting"] for r in cost if r["dataset"] == ds}
    cands = []
    for st in settings:
      if all((o, st) in by for o in others) and others:
        acc = np.mean([float(by[(o, st)]["RelAcc"]) for o in others])
        fl = np.mean([float(by[(o, st)]["relative_flops"]) for o in others])
        cands.append((-acc, fl, st))
    if not cands:
      continue
    st = min(cands)[2]
    r = by[(ds, st)]
    rows.append({**r, "method": f"{tag}-LODO", "setting": f"{st} (chosen on {'+'.join(others)})"})
  return rows


# ---------------------------------------------------------------- main ---


def choose_plus(curve_sets, methods, out, *, ratios, key, target_data_num,
                num_restarts) -> dict:
  """LensLLM+ per file when it is in `methods` and not yet scored everywhere, else {}.

  LensLLM+ on each file is the candidate that
  `candidates.leave_one_out` chooses on the other files (the same
  predictor as experiments.lensllm_plus, here without training-only files);
  returns file name -> [ratios] SelectionResults of that candidate.
  """
  if candidates.PLUS_NAME not in methods:
    return {}
  done = {(r["dataset"], int(r["ratio"])) for r in common.read_rows(out / "selection.csv")
          if r["method"] == candidates.PLUS_NAME}
  if all((c.name, r) in done for c in curve_sets for r in ratios):
    return {}  # rerun: LensLLM+ is already scored everywhere
  options = protocol.ProtocolOptions(ratios=ratios, target_data_num=target_data_num,
                                     num_restarts=num_restarts)
  folds, files = candidates.leave_one_out(curve_sets, key=key, options=options)
  rows = [{"held_out": f.held_out, "trained_on": "+".join(f.trained_on),
           "candidate": f.candidate.name, "train_criterion": f"{f.train_criterion:.6f}",
           "pooled_config": f.pooled.config.name,
           "pooled_criterion": f"{f.pooled.train_criterion:.6f}",
           "pooled_nested": "; ".join(f"{t}: {c.name}" for t, (c, _) in f.pooled.nested.items())}
          for f in folds]
  path = out / "lensllm_plus_chosen.csv"
  if path.exists():
    path.unlink()
  common.append_rows(path, ("held_out", "trained_on", "candidate", "train_criterion",
                            "pooled_config", "pooled_criterion", "pooled_nested"), rows)
  out_results = {}
  for f in folds:
    logging.info("[%s] LensLLM+ chosen on %s: %s (PooledLensLLM setting %s)", f.held_out,
                 f.trained_on, f.candidate.name, f.pooled.config.name)
    pred = candidates.candidate_prediction(f.candidate, files[f.held_out].predictions,
                                           f.pooled.config)
    out_results[f.held_out] = candidates.plus_results(pred)
  return out_results


def run(cfg, output_dir) -> pathlib.Path:
  """The whole experiment for a configs/selection.py config; returns the output directory."""
  t0 = time.time()
  methods = common.nonempty(cfg.methods, "methods")
  known = [*methods_lib.METHODS, candidates.PLUS_NAME]
  unknown = [m for m in methods if m not in known]
  if unknown:
    raise errors.ConfigError(f"config.methods: unknown {unknown}; known {sorted(known)}")
  if candidates.PLUS_NAME in methods and len(cfg.benchmarks) < 2:
    raise errors.ConfigError(f"config.methods: {candidates.PLUS_NAME} is chosen by "
                             "leave-one-dataset-out and needs at least 2 config.benchmarks files "
                             f"({pooled.METHOD_NAME} is the pooled fit on one file)")
  if cfg.budget.enabled and cfg.budget.method not in budgeted.BUDGET_METHODS:
    raise errors.ConfigError(
        f"config.budget.method: {cfg.budget.method!r} is not supported; budget methods: "
        f"{', '.join(budgeted.BUDGET_METHODS)} (LensLLM+ has its own budgeted variant, "
        "plus.candidates.budgeted_candidate_selection, run by experiments.lensllm_plus)")
  threads = common.integer_field(cfg, "threads", low=0) or os.cpu_count() or 1  # 0: one per core
  if threads > 1:
    logging.warning("config.threads=%d: concurrent XLA:CPU executions can deadlock on the "
                    "batched eigh of the fits (docs/development.md, known issues)", threads)
  common.integer_field(cfg, "num_restarts", low=1)
  common.integer_field(cfg, "max_steps", low=0)
  common.integer_field(cfg, "seed")
  common.integer_field(cfg, "target_data_num", low=1, optional=True)
  common.integer_field(cfg, "budget.max_data_num", low=1, optional=True)
  ratios = common.parse_ratios(cfg.ratios)
  budget_levels = common.parse_levels(cfg.budget.levels)
  specs = common.nonempty(cfg.benchmarks, "benchmarks")
  curve_sets = common.load_all(specs, cfg.data_dir)
  for curves in curve_sets:  # every file's D* and budgets, before any work
    common.budgets_of(curves, common.target_of(curves, cfg.target_data_num), ratios)
  inputs = {f"curves/{c.name}": c.source for c in curve_sets}
  if candidates.PLUS_NAME in methods:  # its leave-one-out choice runs both PFNs
    inputs.update({"predictor/CurvePFN": pfn.CURVE_PFN_WEIGHTS,
                   "predictor/ContextPFN": pfn.CONTEXT_PFN_WEIGHTS})
  with rundir.open_output_dir(output_dir, config=cfg, inputs=inputs, outputs=OUTPUTS,
                              overwrite=cfg.overwrite, ignore=MANIFEST_IGNORE) as out:
    return _run(cfg, out, curve_sets, methods, ratios, budget_levels, t0)


def _run(cfg, out: pathlib.Path, curve_sets, methods, ratios, budget_levels, t0) -> pathlib.Path:
  key = jax.random.key(cfg.seed)
  fit_options = fitting.FitOptions(max_steps=cfg.max_steps)
  plus = choose_plus(curve_sets, methods, out, ratios=ratios,
                     key=jax.random.fold_in(key, 2000), target_data_num=cfg.target_data_num,
                     num_restarts=cfg.num_restarts)
  targets = []
  for di, curves in enumerate(curve_sets):
    target = common.target_of(curves, cfg.target_data_num)
    targets.append(target)
    logging.info("[%s] %d models, %d points, D*=%g (%s)", curves.name, len(curves.models),
                 len(curves.data_sizes), target, curves.source)
    budget = None
    if cfg.budget.enabled:
      cap = cfg.budget.max_data_num or target / min(ratios)
      budget = budgeted.BudgetOptions(budget_levels, cfg.budget.method, cap)
    run_dataset(curves, methods, ratios, out, target=target, key=jax.random.fold_in(key, di),
                num_restarts=cfg.num_restarts, fit_options=fit_options, budget=budget, t0=t0,
                plus_results=plus.get(curves.name), threads=cfg.threads or os.cpu_count() or 1)
  if cfg.budget.enabled and len(curve_sets) > 1:
    tag = f"Budgeted{cfg.budget.method}"
    have = {r["dataset"] for r in common.read_rows(out / "cost.csv") if r["method"] == f"{tag}-LODO"}
    names = [c.name for c in curve_sets]
    if not set(names) <= have:
      rows = [r for r in lodo_rows(out, names, tag) if r["dataset"] not in have]
      common.append_rows(out / "cost.csv", COST_HEADER, rows)
  md, tex = reporting.selection_tables(out)
  (out / "selection.md").write_text(md + "\n")
  (out / "selection.tex").write_text(tex + "\n")
  (out / "headline.md").write_text(reporting.selection_headline_table(out) + "\n")
  if cfg.figures:
    reporting.selection_figures(out, curve_sets, targets, methods_lib.CURVES)
  logging.info("done in %.1fs; outputs in %s", time.time() - t0, out)
  return out


if __name__ == "__main__":
  define_flags()
  common.run_config_binary(run)
