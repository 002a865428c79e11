"""The binaries' reports: Markdown, LaTeX and PNG figures rendered from their result rows.

The binaries compute and append rows (CSV); this module only renders them, one
section per binary, so that every table format lives in one place:

  experiments.lensllm_study        write_csv, study_figures, study_summary_md (and the method
                                   and law names the study reports)
  experiments.reproduce_selection  selection_tables (selection.md, selection.tex),
                                   selection_headline_table (headline.md), selection_figures
  experiments.lensllm_plus         plus_tables (lensllm_plus.md), plus_candidates_md
                                   (candidates.md), plus_stability_table
  experiments.ntk_dynamics         dynamics_tables (ntk_dynamics.md)
  experiments.select               select_outputs (selection.md/.csv/.json), select_figure,
                                   select_tradeoff_tables (tradeoff.csv/.md)
  experiments.fit_laws             fit_laws_figure (<file>_curves.png)
  experiments.hessian_spectrum     hessian_density_figure (density.png)
  experiments.ntk_spectrum         ntk_spectrum_figure (ntk_spectrum.png)

A shared module of `experiments/` (not a binary; see docs/binaries.md).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib

import numpy as np

from experiments import common
from lensllm_jax import laws
from lensllm_jax.plus import candidates, forecast, protocol
from lensllm_jax.selection import methods as methods_lib
from lensllm_jax.selection import metrics, pooled, published

# ---------------------------------------------------------- experiments.lensllm_study ---

# The study's methods and the points each reads (cost.csv): the registry's deterministic methods
# and fitted laws (what `lensllm_study.selection_step` runs), then the study's own two: LensLLM
# with the NTK's F(Theta, t) and NLPMetrics (HT-SR alpha of the pre-trained weights: no point).
STUDY_READS = {**{m: methods_lib.METHOD_READS[m]
                  for m in (*methods_lib.DETERMINISTIC_METHODS, *methods_lib.FITTED_LAWS)},
               "LensLLM-NTK": methods_lib.METHOD_READS["LensLLM"], "NLPMetrics": "none"}
ALL_METHODS = tuple(STUDY_READS)
# rmse.csv's law column: each fitted law's curve (`Method.curve`; LensLLM's labelled by its scalar
# F, beside the NTK's), then the curves of the deterministic methods (AtS's line).
LAW_NAMES = {**{m: methods_lib.CURVES[m] for m in methods_lib.FITTED_LAWS},
             "LensLLM": "lensllm-scalar-F", "LensLLM-NTK": "lensllm-ntk-F",
             **{m: methods_lib.CURVES[m] for m in methods_lib.DETERMINISTIC_METHODS
                if m in methods_lib.CURVES}}


def kernel_distance(rec: dict) -> float:
  """NTK kernel distance of a run from the pre-trained kernel (0 for the zero-shot run)."""
  return float(rec["ntk"]["kernel_distance"]) if rec["data_size"] else 0.0


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  if not rows:
    return
  keys = list(rows[0].keys())
  for r in rows[1:]:
    keys += [k for k in r if k not in keys]
  tmp = path.with_suffix(".tmp")
  with tmp.open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
      w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
  tmp.replace(path)


def _d_axis(ax, d) -> None:
  """Log D axis with the grid's values as labels (no minor tick labels)."""
  import matplotlib.ticker as mticker

  ax.set_xscale("log")
  ax.xaxis.set_minor_locator(mticker.NullLocator())
  ax.set_xticks(list(d))
  ax.set_xticklabels([str(int(x)) for x in d], rotation=45, fontsize=7)


def study_figures(cfg, out: pathlib.Path, task: str, curves, runs, results, transition) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  d = np.asarray(curves.data_sizes)
  target = float(max(cfg.subsets.sizes))
  colors = plt.cm.tab10(np.arange(len(curves.models)) % 10)
  # Curves and LensLLM-NTK / scalar-F fits at the middle budget.
  r = [int(x) for x in cfg.selection.ratios][len(cfg.selection.ratios) // 2]
  dmax = target / r
  dd = np.geomspace(d[d > 0].min(), target, 100)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for ax, name in zip(axes, ("LensLLM-NTK", "LensLLM"), strict=True):
    pred = results[r][name].predictor.predict(dd)
    for i, mname in enumerate(curves.models):
      ax.plot(d[1:], curves.losses[i, 1:], "o", color=colors[i], ms=4, label=mname)
      ax.plot(dd, pred[i], "-", color=colors[i], lw=1)
    ax.axvline(dmax, color="k", ls=":", lw=1)
    _d_axis(ax, d[d > 0])
    ax.set_xlabel("fine-tuning examples D")
    ax.set_title(f"{task}: {LAW_NAMES[name]} fit on D <= {int(dmax)} (dotted)")
  axes[0].set_ylabel("test loss (nats / target token)")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / f"curves_{task}.png", dpi=110)
  plt.close(fig)
  # The two phases.
  fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
  hess_models = [n for n in cfg.hessian.models if task in cfg.hessian.tasks]
  for i, mname in enumerate(curves.models):
    xs = [x for x in d if x > 0]
    style = dict(color=colors[i], marker="o", ms=3, lw=1.2 if mname in hess_models else 0.6)
    axes[0].plot(xs, [runs[(mname, x)]["test_loss"] for x in xs], label=mname, **style)
    axes[1].plot(xs, [kernel_distance(runs[(mname, x)]) for x in xs], **style)
    if mname in hess_models:
      axes[2].plot(xs, [runs[(mname, x)]["hessian_top"] for x in xs], label=mname, **style)
      axes[3].plot(xs, [runs[(mname, x)]["pac_sum_sqrt"] for x in xs], label=mname, **style)
      for ax in axes:
        ax.axvline(transition[i], color=colors[i], ls="--", lw=0.8)
  titles = ("test loss", "NTK kernel distance to pre-trained", "top Hessian eigenvalue",
            "sum_i sqrt(max_x v_i^T H_i^+ v_i)")
  for ax, t in zip(axes, titles, strict=True):
    _d_axis(ax, d[d > 0])
    ax.set_xlabel("D")
    ax.set_title(t, fontsize=10)
  axes[0].legend(fontsize=6)
  if hess_models:
    axes[2].legend(fontsize=7)
  else:
    for ax in axes[2:]:
      ax.text(0.5, 0.5, "no Hessian models for this task", ha="center", transform=ax.transAxes)
  fig.suptitle(f"{task}: pre-power -> power phase (dashed: AtS-detected transition of each "
               "model with Hessians, in its colour)", fontsize=10)
  fig.tight_layout()
  fig.savefig(out / f"phases_{task}.png", dpi=110)
  plt.close(fig)
  # Selection quality vs budget.
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  ratios = [int(x) for x in cfg.selection.ratios]
  for name in ALL_METHODS:
    for ax, metric in zip(axes, ("PearCorr", "RelAcc"), strict=True):
      vals = []
      for rr in ratios:
        res = results[rr][name]
        truth = curves.column(target)
        vals.append(metrics.pearson_corr(res.feature, truth) if metric == "PearCorr"
                    else metrics.relative_accuracy(res.chosen, truth))
      ax.plot(ratios, vals, marker="o", label=name, lw=2 if name.startswith("LensLLM") else 1)
  for ax, metric in zip(axes, ("PearCorr", "RelAcc"), strict=True):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("D* / D_max")
    ax.set_title(f"{task}: {metric}")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / f"selection_{task}.png", dpi=110)
  plt.close(fig)


