"""The study's report: CSV tables, figures and summary.md (experiments.lensllm_study).

The pipeline (`experiments/lensllm_study.py`) computes the rows; this module
only writes them: `write_csv`, `figures` (curves and fits, phases, selection
vs ratio per task) and `summary_md` (the Markdown summary). The method and
law names the study reports are defined here.
"""

from __future__ import annotations

import csv
import math
import pathlib

import numpy as np

from lensllm_jax.selection import metrics

BASE_METHODS = ("ZeroShot", "SubTuning", "ModelSize", "AtS", "VanillaFit", "RectifiedFit")
ALL_METHODS = BASE_METHODS + ("LensLLM", "LensLLM-NTK", "NLPMetrics")
LAW_NAMES = {"VanillaFit": "vanilla", "RectifiedFit": "rectified", "LensLLM": "lensllm-scalar-F",
             "LensLLM-NTK": "lensllm-ntk-F", "AtS": "ats"}


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


def figures(cfg, out: pathlib.Path, task: str, curves, runs, results, transition) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  d = np.asarray(curves.data_sizes)
  target = float(max(cfg.subset_sizes))
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


def _f(v, p=3) -> str:
  return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{p}f}"


def summary_md(cfg, zoo_rows, run_rows, task_info, sel_rows, rmse_rows, cost_rows,
               budget_rows, wall) -> str:
  ratios = [int(r) for r in cfg.selection.ratios]
  target = int(max(cfg.subset_sizes))
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
      [[z["name"], z["family"], z["size"], z["pretrain_steps"], _f(z["final_train_loss"])]
       + [_f(z[f"{t}_zero_shot"]) for t in cfg.tasks] + [_f(z[f"{t}_final"]) for t in cfg.tasks]
       for z in zoo_rows]))
  parts.append("")
  for t, info in task_info.items():
    parts.append(f"{t}: Spearman(zero-shot L(0), L(D*)) = {_f(info['rank_agreement'])}; "
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
        row.append(f"{_f(100 * v['PearCorr'], 1)} / {_f(100 * v['RelAcc'], 1)}")
      rows.append(row)
    parts += [f"### {t}", "", _md_table(["method"] + [f"D*/D_max={r}" for r in ratios], rows), ""]
  parts += ["## Extrapolation RMSE on held-out D > D_max (loss units, pooled over models)", ""]
  for t in cfg.tasks:
    rows = []
    for law in LAW_NAMES.values():
      rows.append([law] + [_f(next(x["rmse"] for x in rmse_rows if x["task"] == t and
                                   x["ratio"] == r and x["law"] == law and x["model"] == "ALL"),
                              4) for r in ratios])
    parts += [f"### {t}", "", _md_table(["law"] + [f"ratio {r}" for r in ratios], rows), ""]
  parts += ["## Cost (fine-tuning FLOPs per token, 6 N D per (model, D) read, relative to "
            "FullTuning on D*)", ""]
  for t in cfg.tasks:
    rows = []
    for meth in ALL_METHODS:
      rows.append([meth] + [_f(next(x["relative_to_full"] for x in cost_rows
                                    if x["task"] == t and x["ratio"] == r and x["method"] == meth),
                               4) for r in ratios])
    parts += [f"### {t}", "", _md_table(["method"] + [f"ratio {r}" for r in ratios], rows), ""]
  parts += ["## Budgeted selection (LensLLM law, early stopping of models by a Laplace "
            "confidence bound at level z)", "",
            _md_table(["task", "z", "chosen", "RelAcc %", "PearCorr %", "cost / FullTuning",
                       "last D per model"],
                      [[b["task"], b["z"], b["chosen"], _f(100 * b["RelAcc"], 1),
                        _f(100 * b["PearCorr"], 1), _f(b["relative_to_full"], 4), b["stopped_at"]]
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
                  + [_f(z[f"{q}_{w}"], 4 if q == "kd" else 3) for q in ("kd", "hess", "pac")
                     for w in ("first", "transition", "last")])
  parts.append(_md_table(header, rows))
  parts.append("")
  return "\n".join(parts)
