r"""LensLLM+ (pooled LensLLM fits) under the leave-one-dataset-out protocol.

    python -m experiments.lensllm_plus --config=configs/lensllm_plus.py \
        --output_dir=results/lensllm_plus

config.benchmarks files are reported; config.train_only_benchmarks files (the project's
own curve files, written by experiments/lensllm_study.py in the public
format) are training files of every fold and never reported. They are scored
on the ratios (relative to their own D*) that leave at least 2 visible
fine-tuning points (`protocol.training_ratios`; 8..64 for D* = 25600). The
reported run uses both study files; that was decided before any run with
them (more training files make each fold's choice less of a one-file
sample), not from the reported numbers.

Steps (each writes its CSV as it goes; a rerun skips finished work):

  0. inputs   every file read, its role, ratios and sha256 -> inputs.csv.
  1. grid     every setting of `protocol.default_grid()` on every file, every
              budget ratio -> grid.csv (dataset,config,ratio,metric,value).
  2. choose   for each reported file, the setting with the best mean
              criterion (mean PearCorr + mean RelAcc over the ratios) on the
              OTHER files (training-only files included) -> chosen.csv (the
              held-out file's grid rows are never read when choosing its
              setting).
  3. report   on each file: LensLLM+ with its chosen setting beside AtS,
              RectifiedFit and LensLLM (independent fits) run in the same
              process -> results.csv (dataset,ratio,method,metric,value;
              metrics PearCorr, RelAcc, Spearman, RMSE = curve RMSE at D* in
              loss units over the models), and the compute each method reads
              at each ratio relative to AtS at ratio 8 -> cost.csv.
  4. budgeted the early-stopping procedure of `budgeted.py` (SELECT) with
              the LensLLM+ fit at several confidence levels -> cost.csv rows.
  5. tables   lensllm_plus.md (Markdown for the README).

Delete the output directory for a cold run. Cached rows are keyed by file
name; a rerun whose files changed content (sha256 in inputs.csv) stops with
an error rather than mixing results.
"""

from __future__ import annotations