def _md_table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def _num(v, p=3) -> str:
  return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{p}f}"


def study_summary_md(cfg, zoo_rows, run_rows, task_info, sel_rows, rmse_rows, cost_rows,
               budget_rows, wall, notes=()) -> str:
  """summary.md of the study; `notes` (Markdown bullets of its notes.csv) say why a cell is
  NaN."""
  ratios = [int(r) for r in cfg.selection.ratios]
  target = int(max(cfg.subsets.sizes))
  pre_min = sum(float(z["seconds"]) for z in zoo_rows) / 60
  sweep_min = sum(float(r["wall_seconds"]) for r in run_rows) / 60
  parts = [f"# LensLLM study ({cfg.preset} preset)", "",
           f"Generated by `python -m experiments.lensllm_study --config=configs/study.py:{cfg.preset}`. "
           f"Time: pre-training {pre_min:.1f} min and sweeps (fine-tuning, kernels, Hessians) "
           f"{sweep_min:.1f} min, summed over models / runs (compilation included; "
           f"runs.csv has the per-run seconds); this call {wall / 60:.1f} min (a resumed call "
           f"skips finished work). D* = {target}, budgets D_max = D*/ratio for ratios "
           f"{ratios}.", "", "## Zoo", ""]
  parts.append(_md_table(
      ["model", "family", "params", "pre-train steps", "pre-train loss"]
      + [f"{t} L(0)" for t in cfg.tasks] + [f"{t} L(D*)" for t in cfg.tasks],
      [[z["name"], z["family"], z["size"], z["pretrain_steps"], _num(z["final_train_loss"])]
       + [_num(z[f"{t}_zero_shot"]) for t in cfg.tasks] + [_num(z[f"{t}_final"]) for t in cfg.tasks]
       for z in zoo_rows]))
  parts.append("")
  for t, info in task_info.items():
    parts.append(f"{t}: Spearman(zero-shot L(0), L(D*)) = {_num(info['rank_agreement'])}; "
                 f"best zero-shot model {info['best_zero']}, best fine-tuned model "
                 f"{info['best_final']}.")
  parts += ["", "## Selection (PearCorr / RelAcc, %)", ""]
  for t in cfg.tasks:
    rows = []
    for meth in ALL_METHODS:
      row = [meth]
      for r in ratios:
        v = {x["metric"]: x["value"] for x in sel_rows
             if x["task"] == t and x["ratio"] == r and x["method"] == meth}
        row.append(f"{_num(100 * v['PearCorr'], 1)} / {_num(100 * v['RelAcc'], 1)}")
      rows.append(row)
    parts += [f"### {t}", "", _md_table(["method"] + [f"D*/D_max={r}" for r in ratios], rows), ""]
  parts += ["## Extrapolation RMSE on held-out D > D_max (loss units, pooled over models)", ""]
  for t in cfg.tasks:
    rows = []
    for law in LAW_NAMES.values():
      rows.append([law] + [_num(next(x["rmse"] for x in rmse_rows if x["task"] == t and
                                   x["ratio"] == r and x["law"] == law and x["model"] == "ALL"),
                              4) for r in ratios])
    parts += [f"### {t}", "", _md_table(["law"] + [f"ratio {r}" for r in ratios], rows), ""]
  parts += ["## Cost (fine-tuning FLOPs per token, 6 N D per (model, D) read, relative to "
            "FullTuning on D*)", ""]
  for t in cfg.tasks:
    rows = []
    for meth in ALL_METHODS:
      rows.append([meth] + [_num(next(x["relative_to_full"] for x in cost_rows
                                    if x["task"] == t and x["ratio"] == r and x["method"] == meth),
                               4) for r in ratios])
    parts += [f"### {t}", "", _md_table(["method"] + [f"ratio {r}" for r in ratios], rows), ""]
  parts += ["## Budgeted selection (LensLLM law, early stopping of models by a Laplace "
            "confidence bound at level z)", "",
            _md_table(["task", "z", "chosen", "RelAcc %", "PearCorr %", "cost / FullTuning",
                       "last D per model"],
                      [[b["task"], b["z"], b["chosen"], _num(100 * b["RelAcc"], 1),
                        _num(100 * b["PearCorr"], 1), _num(b["relative_to_full"], 4), b["stopped_at"]]
                       for b in budget_rows]), ""]
  parts += ["## The two phases", "",
            "AtS-detected transition (first power-phase D) per model and task; at the "
            "smallest D, at the transition and at D*: the NTK kernel distance from the "
            "pre-trained kernel (kd), the top Hessian eigenvalue of the training loss (H) and "
            "the PAC-Bayes layer sum sum_i sqrt(max_x v_i^T H_i^+ v_i) (pac); figures "
            "phases_<task>.png.", ""]
  rows = []
  header = ["task", "model", "transition D"]
  for short in ("kd", "H", "pac"):
    header += [f"{short}(D_min)", f"{short}(tr.)", f"{short}(D*)"]
  for t, info in task_info.items():
    for z in info["phase_rows"]:
      rows.append([t, z["model"], z["transition_D"]]
                  + [_num(z[f"{q}_{w}"], 4 if q == "kd" else 3) for q in ("kd", "hess", "pac")
                     for w in ("first", "transition", "last")])
  parts.append(_md_table(header, rows))
  parts.append("")
  if notes:
    parts += ["## Notes (a nan cell above, or fits in a degenerate limit)", "", *notes, ""]
  return "\n".join(parts)


