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
fine-tuning through the sweep's run machinery (`lensllm_jax.sweep`, its
runs.jsonl rows, nested subsets, early stopping, orbax resume) and charges
each run's own train FLOPs (`experiments/select_online.py`).

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
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import common
from lensllm_jax import benchmarks, budgeted, forecast, metrics, selection

FLAGS = flags.FLAGS


def define_flags() -> None:
  common.define_config_file("configs/select.py", "Selection configuration (configs/select.py).")
  flags.DEFINE_string("output_dir", "", "Output directory (predict, replay).")
  flags.DEFINE_string("workdir", "", "Work directory of the online selection (resumable).")
  flags.DEFINE_bool("distributed", False,
                    "Call jax.distributed.initialize() (online, multi-host GPU/TPU).")


# ------------------------------------------------------------------ outputs ---


def _num(x):
  """A float for JSON (None for NaN / inf)."""
  x = float(x)
  return x if math.isfinite(x) else None


def _atomic_text(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_selection(out: pathlib.Path, fc: forecast.Forecast, curves,
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
  _atomic_text(out / "selection.md", "\n".join(md) + "\n")
  header = ["rank", "model", "size", "predicted", "lower", "upper", "sd_log", "largest_measured"]
  lines = [",".join(header)]
  for r in rows:
    lines.append(",".join(json.dumps(r[h]) if h == "model" else f"{r[h]:.6g}" if isinstance(
        r[h], float) else str(r[h]) for h in header))
  _atomic_text(out / "selection.csv", "\n".join(lines) + "\n")
  payload = fc.to_json()
  payload["models"] = [{k: _num(v) if isinstance(v, float) else v for k, v in r.items()}
                       for r in rows]
  _atomic_text(out / "selection.json", json.dumps(payload, indent=1) + "\n")
  if band is not None:
    _figure(out / "selection.png", fc, curves, band)


def _figure(path: pathlib.Path, fc: forecast.Forecast, curves,
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
  write_selection(out, fc, curves, band, notes)
  logging.info("%s", fc.headline())
  return fc


# -------------------------------------------------------- the procedure ---


def schedule(cfg, target: float) -> list[float]:
  """D_k = d0 * 2^k <= cap (config.max_data_num, 0: D* / 8)."""
  if cfg.d0 <= 0:
    raise app.UsageError(f"config.d0={cfg.d0}: must be > 0")
  cap = float(cfg.max_data_num) or target / 8.0
  if cap < cfg.d0:
    raise app.UsageError(f"config.max_data_num={cap:g} is below config.d0={cfg.d0}")
  if cap > target:
    raise app.UsageError(f"config.max_data_num={cap:g} is above D* = {target:g}")
  out, d = [], float(cfg.d0)
  while d <= cap:
    out.append(d)
    d *= 2
  return out


@dataclasses.dataclass(frozen=True)
class Accounting:
  """The references of the compute log: (a) exhaustive sweep, (b) full fine-tuning."""
  exhaustive: float
  full: float

  def line(self, k: int, entry: dict, models) -> str:
    m = len(models)
    return (f"round {k}: D={int(entry['data_size'])}, active {int(entry['active'].sum())}/{m}, "
            f"spent {100 * entry['flops'] / self.full:.3g} % of full fine-tuning "
            f"({100 * entry['flops'] / self.exhaustive:.3g} % of the exhaustive sweep)")


class DecisionLog:
  """decisions.jsonl, rewritten from round 0 by every run of the procedure.

  The procedure is a function of the paid losses, so a rerun (after a kill,
  or with a raised cap / an added model / another z) replays the rounds
  already paid for without training and writes the same rows.
  """

  def __init__(self, path: pathlib.Path, models, accounting: Accounting, level_index: int = 0):
    self.path, self.models, self.acc, self.level = path, tuple(models), accounting, level_index
    self.rows = []
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
           "predictions": {self.models[j]: {"predicted": _num(pred[j]),
                                            "sd_log": _num(entry["sd"][j])}
                           for j in range(len(self.models))},
           "flops": entry["flops"], "fraction_of_full": entry["flops"] / self.acc.full,
           "fraction_of_exhaustive": entry["flops"] / self.acc.exhaustive}
    if "ended_by" in entry:
      row["ended_by"] = entry["ended_by"]
    self.rows.append(row)
    data = (json.dumps(row) + "\n").encode()
    with open(self.path, "ab") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    logging.info("%s", self.acc.line(k, entry, self.models))
    if entry["flops"] > self.acc.exhaustive:
      logging.warning("round %d: spent %.3g FLOPs, more than the exhaustive sweep of the schedule "
                      "(%.3g)", k, entry["flops"], self.acc.exhaustive)


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
  note = (f"Online selection at z = {result.z:g}: {ended}; spent {100 * result.flops / accounting.full:.3g} % of "
          f"fine-tuning every model on D* ({100 * result.flops / accounting.exhaustive:.3g} % of "
          "the exhaustive sweep of the schedule). Stopped models are ranked after the survivors.")
  fc = predict_and_write(curves, meta.target_data_num, cfg.predictor, out,
                         key=jax.random.key(cfg.seed), ranking=result.selection.ranking,
                         notes=(note,))
  logging.info("%s", note)
  return fc


# ------------------------------------------------------------------ modes ---


def run_predict(cfg, out: pathlib.Path) -> None:
  if not cfg.curves:
    raise app.UsageError("config.curves: give a curve file (--config.curves=PATH)")
  curves = benchmarks.load_curves(cfg.curves, data_dir=cfg.data_dir)
  if cfg.target_data_num <= 0:
    raise app.UsageError("config.target_data_num: give D*, your fine-tuning set size (> 0)")
  predict_and_write(curves, float(cfg.target_data_num), cfg.predictor, out,
                    key=jax.random.key(cfg.seed))


def run_replay(cfg, out: pathlib.Path) -> None:
  curves = benchmarks.require_complete(benchmarks.load_curves(cfg.replay, data_dir=cfg.data_dir))
  grid = np.asarray(curves.data_sizes, np.float64)
  target = float(cfg.target_data_num) or float(grid.max())
  steps = schedule(cfg, target)
  missing = [d for d in steps if d not in grid]
  if missing:
    raise app.UsageError(f"config.replay: {curves.source} has no column for the schedule sizes "
                         f"{[int(d) for d in missing]} (d0={cfg.d0}, cap={int(max(steps))})")
  meta = selection.metadata_of(curves, target)
  acc = Accounting(exhaustive=float(budgeted.pair_flops(curves.sizes, steps).sum()),
                   full=budgeted.full_tuning_flops(curves.sizes, target))
  levels = list(dict.fromkeys([float(cfg.z), *map(float, cfg.report_levels)]))
  log = DecisionLog(out / "decisions.jsonl", curves.models, acc)
  oracles = [budgeted.CurveOracle(curves) for _ in levels]
  results = run_procedure(oracles, levels, meta, steps, cfg, acc, on_step=log)
  finish(out, results[0], oracles[0].view(max(steps)), meta, cfg, acc)
  truth = curves.column(target) if target in grid else None
  write_tradeoff(out, curves, results, acc, truth, cfg)


def write_tradeoff(out, curves, results, acc: Accounting, truth, cfg) -> None:
  """tradeoff.csv / .md: per level, the pick, its RelAcc, PearCorr of the final ranking, compute."""
  rows = []
  for r in results:
    scores = (metrics.selection_scores(r.selection, truth)
              if truth is not None and curves.num_models >= metrics.MIN_MODELS else {})
    rows.append({"z": r.z, "pick": curves.models[r.selection.chosen],
                 "RelAcc": scores.get("RelAcc", math.nan),
                 "PearCorr": scores.get("PearCorr", math.nan),
                 "fraction_of_full": r.flops / acc.full,
                 "fraction_of_exhaustive": r.flops / acc.exhaustive,
                 "rounds": len(r.history), "survivors": int(r.selection.extras["active"].sum()),
                 "ended_by": r.ended_by})
  rows.sort(key=lambda r: r["z"])
  header = list(rows[0])
  lines = [",".join(header)] + [",".join(f"{r[h]:.6g}" if isinstance(r[h], float) else
                                         json.dumps(r[h]) if h == "pick" else str(r[h])
                                         for h in header) for r in rows]
  _atomic_text(out / "tradeoff.csv", "\n".join(lines) + "\n")
  md = ["| z | pick | RelAcc | PearCorr | % of full fine-tuning | % of exhaustive sweep | "
        "rounds | survivors | ended by |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['z']:g} | {r['pick']} | {100 * r['RelAcc']:.1f} | {100 * r['PearCorr']:.1f} "
              f"| {100 * r['fraction_of_full']:.2f} | {100 * r['fraction_of_exhaustive']:.1f} | "
              f"{r['rounds']} | {r['survivors']} | {r['ended_by']} |")
  _atomic_text(out / "tradeoff.md", "\n".join(md) + "\n")
  for line in md[2:]:
    logging.info("%s: %s", curves.name, line)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cfg = FLAGS.config
  if cfg.predictor not in forecast.predictor_names():
    raise app.UsageError(f"config.predictor={cfg.predictor!r}: unknown; known: "
                         f"{', '.join(forecast.predictor_names())}")
  if cfg.mode == "online":
    if not FLAGS.workdir:
      raise app.UsageError("--workdir: the online selection needs a work directory")
    raise app.UsageError("config.mode='online': the online selection lands in the next "
                         "commit of issue 23")
  out = pathlib.Path(FLAGS.output_dir or FLAGS.workdir or "")
  if not str(out) or str(out) == ".":
    raise app.UsageError("--output_dir: give an output directory")
  t0 = time.time()
  if cfg.replay:
    run_replay(cfg, out)
  else:
    run_predict(cfg, out)
  logging.info("wrote %s in %.1fs", out, time.time() - t0)


if __name__ == "__main__":
  define_flags()
  common.run_main(main, user_errors=(forecast.SelectionInputError,))