import hashlib
import pathlib
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import common
from lensllm_jax import budgeted, metrics, pooled, protocol, selection

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags; defined only when it runs as a program, so that tests can
  import it beside experiments.reproduce_selection (same flag names)."""
  common.define_config_file("configs/lensllm_plus.py",
                            "Experiment configuration (configs/lensllm_plus.py[:public]).")
  flags.DEFINE_string("output_dir", None, "Output directory.", required=True)


GRID_HEADER = ("dataset", "config", "ratio", "metric", "value")
CHOSEN_HEADER = ("held_out", "trained_on", "config", "strength", "pooled", "covariates",
                 "pre_power_weight", "huber_delta", "empirical_bayes", "train_criterion")
RESULT_HEADER = ("dataset", "ratio", "method", "metric", "value")
COST_HEADER = ("dataset", "method", "setting", "flops", "relative_to_ats8", "RelAcc", "PearCorr")
BASELINES = ("AtS", "RectifiedFit", "LensLLM")
INPUT_HEADER = ("dataset", "role", "source", "ratios", "sha256")


# ------------------------------------------------------------------ I/O ---


# --------------------------------------------------------------- steps ---


def cached_grid_evaluator(out: pathlib.Path, ratios, num_restarts, num_steps):
  """An `evaluate` for `protocol.leave_one_out` that stores tables in grid.csv."""
  path = out / "grid.csv"

  def evaluate(curves, configs, *, key, ratios=ratios):
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
      table, _ = protocol.evaluate_grid(curves, todo, key=key, ratios=ratios,
                                        num_restarts=num_restarts, num_steps=num_steps)
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


def write_inputs(out, curve_sets, train_only, ratios):
  """inputs.csv: every file read (role, ratios, sha256), so a run names its data."""
  rows = []
  for role, sets in (("reported", curve_sets), ("train_only", train_only)):
    for c in sets:
      rs = ratios if role == "reported" else protocol.training_ratios(c, ratios)
      digest = hashlib.sha256(pathlib.Path(c.source).read_bytes()).hexdigest()
      rows.append({"dataset": c.name, "role": role, "source": c.source,
                   "ratios": " ".join(map(str, rs)), "sha256": digest})
  path = out / "inputs.csv"
  old = {r["dataset"]: r["sha256"] for r in common.read_rows(path)}
  changed = [r["dataset"] for r in rows if r["dataset"] in old and old[r["dataset"]] != r["sha256"]]
  if changed:
    # Cached grid / result rows are keyed by file name: they would be stale.
    raise app.UsageError(f"{path}: the content of {changed} changed since the cached run; "
                         f"delete {out} for a cold run")
  if path.exists():
    path.unlink()
  common.append_rows(path, INPUT_HEADER, rows)


def choose_settings(curve_sets, out, *, key, ratios, num_restarts, num_steps, train_only=()):
  """Step 1 + 2: grid on every file and the leave-one-out choice -> chosen.csv."""
  grid = protocol.default_grid()
  evaluate = cached_grid_evaluator(out, ratios, num_restarts, num_steps)
  for c in train_only:
    logging.info("[%s] training-only file, ratios %s", c.name, protocol.training_ratios(c, ratios))
  folds, _ = protocol.leave_one_out(curve_sets, grid, key=key, evaluate=evaluate,
                                    train_only=train_only, ratios=ratios)
  rows = []
  for f in folds:
    c = f.config
    rows.append({"held_out": f.held_out, "trained_on": "+".join(f.trained_on), "config": c.name,
                 "strength": c.strength, "pooled": "+".join(c.pooled),
                 "covariates": c.covariates, "pre_power_weight": c.pre_power_weight,
                 "huber_delta": "none" if c.huber_delta is None else c.huber_delta,
                 "empirical_bayes": c.empirical_bayes,
                 "train_criterion": f"{f.train_criterion:.6f}"})
    logging.info("[%s] chosen on %s: %s (criterion %.4f)", f.held_out, f.trained_on, c.name,
                 f.train_criterion)
  path = out / "chosen.csv"
  if path.exists():
    path.unlink()
  common.append_rows(path, CHOSEN_HEADER, rows)
  return folds


def report_dataset(curves, fold, out, *, key, ratios, num_restarts, num_steps):
  """Step 3: LensLLM+ (chosen setting) beside the baselines on the held-out file."""
  name = curves.name
  done = {r["method"] for r in common.read_rows(out / "results.csv") if r["dataset"] == name}
  methods = (pooled.METHOD_NAME,) + BASELINES
  if all(m in done for m in methods):
    logging.info("[%s] report: already done", name)
    return
  t = time.time()
  meta, truth, rv = protocol.budget_views(curves, ratios)
  views = [v for _, v in rv]
  results = {}
  # The same key as the grid step: the reported LensLLM+ is the grid's cell.
  res = pooled.pooled_selection(views, meta, [fold.config], key=key, num_restarts=num_restarts,
                                num_steps=num_steps)
  results[pooled.METHOD_NAME] = [r[0] for r in res]
  results["AtS"] = [selection.ats(v, meta) for v in views]
  for m in ("RectifiedFit", "LensLLM"):
    results[m] = selection.run_fitted_batch(m, views, meta, key=key, num_restarts=num_restarts)
  ats8 = budgeted.method_flops("AtS", curves.sizes, curves.data_sizes,
                               meta.target_data_num / 8)
  rows, cost = [], []
  for m in methods:
    if m in done:
      continue
    for (ratio, v), r in zip(rv, results[m], strict=True):
      sc = protocol.score_results(r, truth)
      rows += [{"dataset": name, "ratio": ratio, "method": m, "metric": k,
                "value": f"{sc[k]:.6f}"} for k in protocol.METRICS]
      reads = "AtS" if m == "AtS" else "RectifiedFit"  # the fits read all visible points
      flops = budgeted.method_flops(reads, curves.sizes, curves.data_sizes, v.max_data_num)
      cost.append({"dataset": name, "method": m, "setting": f"ratio={ratio}",
                   "flops": f"{flops:.6g}", "relative_to_ats8": f"{flops / ats8:.6g}",
                   "RelAcc": f"{sc['RelAcc']:.6f}", "PearCorr": f"{sc['PearCorr']:.6f}"})
  common.append_rows(out / "cost.csv", COST_HEADER, cost)
  common.append_rows(out / "results.csv", RESULT_HEADER, rows)
  logging.info("[%s] report: %d methods x %d ratios in %.1fs", name, len(methods), len(ratios),
               time.time() - t)


def budgeted_dataset(curves, fold, out, *, key, levels, max_data_num, num_restarts, num_steps):
  """Step 4: early stopping with the LensLLM+ fit (cost relative to AtS at ratio 8)."""
  name = curves.name
  tag = f"Budgeted{pooled.METHOD_NAME}"
  done = {r["setting"] for r in common.read_rows(out / "cost.csv")
          if r["dataset"] == name and r["method"] == tag}
  todo = [z for z in levels if f"z={z:g}" not in done]
  if not todo:
    return
  t = time.time()
  target = float(np.max(curves.data_sizes))
  truth = curves.column(target)
  ats8 = budgeted.method_flops("AtS", curves.sizes, curves.data_sizes, target / 8)
  res = budgeted.budgeted_pooled_selection(
      curves, todo, fold.config, key=key, max_data_num=max_data_num,
      num_restarts=num_restarts, num_steps=num_steps,
      progress=lambda s: logging.info("[%s] budgeted %s", name, s))
  rows = [{"dataset": name, "method": tag, "setting": f"z={r.z:g}", "flops": f"{r.flops:.6g}",
           "relative_to_ats8": f"{r.flops / ats8:.6g}",
           "RelAcc": f"{metrics.relative_accuracy(r.selection.chosen, truth):.6f}",
           "PearCorr": f"{metrics.pearson_corr(r.selection.feature, truth):.6f}"} for r in res]
  common.append_rows(out / "cost.csv", COST_HEADER, rows)
  logging.info("[%s] budgeted: %d levels in %.1fs", name, len(todo), time.time() - t)


# -------------------------------------------------------------- tables ---


def _f(v, scale=100.0, digits=1) -> str:
  return "" if v is None or not np.isfinite(v) else f"{scale * v:.{digits}f}"


def tables(out: pathlib.Path, ratios) -> str:
  """Markdown of results.csv, chosen.csv and cost.csv, with the target checks."""
  rows = common.read_rows(out / "results.csv")
  val = {(r["dataset"], r["method"], r["metric"], int(r["ratio"])): float(r["value"])
         for r in rows}
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  methods = [pooled.METHOD_NAME, *BASELINES]
  md = ["# LensLLM+ under leave-one-dataset-out (generated by experiments/lensllm_plus.py)", ""]
  inputs = common.read_rows(out / "inputs.csv")
  if inputs:
    md += [f"Grid: {len(protocol.default_grid())} settings (`protocol.default_grid()`); every "
           "setting is chosen on the other files only. Files read:", "",
           "| file | role | ratios | sha256 (first 12) |", "|---|---|---|---|"]
    md += [f"| {r['dataset']} | {r['role']} | {r['ratios']} | `{r['sha256'][:12]}` |"
           for r in inputs]
    md.append("")
  chosen = common.read_rows(out / "chosen.csv")
  if chosen:
    md += ["## Settings chosen for each file (on the other files only)", "",
           "| reported on | chosen on | setting | training criterion |", "|---|---|---|---|"]
    md += [f"| {c['held_out']} | {c['trained_on']} | `{c['config']}` | "
           f"{float(c['train_criterion']):.4f} |" for c in chosen]
    md.append("")
  for metric, scale, digits, label in (("PearCorr", 100, 1, "x100"), ("RelAcc", 100, 1, "x100"),
                                       ("RMSE", 1, 4, "loss units, at D*")):
    for ds in datasets:
      md += [f"## {metric} ({label}), {ds}", "",
             "| method | " + " | ".join(f"1/{r}" for r in ratios) + " | mean |",
             "|---|" + "---|" * (len(ratios) + 1)]
      for m in methods:
        v = [val.get((ds, m, metric, r), np.nan) for r in ratios]
        md.append(f"| {m} | " + " | ".join(_f(x, scale, digits) for x in v) +
                  f" | {_f(np.nanmean(v), scale, digits)} |")
      md.append("")
  md += ["## Target check (means over the ratios above)", "",
         "| dataset | mean PearCorr LensLLM+ vs AtS | mean RelAcc LensLLM+ vs AtS | "
         "mean RMSE@D* LensLLM+ vs RectifiedFit |", "|---|---|---|---|"]
  for ds in datasets:
    def mean(m, metric, ds=ds):
      return float(np.nanmean([val.get((ds, m, metric, r), np.nan) for r in ratios]))
    p, a = mean(pooled.METHOD_NAME, "PearCorr"), mean("AtS", "PearCorr")
    q, b = mean(pooled.METHOD_NAME, "RelAcc"), mean("AtS", "RelAcc")
    e, f = mean(pooled.METHOD_NAME, "RMSE"), mean("RectifiedFit", "RMSE")
    md.append(f"| {ds} | {100 * p:.1f} vs {100 * a:.1f} ({'met' if p > a else 'NOT met'}) | "
              f"{100 * q:.1f} vs {100 * b:.1f} ({'met' if q >= b else 'NOT met'}) | "
              f"{e:.4f} vs {f:.4f} ({'met' if e < f else 'NOT met'}) |")
  md.append("")
  cost = common.read_rows(out / "cost.csv")
  if cost:
    md += ["## Compute (sum of 6 N D over the (model, D) pairs read, relative to AtS at "
           "ratio 8)", "", "| dataset | method | setting | compute / AtS@8 | RelAcc | PearCorr |",
           "|---|---|---|---|---|---|"]
    for r in cost:
      md.append(f"| {r['dataset']} | {r['method']} | {r['setting']} | "
                f"{float(r['relative_to_ats8']):.4f} | {_f(float(r['RelAcc']))} | "
                f"{_f(float(r['PearCorr']))} |")
    md.append("")
    md += ["Budget target: AtS's RelAcc at ratio 8 reached by LensLLM+ (fixed budget or "
           "budgeted early stopping) with at most 1/4 of AtS's compute at ratio 8:", ""]
    for ds in datasets:
      ats8 = val.get((ds, "AtS", "RelAcc", 8))
      if ats8 is None:
        continue
      ok = [r for r in cost if r["dataset"] == ds and pooled.METHOD_NAME in r["method"]
            and float(r["relative_to_ats8"]) <= 0.25 and float(r["RelAcc"]) >= ats8 - 1e-9]
      best = min(ok, key=lambda r: float(r["relative_to_ats8"])) if ok else None
      md.append(f"- {ds}: AtS@8 RelAcc {100 * ats8:.1f}; " + (
          f"reached by {best['method']} ({best['setting']}) at "
          f"{float(best['relative_to_ats8']):.4f} of the compute" if best else "NOT reached"))
    md.append("")
  return "\n".join(md)


# ---------------------------------------------------------------- main ---


def run(cfg, output_dir) -> pathlib.Path:
  """The whole protocol for a configs/lensllm_plus.py config; returns the output directory."""
  t0 = time.time()
  if cfg.protocol != "leave_one_out":
    raise app.UsageError(f"config.protocol={cfg.protocol!r}: only 'leave_one_out' exists")
  ratios = common.parse_ratios(cfg.ratios)
  budget_levels = common.parse_levels(cfg.budget_levels)
  specs, train_only_specs = list(cfg.benchmarks), list(cfg.train_only_benchmarks)
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  loaded = common.load_all(specs + train_only_specs, cfg.data_dir)
  curve_sets, train_only = loaded[:len(specs)], loaded[len(specs):]
  if len(curve_sets) < 2:
    raise app.UsageError("leave_one_out needs at least 2 config.benchmarks files")
  write_inputs(out, curve_sets, train_only, ratios)
  key = jax.random.key(cfg.seed)
  folds = choose_settings(curve_sets, out, key=key, ratios=ratios, num_restarts=cfg.num_restarts,
                          num_steps=cfg.num_steps, train_only=train_only)
  for i, (curves, fold) in enumerate(zip(curve_sets, folds, strict=True)):
    report_dataset(curves, fold, out, key=jax.random.fold_in(key, i), ratios=ratios,
                   num_restarts=cfg.num_restarts, num_steps=cfg.num_steps)
    if cfg.budgeted:
      target = float(np.max(curves.data_sizes))
      budgeted_dataset(curves, fold, out, key=jax.random.fold_in(key, 1000 + i),
                       levels=budget_levels, max_data_num=target / min(ratios),
                       num_restarts=cfg.num_restarts, num_steps=cfg.num_steps)
  (out / "lensllm_plus.md").write_text(tables(out, ratios) + "\n")
  logging.info("done in %.1fs; outputs in %s", time.time() - t0, out)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  run(FLAGS.config, FLAGS.output_dir)


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