# ------------------------------------------- experiments.reproduce_selection ---


def _x100(v) -> str:
  # Rounded like the published tables: 4 decimals, then x100 with 1 decimal.
  return "" if v is None or not np.isfinite(v) else f"{100 * round(v, 4):.1f}"


def selection_notes_lines(out: pathlib.Path, name: str = "notes.csv") -> list[str]:
  """Markdown bullets of a notes file (`common.NOTES_HEADER`: why a cell is NaN or may
  mislead), one per (dataset, method, note) with its ratios (or settings, z=...)."""
  grouped = {}
  for r in common.read_rows(out / name):
    grouped.setdefault((r["dataset"], r["method"], r["note"]), []).append(r["ratio"])
  return [f"- {ds} {m} ({'ratios' if all(x.isdigit() for x in rs) else 'settings'} "
          f"{', '.join(rs)}): {note}" for (ds, m, note), rs in grouped.items()]


def selection_headline_table(out: pathlib.Path) -> str:
  """One Markdown table: mean PearCorr and RelAcc over the ratios, per file and method (x100).

  The published mean over the same ratios is in parentheses where Lin et al.
  (2024) report every one of them.
  """
  rows = common.read_rows(out / "selection.csv")
  val = {(r["dataset"], r["method"], r["metric"], int(r["ratio"])): float(r["value"])
         for r in rows}
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  cols = [(ds, metric) for ds in datasets for metric in ("PearCorr", "RelAcc")]
  md = ["| method | " + " | ".join(f"{ds} {metric}" for ds, metric in cols) + " |",
        "|---|" + "---|" * len(cols)]
  for m in methods:
    cells = []
    for ds, metric in cols:
      ratios = sorted(k[3] for k in val if k[:3] == (ds, m, metric))
      if not ratios:
        cells.append("")
        continue
      ours = float(np.mean([val[(ds, m, metric, r)] for r in ratios]))
      pub = [published.published_value(ds, m, metric, r) for r in ratios]
      cell = _x100(ours)
      if all(v is not None for v in pub):
        cell += f" ({_x100(float(np.mean(pub)))})"
      cells.append(cell)
    md.append(f"| {m} | " + " | ".join(cells) + " |")
  notes = selection_notes_lines(out)
  if notes:
    md += ["", "Notes (an empty cell is NaN; details in selection.md):", "", *notes]
  return "\n".join(md)


