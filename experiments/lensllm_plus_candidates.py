r"""LensLLM+ chosen among candidates (pooled fit, CurvePFN, dynamic-F law, AtS blends).

  python -m experiments.lensllm_plus_candidates --config=configs/lensllm_plus_candidates.py

Leave-one-dataset-out (`plus_candidates`): for each reported file, the
candidate with the best mean criterion (mean PearCorr + mean RelAcc over the
ratios) on the OTHER files (reported + training-only study files) is the
LensLLM+ prediction reported on it. The Pooled candidate of each fold uses the
pooled setting `protocol.choose` picks from the 148-setting grid of
experiments/lensllm_plus.py (grid.csv in config.grid_dir) on the same
training files. Writes to config.output_dir:

  candidates.csv          fold,dataset,candidate,ratio,metric,value (every
                          candidate on every file, per fold's Pooled setting)
  candidates_chosen.csv   held_out,trained_on,candidate,pooled_setting,criterion
  candidates_budgeted.csv the early-stopping procedure with the PFN's
                          predictive distribution (compute vs AtS at ratio 8)
  candidates_coverage.csv share of models whose L(D*) is inside the PFN's
                          central 80% interval, per file and ratio
  candidates.md           the tables (generated)
"""

from __future__ import annotations

import hashlib
import pathlib
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import common
from lensllm_jax import benchmarks, budgeted, curve_pfn, metrics, plus_candidates, protocol

FLAGS = flags.FLAGS

CAND_HEADER = ("fold", "dataset", "candidate", "ratio", "metric", "value")
CHOSEN_HEADER = ("held_out", "trained_on", "candidate", "pooled_setting", "train_criterion")
BUDGET_HEADER = ("dataset", "method", "setting", "flops", "relative_to_ats8", "RelAcc",
                 "PearCorr")
# Rows of the report beside the candidates: the published baselines.
BASELINES = ("AtS", "RectifiedFit")


def define_flags() -> None:
  common.define_config_file("configs/lensllm_plus_candidates.py",
                            "configs/lensllm_plus_candidates.py")


def grid_table(grid_csv: pathlib.Path, name: str, ratios) -> dict:
  """protocol table (config name -> metric -> [ratios]) of one file from grid.csv."""
  rows = [r for r in common.read_rows(grid_csv) if r["dataset"] == name]
  if not rows:
    raise app.UsageError(f"{grid_csv}: no rows for {name!r}; run experiments.lensllm_plus first")
  have = {(r["config"], int(r["ratio"]), r["metric"]): float(r["value"]) for r in rows}
  names = {r["config"] for r in rows}
  return {n: {m: np.array([have[(n, r, m)] for r in ratios]) for m in protocol.METRICS}
          for n in names}


def check_inputs(grid_dir: pathlib.Path, sets) -> None:
  """The grid must have been computed on the same file contents."""
  old = {r["dataset"]: r["sha256"] for r in common.read_rows(grid_dir / "inputs.csv")}
  for c in sets:
    digest = hashlib.sha256(pathlib.Path(c.source).read_bytes()).hexdigest()
    if old.get(c.name) != digest:
      raise app.UsageError(f"{grid_dir}/inputs.csv: {c.name} has other contents than "
                           f"{c.source}; rerun experiments.lensllm_plus")