def selection_tables(out: pathlib.Path) -> tuple[str, str]:
  """Markdown and LaTeX tables of selection.csv (x100), published values in parentheses."""
  rows = common.read_rows(out / "selection.csv")
  val = {(r["dataset"], r["method"], r["metric"], int(r["ratio"])): float(r["value"])
         for r in rows}
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  md, tex = ["# Selection results (x100; published value of Lin et al. 2024 in parentheses)",
             ""], []
  for metric in ("PearCorr", "RelAcc", "Spearman"):
    for ds in datasets:
      ratios = sorted({k[3] for k in val if k[0] == ds and k[2] == metric})
      methods = list(dict.fromkeys(k[1] for k in val if k[0] == ds and k[2] == metric))
      if not ratios:
        continue
      md += [f"## {metric}, {ds}", "",
             "| method | " + " | ".join(f"1/{r}" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
      tex += [f"% {metric}, {ds}", "\\begin{tabular}{l" + "r" * len(ratios) + "}",
              "\\toprule", "Method & " + " & ".join(f"1/{r}" for r in ratios) + " \\\\",
              "\\midrule"]
      for m in methods:
        cells_md, cells_tex = [], []
        for r in ratios:
          ours = val.get((ds, m, metric, r))
          pub = published.published_value(ds, m, metric, r)
          c = _x100(ours)
          cells_md.append(c + (f" ({_x100(pub)})" if pub is not None else ""))
          cells_tex.append(c + (f" \\scriptsize{{({_x100(pub)})}}" if pub is not None else ""))
        md.append(f"| {m} | " + " | ".join(cells_md) + " |")
        tex.append(f"{m} & " + " & ".join(cells_tex) + " \\\\")
      md.append("")
      tex += ["\\bottomrule", "\\end{tabular}", ""]
  cost = common.read_rows(out / "cost.csv")
  if cost:
    md += ["## Compute cost (FLOPs per token = sum of 6 N D over pairs read)", "",
           "| dataset | method | setting | relative FLOPs | RelAcc | PearCorr |",
           "|---|---|---|---|---|---|"]
    for r in cost:
      md.append(f"| {r['dataset']} | {r['method']} | {r['setting']} | "
                f"{float(r['relative_flops']):.4f} | {_x100(float(r['RelAcc']))} | "
                f"{_x100(float(r['PearCorr']))} |")
    md.append("")
  rm = common.read_rows(out / "rmse.csv")
  if rm:
    md += ["## Held-out curve RMSE (loss units, pooled over models; D > D_max)", "",
           "| dataset | law | " + " | ".join(f"D_max={d}" for d in sorted(
               {int(r['max_data_num']) for r in rm}, reverse=True)) + " |"]
    dmaxes = sorted({int(r["max_data_num"]) for r in rm}, reverse=True)
    md.append("|---|---|" + "---|" * len(dmaxes))
    pooled = {(r["dataset"], r["law"], int(r["max_data_num"])): float(r["rmse"])
              for r in rm if r["model"] == "ALL"}
    for ds, law in dict.fromkeys((k[0], k[1]) for k in pooled):
      md.append(f"| {ds} | {law} | " + " | ".join(
          f"{pooled.get((ds, law, d), float('nan')):.4f}" for d in dmaxes) + " |")
    md.append("")
  notes = selection_notes_lines(out)
  if notes:
    md += ["## Notes (an empty cell above is NaN)", "", *notes, ""]
  return "\n".join(md), "\n".join(tex)


def selection_figures(out: pathlib.Path, curve_sets, targets, law_of) -> None:
  """PNGs of reproduce_selection: selection vs ratio, fitted curves, compute Pareto, per file.

  law_of: method -> its per-model curve in fits.csv (`methods.CURVES`: a `laws.get_law` name,
    or "ats" for AtS's line).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = common.read_rows(out / "selection.csv")
  cost = common.read_rows(out / "cost.csv")
  fits = common.read_rows(out / "fits.csv")
  for curves, target in zip(curve_sets, targets, strict=True):
    ds = curves.name
    # 1. selection vs ratio.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("PearCorr", "RelAcc"), strict=True):
      methods = list(dict.fromkeys(r["method"] for r in rows if r["dataset"] == ds))
      for i, m in enumerate(methods):
        pts = sorted((int(r["ratio"]), float(r["value"])) for r in rows
                     if r["dataset"] == ds and r["method"] == m and r["metric"] == metric)
        if not pts:
          continue
        color = f"C{i % 10}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=m)
        pub = [(p[0], published.published_value(ds, m, metric, p[0])) for p in pts]
        pub = [p for p in pub if p[1] is not None]
        if pub and target == published.TARGET_DATA_NUM:
          ax.plot([p[0] for p in pub], [p[1] for p in pub], "x--", color=color, alpha=0.6)
      ax.set_xscale("log", base=2)
      ax.set_xlabel("budget ratio D*/D_max")
      ax.set_ylabel(metric)
      ax.set_title(f"{ds}: {metric} (solid ours, dashed published)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"selection_vs_ratio_{ds}.png", dpi=110)
    plt.close(fig)

    # 2. fitted and extrapolated curves for a few models at one budget.
    dataset_fits = [r for r in fits if r["dataset"] == ds]
    if dataset_fits:
      dmaxes = sorted({int(r["max_data_num"]) for r in dataset_fits})
      dmax = dmaxes[len(dmaxes) // 2]
      truth = curves.column(target)
      picks = list(dict.fromkeys([int(np.argmin(truth)), int(np.argmax(truth)),
                                  int(np.argsort(truth)[len(truth) // 2]), 0]))[:4]
      fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 3.6), squeeze=False)
      d = np.asarray(curves.data_sizes, np.float64)
      dd = np.geomspace(d[d > 0].min(), d.max(), 200)
      for ax, i in zip(axes[0], picks, strict=True):
        mname = curves.models[i]
        ax.plot(d[d > 0], curves.losses[i, d > 0], "ko", ms=3, label="observed")
        ax.axvline(dmax, color="gray", ls=":", label="D_max")
        for r in dataset_fits:
          if r["model"] != mname or int(r["max_data_num"]) != dmax:
            continue
          p = np.array([float(x) for x in r["params"].split()])
          if r["method"] == "AtS":
            ax.plot(dd, np.exp(p[0] + p[1] * np.log(dd)), "--", label="AtS line")
            ax.axvline(p[2], color="red", ls="--", lw=0.8, label="AtS transition")
            continue
          law = laws.get_law(law_of[r["method"]])
          if np.all(np.isfinite(p)):
            ax.plot(dd, law.predict(p, dd), label=r["method"])
        ax.set_xscale("log")
        ax.set_title(mname[-28:], fontsize=8)
        ax.set_xlabel("D")
      axes[0][0].set_ylabel("test loss")
      axes[0][0].legend(fontsize=6)
      fig.suptitle(f"{ds}: fits on D <= {dmax}, extrapolated")
      fig.tight_layout()
      fig.savefig(out / f"curves_{ds}.png", dpi=110)
      plt.close(fig)

    # 3. Pareto plot.
    dc = [r for r in cost if r["dataset"] == ds]
    if dc:
      fig, axes = plt.subplots(1, 2, figsize=(11, 4))
      for ax, metric in zip(axes, ("RelAcc", "PearCorr"), strict=True):
        methods = list(dict.fromkeys(r["method"] for r in dc))
        for i, m in enumerate(methods):
          pts = sorted((max(float(r["relative_flops"]), 1e-4), float(r[metric]))
                       for r in dc if r["method"] == m)
          style = "s-" if m.startswith("Budgeted") else "o-"
          ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i % 10}",
                  label=m, ms=4)
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs / FullTuning FLOPs (0 plotted at 1e-4)")
        ax.set_ylabel(metric)
        ax.set_title(f"{ds}: {metric} vs compute")
      axes[0].legend(fontsize=7)
      fig.tight_layout()
      fig.savefig(out / f"pareto_{ds}.png", dpi=110)
      plt.close(fig)


# -------------------------------------------------- experiments.lensllm_plus ---

_PLUS = candidates.PLUS_NAME  # "LensLLM+", the protocol-chosen candidate
_POOLED = pooled.METHOD_NAME  # "PooledLensLLM", the pooled fit (a candidate with a setting)
DEVELOPMENT_FILES = ("flan", "gigaword")
HELD_OUT_COMMAND = ("python -m experiments.lensllm_plus --config=configs/lensllm_plus.py "
                    "--config.benchmarks=\"('flan','gigaword','wmt19')\" "
                    "--output_dir=runs/lensllm_plus_wmt19")


def _scaled(v, scale=100.0, digits=1) -> str:
  return "" if v is None or not np.isfinite(v) else f"{scale * v:.{digits}f}"


def plus_stability_table(rows) -> list[str]:
  """Markdown lines of candidates_stability.csv: each fold's choice and margin on all its
  training files and without each in turn, and how often that changes the choice."""
  md = ["## Stability of the choice (reported, used by no choice)", "",
        "Each fold's choice on all its training files and, in turn, on all but one (same "
        f"candidates, criterion and tie rule; {_POOLED}'s settings nested again within the "
        "remaining files). Margin: the chosen candidate's mean criterion minus the "
        "runner-up's.", "",
        "| fold (reported on) | chosen on | LensLLM+ = | criterion | runner-up | its criterion "
        "| margin |", "|---|---|---|---|---|---|---|"]
  md += [f"| {r['held_out']} | " + (f"without {r['left_out']}: " if r["left_out"] else "all: ")
         + f"{r['trained_on']} | `{r['candidate']}` | {float(r['train_criterion']):.4f} | "
         f"`{r['runner_up']}` | {float(r['runner_up_criterion']):.4f} | "
         f"{float(r['margin']):.4f} |" for r in rows]
  md.append("")
  for held in dict.fromkeys(r["held_out"] for r in rows):
    full = next(r for r in rows if r["held_out"] == held and not r["left_out"])
    drop = [r for r in rows if r["held_out"] == held and r["left_out"]]
    moved = [r for r in drop if r["candidate"] != full["candidate"]]
    md.append(f"- {held}: " + (
      f"the choice changes in {len(moved)} of {len(drop)} runs without one training file"
      + "".join(f"; without {r['left_out']}: `{r['candidate']}`" for r in moved)
      if drop else "one training file: no choice without it"))
  md.append("")
  return md


def plus_tables(out: pathlib.Path, ratios) -> str:
  """Markdown of the CSVs of steps 0-6, with the target checks."""
  res = {(r["dataset"], r["method"], r["metric"], int(r["ratio"])): float(r["value"])
         for r in common.read_rows(out / "results.csv")}
  cand = {(r["fold"], r["dataset"], r["candidate"], r["metric"], int(r["ratio"])): float(r["value"])
          for r in common.read_rows(out / "candidates.csv")}
  chosen = {r["held_out"]: r for r in common.read_rows(out / "candidates_chosen.csv")}
  reported = list(chosen)
  names = [c.name for c in candidates.all_candidates()]
  methods = [_PLUS, *candidates.BASELINES]

  def mean(table, key, rs):
    return float(np.nanmean([table.get((*key, r), np.nan) for r in rs]))

  md = ["# LensLLM+ under leave-one-dataset-out (generated by experiments/lensllm_plus.py)", "",
        "LensLLM+ on each reported file is the candidate with the best mean PearCorr + mean "
        "RelAcc over the ratios on the OTHER files (`candidates.leave_one_out`). "
        "Candidates: " + ", ".join(f"`{n}`" for n in names) + "; `wAtS+X` = exp(w log "
        f"L_AtS(D*) + (1 - w) log L_X(D*)). `{_POOLED}` uses the setting of the "
        f"{len(protocol.default_grid())}-setting grid chosen on the same other files (on "
        "each of those files, while they are compared, the nested setting below).", ""]
  dev = [ds for ds in reported if ds in DEVELOPMENT_FILES]
  if dev:
    md += [f"Provenance: {' and '.join(dev)} are development files of LensLLM+ (its "
           "definition was revised while their numbers were visible: docs/lensllm_plus.md, "
           "\"How these numbers were made\"); their rows measure fit to those files under "
           "the protocol, not generalisation. Held-out check on WMT19 (Lin et al. 2024), "
           f"fetched by name: `{HELD_OUT_COMMAND}`.", ""]
  inputs = common.read_rows(out / "inputs.csv")
  if inputs:
    md += ["Inputs:", "", "| file | role | ratios | sha256 (first 12) |", "|---|---|---|---|"]
    md += [f"| {r['dataset']} | {r['role']} | {r['ratios'] or r['source']} | "
           f"`{r['sha256'][:12]}` |" for r in inputs]
    md.append("")
  pooled_rows = {r["held_out"]: r for r in common.read_rows(out / "chosen.csv")}
  md += ["## Choices (each on the other files only)", "",
         f"| reported on | chosen on | LensLLM+ = | its criterion there | {_POOLED} setting | "
         f"{_POOLED} criterion there |", "|---|---|---|---|---|---|"]
  md += [f"| {h} | {c['trained_on']} | `{c['candidate']}` | {float(c['train_criterion']):.4f} "
         f"| `{c['pooled_setting']}` | {float(pooled_rows[h]['train_criterion']):.4f} |"
         for h, c in chosen.items()]
  nested = common.read_rows(out / "chosen_nested.csv")
  md += ["", f"Nested {_POOLED} settings: when the candidates of a fold are compared, "
         f"{_POOLED} is "
         "scored on each training file with the setting chosen (same grid, criterion and tie "
         "rule) on the fold's OTHER training files, never on a file its setting was chosen on "
         "(with a single training file: the grid's first setting).", "",
         f"| fold (reported on) | {_POOLED} scored on | its setting chosen on | setting | "
         "criterion there |", "|---|---|---|---|---|"]
  md += [f"| {r['held_out']} | {r['scored_on']} | {r['trained_on'] or '(nothing)'} | "
         f"`{r['config']}` | {_scaled(float(r['train_criterion']), 1, 4)} |" for r in nested]
  stability = common.read_rows(out / "candidates_stability.csv")
  if stability:
    md += [""] + plus_stability_table(stability)[:-1]
  md += ["", "## Means over the ratios 1/8 ... 1/512 (PearCorr, RelAcc x100; RMSE of L(D*) "
         "over the models, loss units), each reported file under its own fold", "",
         "| file | method | PearCorr | RelAcc | RMSE@D* |", "|---|---|---|---|---|"]
  for ds in reported:
    pick = chosen[ds]["candidate"]
    md.append(f"| {ds} | **{_PLUS}** (= {pick}) | {_scaled(mean(res, (ds, _PLUS, 'PearCorr'), ratios))}"
              f" | {_scaled(mean(res, (ds, _PLUS, 'RelAcc'), ratios))} | "
              f"{mean(res, (ds, _PLUS, 'RMSE'), ratios):.4f} |")
    for n in names + list(candidates.BASELINES[1:]):
      key = (ds, ds, n)
      md.append(f"| {ds} | {n} | {_scaled(mean(cand, (*key, 'PearCorr'), ratios))} | "
                f"{_scaled(mean(cand, (*key, 'RelAcc'), ratios))} | "
                f"{mean(cand, (*key, 'RMSE'), ratios):.4f} |")
  md.append("")
  for metric, scale, digits in (("PearCorr", 100, 1), ("RelAcc", 100, 1), ("RMSE", 1, 4)):
    for ds in reported:
      md += [f"## {metric}, {ds} (per ratio)", "",
             "| method | " + " | ".join(f"1/{r}" for r in ratios) + " | mean |",
             "|---|" + "---|" * (len(ratios) + 1)]
      for m in methods:
        v = [res.get((ds, m, metric, r), np.nan) for r in ratios]
        md.append(f"| {m} | " + " | ".join(_scaled(x, scale, digits) for x in v) +
                  f" | {_scaled(np.nanmean(v), scale, digits)} |")
      md.append("")
  md += ["## Target check (means over the ratios)", "",
         f"| file | PearCorr {_PLUS} vs AtS | RelAcc {_PLUS} vs AtS | RMSE@D* {_PLUS} vs "
         "RectifiedFit, AtS |", "|---|---|---|---|"]
  for ds in reported:
    p, a = mean(res, (ds, _PLUS, "PearCorr"), ratios), mean(res, (ds, "AtS", "PearCorr"), ratios)
    q, b = mean(res, (ds, _PLUS, "RelAcc"), ratios), mean(res, (ds, "AtS", "RelAcc"), ratios)
    e = mean(res, (ds, _PLUS, "RMSE"), ratios)
    f, g = mean(res, (ds, "RectifiedFit", "RMSE"), ratios), mean(res, (ds, "AtS", "RMSE"), ratios)
    md.append(f"| {ds} | {100 * p:.1f} vs {100 * a:.1f} ({'met' if p > a else 'NOT met'}) | "
              f"{100 * q:.1f} vs {100 * b:.1f} ({'met' if q >= b else 'NOT met'}) | "
              f"{e:.4f} vs {f:.4f}, {g:.4f} ({'met' if e < min(f, g) else 'NOT met'}) |")
  md.append("")
  cost = common.read_rows(out / "cost.csv")
  budget = [r for r in common.read_rows(out / "budgeted.csv")
            if r["candidate"] == chosen.get(r["dataset"], {}).get("candidate")]
  md += ["## Compute (sum of 6 N D over the (model, D) pairs read, relative to AtS at ratio 8)",
         "", f"Budgeted{_PLUS}: early stopping with the chosen candidate's own predictive mean "
         "and sd of log L(D*) (`candidates.budgeted_candidate_selection`; the levels z are "
         "not chosen by the protocol, every level is shown).", "",
         "| file | method | setting | compute / AtS@8 | RelAcc | PearCorr |",
         "|---|---|---|---|---|---|"]
  for r in cost + budget:
    label = r["method"] + (f" (= {r['candidate']})" if "candidate" in r else "")
    md.append(f"| {r['dataset']} | {label} | {r['setting']} | "
              f"{float(r['relative_to_ats8']):.4f} | {_scaled(float(r['RelAcc']))} | "
              f"{_scaled(float(r['PearCorr']))} |")
  md += ["", f"Budget target: AtS's RelAcc at ratio 8 reached by {_PLUS} (fixed budget or "
         "budgeted early stopping) with at most 1/4 of AtS's compute at ratio 8; the smallest "
         "such fraction:", ""]
  for ds in reported:
    ats8 = res.get((ds, "AtS", "RelAcc", 8))
    if ats8 is None:
      continue
    ok = [r for r in cost + budget if r["dataset"] == ds and _PLUS in r["method"]
          and float(r["RelAcc"]) >= ats8 - 1e-9]
    best = min(ok, key=lambda r: float(r["relative_to_ats8"])) if ok else None
    md.append(f"- {ds}: AtS@8 RelAcc {100 * ats8:.1f}; " + (
      f"reached by {best['method']} ({best['setting']}) at "
      f"{float(best['relative_to_ats8']):.4f} of the compute "
      f"({'met' if float(best['relative_to_ats8']) <= 0.25 else 'NOT met'})" if best
      else "NOT reached"))
  md.append("")
  notes = selection_notes_lines(out) + selection_notes_lines(out, "budgeted_notes.csv")
  if notes:
    md += ["## Notes (an empty cell above is NaN, or its fits ended degenerate)", "", *notes, ""]
  return "\n".join(md)


def plus_candidates_md(out: pathlib.Path) -> str:
  """Markdown of candidates*.csv: the choice's evidence, dynamic vs constant F, PFN coverage."""
  cand = {(r["fold"], r["dataset"], r["candidate"], r["metric"], int(r["ratio"])): float(r["value"])
          for r in common.read_rows(out / "candidates.csv")}
  chosen = {r["held_out"]: r for r in common.read_rows(out / "candidates_chosen.csv")}
  reported = list(chosen)
  names = [c.name for c in candidates.all_candidates()]

  def mean(table, key, rs):
    return float(np.nanmean([table.get((*key, r), np.nan) for r in rs]))

  nested = {(r["held_out"], r["scored_on"]): r["config"]
            for r in common.read_rows(out / "chosen_nested.csv")}
  md = ["# LensLLM+ candidates (generated by experiments/lensllm_plus.py)", "",
        "The choice's evidence: for each fold (the reported file held out), the criterion "
        "(mean PearCorr + mean RelAcc over the file's ratios) of every candidate on each "
        f"training file, and its mean (the quantity maximised). The {_POOLED} candidates on a "
        "training file use the nested setting (chosen on the fold's other training files). "
        "The LensLLM+ report is [lensllm_plus.md](lensllm_plus.md).", ""]
  for held, c in chosen.items():
    train = c["trained_on"].split("+")
    md += [f"## Fold {held} (chosen: `{c['candidate']}`)", "",
           "| candidate | " + " | ".join(train) + " | mean |", "|---|" + "---|" * (len(train) + 1)]
    for n in names:
      vals = []
      for ds in train:
        rs = sorted({k[4] for k in cand if k[:3] == (held, ds, n)})
        pc = [cand[(held, ds, n, "PearCorr", r)] for r in rs]
        vals.append(protocol.criterion({"PearCorr": np.array(pc), "RelAcc": np.array(
          [cand[(held, ds, n, "RelAcc", r)] for r in rs])}))
      label = f"**{n}**" if n == c["candidate"] else n
      md.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in vals) +
                f" | {np.mean(vals):.4f} |")
    md += ["", f"{_POOLED} setting on each training file (nested: chosen on the other training "
           "files):", ""]
    md += [f"- {ds}: `{nested[(held, ds)]}`" for ds in train if (held, ds) in nested]
    md.append("")
  fold0 = reported[0]
  md += ["## Dynamic F vs constant F in curve mode (RMSE@D*, mean over the file's ratios; "
         "training-only study files included, not used to report LensLLM+)", "",
         "| file | Spectral (F decays with D) | RectifiedFit (constant F) | CurvePFN |",
         "|---|---|---|---|"]
  for ds in dict.fromkeys(k[1] for k in cand):
    rs = sorted({k[4] for k in cand if k[1] == ds and k[0] == fold0})
    md.append(f"| {ds} | {mean(cand, (fold0, ds, 'Spectral', 'RMSE'), rs):.4f} | "
              f"{mean(cand, (fold0, ds, 'RectifiedFit', 'RMSE'), rs):.4f} | "
              f"{mean(cand, (fold0, ds, 'CurvePFN', 'RMSE'), rs):.4f} |")
  md.append("")
  cover = common.read_rows(out / "candidates_coverage.csv")
  if cover:
    md += ["## CurvePFN calibration on real curves: share of models with L(D*) inside the "
           "central 80% predictive interval (on the prior: 70-90%, tests/plus/test_curve_pfn.py)", "",
           "| file | per ratio (1/8, 1/16, ...) | mean |", "|---|---|---|"]
    for ds in dict.fromkeys(r["dataset"] for r in cover):
      v = [float(r["coverage80"]) for r in cover if r["dataset"] == ds]
      md.append(f"| {ds} | " + ", ".join(_scaled(x) for x in v) + f" | {_scaled(np.mean(v))} |")
    md.append("")
  notes = selection_notes_lines(out)
  if notes:  # a candidate's NaN score at a ratio: left out of its mean
    md += ["## Notes (NaN scores, left out of the means above; degenerate fits)", "", *notes,
           ""]
  return "\n".join(md)