def run(cfg) -> pathlib.Path:
  t0 = time.time()
  out = pathlib.Path(cfg.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  data_dir = cfg.data_dir or None
  reported = [benchmarks.load_curves(s, data_dir=data_dir) for s in cfg.benchmarks]
  train_only = [benchmarks.load_curves(s, data_dir=data_dir) for s in cfg.train_only]
  files = reported + train_only
  ratios = [int(r) for r in cfg.ratios]
  grid_dir = pathlib.Path(cfg.grid_dir)
  check_inputs(grid_dir, files)
  file_ratios = [ratios] * len(reported) + [protocol.training_ratios(c, ratios)
                                            for c in train_only]
  grid = protocol.default_grid()
  grid_tables = [grid_table(grid_dir / "grid.csv", c.name, r)
                 for c, r in zip(files, file_ratios, strict=True)]
  # Pooled setting of each fold: chosen on the fold's training files (grid.csv).
  folds = []
  for i, c in enumerate(reported):
    train = [j for j in range(len(files)) if j != i]
    cfg_i, _ = protocol.choose([grid_tables[j] for j in train], grid)
    folds.append((c.name, train, cfg_i))
    logging.info("[%s] pooled setting chosen on the others: %s", c.name, cfg_i.name)
  predictor = (curve_pfn.default_predictor() if not cfg.pfn_dir
               else curve_pfn.load_predictor(cfg.pfn_dir))
  key = jax.random.key(cfg.seed)
  preds, truths = [], []
  for j, c in enumerate(files):
    t = time.time()
    truth, p = plus_candidates.candidate_predictions(
      c, file_ratios[j], key=jax.random.fold_in(key, j), pooled_configs=[f[2] for f in folds],
      predictor=predictor, num_restarts=cfg.num_restarts, num_steps=cfg.num_steps)
    preds.append(p)
    truths.append(truth)
    logging.info("[%s] candidates predicted in %.1fs", c.name, time.time() - t)
  cands = plus_candidates.candidate_names()
  rows, chosen_rows = [], []
  chosen = {}
  for held, train, pcfg in folds:
    tables = {}
    for j, c in enumerate(files):
      tables[c.name] = {}
      for cand in cands:
        pred = plus_candidates.candidate_prediction(cand, preds[j], pcfg)
        tables[c.name][cand.name] = plus_candidates.score_table(pred, truths[j])
      tables[c.name]["RectifiedFit"] = plus_candidates.score_table(preds[j]["RectifiedFit"],
                                                                   truths[j])
      for name, tab in tables[c.name].items():
        for k, r in enumerate(file_ratios[j]):
          rows += [{"fold": held, "dataset": c.name, "candidate": name, "ratio": r,
                    "metric": m, "value": f"{tab[m][k]:.6f}"} for m in protocol.METRICS]
    best, val = plus_candidates.choose_candidate([tables[files[j].name] for j in train], cands)
    chosen[held] = best
    chosen_rows.append({"held_out": held, "trained_on": "+".join(files[j].name for j in train),
                        "candidate": best.name, "pooled_setting": pcfg.name,
                        "train_criterion": f"{val:.6f}"})
    logging.info("[%s] LensLLM+ = %s (criterion on the others %.4f)", held, best.name, val)
  for name in ("candidates.csv", "candidates_chosen.csv", "candidates_budgeted.csv",
               "candidates_coverage.csv"):
    if (out / name).exists():
      (out / name).unlink()
  common.append_rows(out / "candidates.csv", CAND_HEADER, rows)
  # Calibration of the PFN on real curves: share of models whose L(D*) lies in
  # the central 80% predictive interval (reported, not used by any choice).
  cover = []
  for j, c in enumerate(files):
    inside = ((preds[j]["CurvePFN_q0.1"] <= truths[j][None]) &
              (truths[j][None] <= preds[j]["CurvePFN_q0.9"])).mean(1)   # [R]
    cover += [{"dataset": c.name, "ratio": r, "coverage80": f"{inside[k]:.6f}"}
              for k, r in enumerate(file_ratios[j])]
  common.append_rows(out / "candidates_coverage.csv", ("dataset", "ratio", "coverage80"), cover)
  common.append_rows(out / "candidates_chosen.csv", CHOSEN_HEADER, chosen_rows)
  budget_rows = []
  for c in reported:
    target = float(np.max(c.data_sizes))
    truth = c.column(target)
    ats8 = budgeted.method_flops("AtS", c.sizes, c.data_sizes, target / 8)
    res = plus_candidates.budgeted_pfn_selection(c, cfg.budget_levels, predictor=predictor,
                                                 max_data_num=target / min(ratios))
    budget_rows += [{"dataset": c.name, "method": "BudgetedCurvePFN", "setting": f"z={r.z:g}",
                     "flops": f"{r.flops:.6g}", "relative_to_ats8": f"{r.flops / ats8:.6g}",
                     "RelAcc": f"{metrics.relative_accuracy(r.selection.chosen, truth):.6f}",
                     "PearCorr": f"{metrics.pearson_corr(r.selection.feature, truth):.6f}"}
                    for r in res]
  common.append_rows(out / "candidates_budgeted.csv", BUDGET_HEADER, budget_rows)
  (out / "candidates.md").write_text(tables_md(out, [c.name for c in reported],
                                               [c.name for c in train_only], ratios) + "\n")
  logging.info("done in %.1fs; outputs in %s", time.time() - t0, out)
  return out


def _f(v, scale=100.0, digits=1) -> str:
  return "" if v is None or not np.isfinite(v) else f"{scale * v:.{digits}f}"


def tables_md(out: pathlib.Path, reported, train_only, ratios) -> str:
  """Markdown of candidates*.csv with the target checks."""
  rows = common.read_rows(out / "candidates.csv")
  val = {(r["fold"], r["dataset"], r["candidate"], r["metric"], int(r["ratio"])): float(r["value"])
         for r in rows}
  chosen = {r["held_out"]: r for r in common.read_rows(out / "candidates_chosen.csv")}
  names = [c.name for c in plus_candidates.candidate_names()] + ["RectifiedFit"]
  md = ["# LensLLM+ chosen among candidates under leave-one-dataset-out "
        "(generated by experiments/lensllm_plus_candidates.py)", "",
        "Candidates: " + ", ".join(f"`{n}`" for n in names[:-1]) + ". `wAtS+X` = exp(w log "
        "L_AtS(D*) + (1 - w) log L_X(D*)). Chosen for each reported file by mean PearCorr + "
        "mean RelAcc over the ratios on the OTHER files (training-only study files "
        f"{', '.join(train_only)} included); RectifiedFit (= constant-F LensLLM curve mode) "
        "is a baseline, not a candidate.", "",
        "| reported on | chosen on | LensLLM+ = | Pooled setting of the fold | training "
        "criterion |", "|---|---|---|---|---|"]
  md += [f"| {h} | {c['trained_on']} | `{c['candidate']}` | `{c['pooled_setting']}` | "
         f"{float(c['train_criterion']):.4f} |" for h, c in chosen.items()]
  md.append("")

  def mean(fold, ds, cand, metric, rs):
    return float(np.nanmean([val.get((fold, ds, cand, metric, r), np.nan) for r in rs]))

  md += ["## Means over the ratios 1/8 ... 1/512, each reported file under its own fold", "",
         "| file | method | PearCorr | RelAcc | RMSE@D* |", "|---|---|---|---|---|"]
  for ds in reported:
    pick = chosen[ds]["candidate"]
    for cand in [pick] + [n for n in names if n != pick]:
      label = f"**LensLLM+** (= {cand})" if cand == pick else cand
      md.append(f"| {ds} | {label} | {_f(mean(ds, ds, cand, 'PearCorr', ratios))} | "
                f"{_f(mean(ds, ds, cand, 'RelAcc', ratios))} | "
                f"{mean(ds, ds, cand, 'RMSE', ratios):.4f} |")
  md.append("")
  for metric, scale, digits in (("PearCorr", 100, 1), ("RelAcc", 100, 1), ("RMSE", 1, 4)):
    for ds in reported:
      pick = chosen[ds]["candidate"]
      md += [f"## {metric}, {ds} (per ratio)", "",
             "| method | " + " | ".join(f"1/{r}" for r in ratios) + " | mean |",
             "|---|" + "---|" * (len(ratios) + 1)]
      for cand in (pick, "AtS", "RectifiedFit"):
        v = [val.get((ds, ds, cand, metric, r), np.nan) for r in ratios]
        label = f"LensLLM+ ({cand})" if cand == pick else cand
        md.append(f"| {label} | " + " | ".join(_f(x, scale, digits) for x in v) +
                  f" | {_f(np.nanmean(v), scale, digits)} |")
      md.append("")
  md += ["## Target check (means over the ratios)", "",
         "| file | PearCorr LensLLM+ vs AtS | RelAcc LensLLM+ vs AtS | RMSE@D* LensLLM+ vs "
         "RectifiedFit, AtS |", "|---|---|---|---|"]
  for ds in reported:
    pick = chosen[ds]["candidate"]
    p, a = mean(ds, ds, pick, "PearCorr", ratios), mean(ds, ds, "AtS", "PearCorr", ratios)
    q, b = mean(ds, ds, pick, "RelAcc", ratios), mean(ds, ds, "AtS", "RelAcc", ratios)
    e = mean(ds, ds, pick, "RMSE", ratios)
    f, g = mean(ds, ds, "RectifiedFit", "RMSE", ratios), mean(ds, ds, "AtS", "RMSE", ratios)
    md.append(f"| {ds} | {100 * p:.1f} vs {100 * a:.1f} ({'met' if p > a else 'NOT met'}) | "
              f"{100 * q:.1f} vs {100 * b:.1f} ({'met' if q >= b else 'NOT met'}) | "
              f"{e:.4f} vs {f:.4f}, {g:.4f} ({'met' if e < min(f, g) else 'NOT met'}) |")
  md.append("")
  fold0 = reported[0]
  md += ["## Dynamic F vs constant F (RMSE@D*, mean over the file's ratios; training-only "
         "study files included, not used to report LensLLM+)", "",
         "| file | Spectral (F decays with D) | RectifiedFit (constant F) | CurvePFN |",
         "|---|---|---|---|"]
  for ds in list(reported) + list(train_only):
    rs = sorted({k[4] for k in val if k[1] == ds and k[0] == fold0})
    md.append(f"| {ds} | {mean(fold0, ds, 'Spectral', 'RMSE', rs):.4f} | "
              f"{mean(fold0, ds, 'RectifiedFit', 'RMSE', rs):.4f} | "
              f"{mean(fold0, ds, 'CurvePFN', 'RMSE', rs):.4f} |")
  md.append("")
  cover = common.read_rows(out / "candidates_coverage.csv")
  if cover:
    md += ["## CurvePFN calibration on real curves: share of models with L(D*) inside the "
           "central 80% predictive interval (on the prior: 70-90%, tests/test_curve_pfn.py)", "",
           "| file | per ratio (1/8, 1/16, ...) | mean |", "|---|---|---|"]
    for ds in list(reported) + list(train_only):
      v = [float(r["coverage80"]) for r in cover if r["dataset"] == ds]
      md.append(f"| {ds} | " + ", ".join(_f(x) for x in v) + f" | {_f(np.mean(v))} |")
    md.append("")
  budget = common.read_rows(out / "candidates_budgeted.csv")
  if budget:
    md += ["## Budgeted: early stopping with the CurvePFN's predictive mean and sd", "",
           "| file | level | compute / AtS@8 | RelAcc | PearCorr | AtS@8 RelAcc |",
           "|---|---|---|---|---|---|"]
    for r in budget:
      ats8 = val.get((r["dataset"], r["dataset"], "AtS", "RelAcc", 8), np.nan)
      md.append(f"| {r['dataset']} | {r['setting']} | {float(r['relative_to_ats8']):.4f} | "
                f"{_f(float(r['RelAcc']))} | {_f(float(r['PearCorr']))} | {_f(ats8)} |")
    md += ["", "Budget target: AtS's RelAcc at ratio 8 with at most 1/4 of its compute (the "
           "levels z are not chosen by the protocol; every level is shown):", ""]
    for ds in reported:
      ats8 = val.get((ds, ds, "AtS", "RelAcc", 8), np.nan)
      ok = [r for r in budget if r["dataset"] == ds and float(r["relative_to_ats8"]) <= 0.25
            and float(r["RelAcc"]) >= ats8 - 1e-9]
      md.append(f"- {ds}: AtS@8 RelAcc {_f(ats8)}; " + (
        f"reached at {ok[0]['setting']} with {float(ok[0]['relative_to_ats8']):.4f} of the "
        "compute" if ok else "NOT reached within 1/4 of the compute"))
    md.append("")
  return "\n".join(md)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  run(FLAGS.config)


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