# -------------------------------------------------- experiments.ntk_dynamics ---


def dynamics_tables(path: pathlib.Path, ratios, methods, notes=()) -> str:
  """Markdown of ntk_dynamics.csv: per task and metric, the methods over the ratios; `notes`
  (`common.NOTES_HEADER` rows, task as dataset) say why a cell is NaN."""
  val = {(r["task"], r["method"], r["metric"], int(r["ratio"])): float(r["value"])
         for r in common.read_rows(path)}
  tasks = list(dict.fromkeys(k[0] for k in val))
  md = ["# NTK dynamics on the study curves (generated by experiments/ntk_dynamics.py)", "",
        "F(Theta, t(D)) with t = tau steps(D) (the study's schedule) vs one constant F, in NTK "
        "mode (the pre-trained kernels' eigenpairs, ntk_eigenpairs.csv) and in curve mode; "
        "fits on D <= D* / ratio. PearCorr, RelAcc x100; RMSE of L(D*) over the models "
        "(loss units).", ""]
  for metric, scale, digits in (("RMSE", 1, 4), ("PearCorr", 100, 1), ("RelAcc", 100, 1)):
    md += [f"## {metric}", "", "| task | method | " + " | ".join(f"1/{r}" for r in ratios) +
           " | mean |", "|---|---|" + "---|" * (len(ratios) + 1)]
    for task in tasks:
      for m in methods:
        v = [val.get((task, m, metric, r), np.nan) for r in ratios]
        cells = ["" if not np.isfinite(x) else f"{scale * x:.{digits}f}" for x in v]
        mean = np.nanmean(v) if np.any(np.isfinite(v)) else np.nan
        md.append(f"| {task} | {m} | " + " | ".join(cells) +
                  f" | {'' if not np.isfinite(mean) else f'{scale * mean:.{digits}f}'} |")
    md.append("")
  if notes:
    md += ["## Notes (an empty cell above is NaN)", "",
           *[f"- {r['dataset']} {r['method']} (ratio {r['ratio']}): {r['note']}" for r in notes],
           ""]
  return "\n".join(md)


# ------------------------------------------------------------------- experiments.select ---

def select_outputs(out: pathlib.Path, fc: forecast.Forecast, curves,
                    band: forecast.SizePrediction | None, notes: tuple[str, ...] = ()) -> None:
  """selection.md / .csv / .json / .png of a forecast (the figure when `band` is given)."""
  out.mkdir(parents=True, exist_ok=True)
  rows = fc.to_json()["models"]
  md = [fc.headline(), "",
        f"Predictor: {fc.predictor}; curves: {fc.source}; D* = {int(fc.target_data_num)}; "
        f"interval: central {int(forecast.INTERVAL * 100)} % of the predictor's own "
        "predictive distribution (docs/select.md).", *notes, "",
        "| rank | model | predicted L(D*) | 80 % interval | sd of log L | largest measured D |",
        "|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['rank']} | {r['model']} | {r['predicted']:.4f} | "
              f"[{r['lower']:.4f}, {r['upper']:.4f}] | {r['sd_log']:.4f} | "
              f"{int(r['largest_measured'])} |")
  common.atomic_text(out / "selection.md", "\n".join(md) + "\n")
  header = ["rank", "model", "size", "predicted", "lower", "upper", "sd_log", "largest_measured"]
  lines = [",".join(header)]
  for r in rows:
    lines.append(",".join(json.dumps(r[h]) if h == "model" else f"{r[h]:.6g}" if isinstance(
        r[h], float) else str(r[h]) for h in header))
  common.atomic_text(out / "selection.csv", "\n".join(lines) + "\n")
  payload = fc.to_json()
  payload["models"] = [{k: common.json_float(v) if isinstance(v, float) else v for k, v in r.items()}
                       for r in rows]
  common.atomic_text(out / "selection.json", json.dumps(payload, indent=1) + "\n")
  if band is not None:
    select_figure(out / "selection.png", fc, curves, band)


def select_figure(path: pathlib.Path, fc: forecast.Forecast, curves,
                  band: forecast.SizePrediction) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(fc.models)))
  d = np.asarray(curves.data_sizes, np.float64)
  for rank, m in enumerate(fc.ranking):
    m = int(m)
    ok = np.asarray(curves.measured)[m] & (d > 0)
    label = fc.models[m] if rank < 8 else None
    ax.plot(d[ok], np.asarray(curves.losses)[m, ok], "o", ms=3, color=colors[rank], label=label)
    ax.plot(band.sizes, band.predicted[m], "-", lw=1, color=colors[rank])
    ax.fill_between(band.sizes, band.lower[m], band.upper[m], color=colors[rank], alpha=0.15)
  ax.axvline(fc.target_data_num, color="k", ls=":", lw=1)
  ax.set_xscale("log")
  ax.set_xlabel("fine-tuning samples D")
  ax.set_ylabel("test loss")
  ax.set_title(f"{fc.predictor}: measured points, predicted curve and 80 % band to "
               f"D* = {int(fc.target_data_num)}", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  tmp = path.with_name(path.name + ".tmp.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def select_tradeoff_tables(out: pathlib.Path, name: str, rows: list[dict],
                           notes: list[str] = ()) -> list[str]:
  """tradeoff.csv / .md from `select.tradeoff_rows` (its notes, why a cell is NaN, under the
  table); returns the Markdown rows (for the log)."""
  header = list(rows[0])
  lines = [",".join(header)] + [",".join(f"{r[h]:.6g}" if isinstance(r[h], float) else
                                         json.dumps(r[h]) if h == "pick" else str(r[h])
                                         for h in header) for r in rows]
  common.atomic_text(out / "tradeoff.csv", "\n".join(lines) + "\n")
  md = ["| z | pick | RelAcc | PearCorr | % of full fine-tuning | % of exhaustive sweep | "
        "rounds | survivors | ended by |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['z']:g} | {r['pick']} | {100 * r['RelAcc']:.1f} | {100 * r['PearCorr']:.1f} "
              f"| {100 * r['fraction_of_full']:.2f} | {100 * r['fraction_of_exhaustive']:.1f} | "
              f"{r['rounds']} | {r['survivors']} | {r['ended_by']} |")
  if notes:
    md_notes = ["", "Notes (a nan cell above):", "", *[f"- {n}" for n in notes]]
  else:
    md_notes = []
  common.atomic_text(out / "tradeoff.md", "\n".join(md + md_notes) + "\n")
  return md[2:]


# ---------------------------------------------------------------- experiments.fit_laws ---


def fit_laws_figure(curves, fits, mask, path: pathlib.Path, num_models: int) -> None:
  """Observed points and fitted laws of the first `num_models` models.

  fits: [(law, fitting.FitResult)] on `curves`; mask: [M, P] the fitted points.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = min(num_models, curves.num_models)
  cols = min(3, n)
  rows = int(np.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  d_plot = np.concatenate([[0.0], np.geomspace(100.0, curves.data_sizes.max() * 2, 200)])
  x_zero = 50.0  # where D = 0 is drawn on the log axis
  for i in range(n):
    ax = axes[i // cols][i % cols]
    x = np.where(curves.data_sizes > 0, curves.data_sizes, x_zero)
    seen = mask[i]
    ax.plot(x[seen], curves.losses[i, seen], "ko", ms=4, label="fitted points")
    if (~seen).any():
      ax.plot(x[~seen], curves.losses[i, ~seen], "kx", ms=5, label="held out")
    for law, result in fits:
      if not np.all(np.isfinite(result.raw_params[i])):
        continue
      with np.errstate(invalid="ignore", over="ignore"):
        y = law.predict(result, d_plot, curve=i)
      ok = np.isfinite(y) & (d_plot > 0)
      (line,) = ax.plot(d_plot[ok], y[ok], "-", lw=1.2,
                        label=f"{law.name} ({result.status[i]})")
      if np.isfinite(y[0]):  # the law's zero-shot value, drawn at x_zero
        ax.plot([x_zero], [y[0]], "s", mfc="none", color=line.get_color(), ms=6)
    ax.set_xscale("log")
    ax.set_title(curves.models[i], fontsize=8)
    ax.set_xlabel("fine-tuning samples D (D=0 drawn at 50)", fontsize=7)
    ax.set_ylabel("test loss", fontsize=7)
    ax.tick_params(labelsize=7)
    if i == 0:
      ax.legend(fontsize=6)
  for j in range(n, rows * cols):
    axes[j // cols][j % cols].axis("off")
  fig.suptitle(f"{curves.name}: fitted fine-tuning laws", fontsize=10)
  fig.tight_layout()
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


# -------------------------------------------------------- experiments.hessian_spectrum ---


def hessian_density_figure(grid, density, top, model: str, path) -> None:
  """Log-scale SLQ density of `model`'s Hessian with the Lanczos top eigenvalues marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.semilogy(grid, np.maximum(density, 1e-12), lw=1)
  for lam in top:
    ax.axvline(lam, color="tab:red", lw=0.5, alpha=0.6)
  ax.set_xlabel("eigenvalue")
  ax.set_ylabel("density (SLQ, smoothed)")
  ax.set_title(f"Hessian spectrum, {model} (red: Lanczos top-{len(top)})")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------ experiments.ntk_spectrum ---


def ntk_spectrum_figure(eigvals, ts, f, eta: float, path) -> None:
  """The kernel's spectrum lambda_k and the NTK test loss F(t) of learning rate eta."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  ax1.semilogy(np.arange(1, eigvals.size + 1), np.maximum(eigvals, 1e-30), ".-")
  ax1.set(xlabel="k", ylabel="eigenvalue lambda_k", title="NTK spectrum")
  ax2.semilogx(ts[1:], f[1:], "-")
  ax2.axhline(f[0], ls=":", c="gray", label="F(0) = ||r0||^2")
  ax2.set(xlabel="t", ylabel="F(t)", title=f"NTK test loss, eta={eta:g}")
  ax2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
