r"""NTK dynamics on the study curves: LensLLM with F(Theta, t(D)) vs constant F.

    python -m experiments.ntk_dynamics --config=configs/study.py:full [--output_dir=results/study]

Reads, in --output_dir (default config.output_dir): curves_<task>.csv and
ntk_eigenpairs.csv (the pre-trained kernels' eigenpairs (lambda_k, p_k) and
eta per model, written by experiments.lensllm_study, also by its
--kernels_only step). For every task and budget ratio D*/D_max of
config.selection.ratios (D* = the largest subset size), on the budget view
(D <= D_max), with the study's fit options (config.selection: seed,
restarts, steps):

  LensLLM-NTK          constant F = F(Theta, t) = sum_k e^(-2 eta lambda_k t) p_k^2,
                       t fitted (the study's LensLLM-NTK, `ntk.ntk_f_term`);
  LensLLM-NTK-dynamic  F(D) = F(Theta, tau steps(D)): steps(D) is the study's
                       fine-tuning schedule (config.train: one epoch of batches,
                       clipped to [min_steps, max_steps]) and tau is fitted
                       (`dynamic_law.ntk_dynamic_law`);
  LensLLM              curve mode, one constant F (`laws.lensllm_law()`);
  Spectral             curve mode, F(D) = F0 (w_0 + w_1 e^(-D / D_1))
                       (`dynamic_law.spectral_lensllm_law(1)`).

Scores against the curve file's L(D*): PearCorr, RelAcc, Spearman, RMSE@D*
(RMSE of L(D*) over the models, loss units) -> ntk_dynamics.csv
(task,ratio,method,metric,value) and ntk_dynamics.md. Cheap (seconds); no
cached state. The directory is the study's: this binary takes its lock and
keeps its own manifest, manifest.ntk_dynamics.json (the config, the methods and
the sha256 of the curve and eigenpair files it read): a rerun with the same
manifest skips, one with other inputs is refused naming the difference
(`--config.overwrite=True` recomputes ntk_dynamics.csv / .md only).
"""

from __future__ import annotations

import functools
import pathlib
import time

import jax
import numpy as np
from absl import flags, logging

from experiments import common, reporting
from lensllm_jax import errors, rundir, selection
from lensllm_jax.laws import dynamic_law, fitting
from lensllm_jax.plus import protocol
from lensllm_jax.theory import ntk

METHODS = ("LensLLM-NTK", "LensLLM-NTK-dynamic", "LensLLM", "Spectral")
HEADER = ("task", "ratio", "method", "metric", "value")
OUTPUTS = ("ntk_dynamics.csv", "ntk_dynamics.md")
MANIFEST = "manifest.ntk_dynamics.json"


def define_flags() -> None:
  common.define_config_file("configs/study.py", "Study configuration (configs/study.py:full).")
  flags.DEFINE_string("output_dir", None, "Study results directory (default config.output_dir).")


def read_eigenpairs(path: pathlib.Path, task: str, models) -> tuple:
  """(eigvals [M, n], proj [M, n], eta [M]) of `models` for one task (float64)."""
  rows = [r for r in common.read_rows(path) if r["task"] == task]
  if not rows:
    raise errors.WorkdirError(f"{path}: no eigenpairs for task {task!r}; run "
                              "experiments.lensllm_study (or its --kernels_only step) first")
  eig, proj, eta = [], [], []
  for m in models:
    try:
      mine = sorted((r for r in rows if r["model"] == m), key=lambda r: int(r["k"]))
      if not mine:
        raise errors.WorkdirError(f"{path}: no eigenpairs for model {m!r} of task {task!r}")
      eig.append([float(r["eigval"]) for r in mine])
      proj.append([float(r["proj"]) for r in mine])
      eta.append(float(mine[0]["eta"]))
    except (KeyError, ValueError) as e:
      if isinstance(e, errors.InputError):
        raise
      raise errors.WorkdirError(f"{path}: model {m!r} of task {task!r}: not an eigenpair row "
                                f"of lensllm_study ({type(e).__name__}: {e})") from None
  if len({len(e) for e in eig}) > 1:
    raise errors.WorkdirError(f"{path}: task {task!r}: the models have different numbers of "
                              "eigenpairs")
  return np.asarray(eig), np.asarray(proj), np.asarray(eta)


def task_results(cfg, curves, aux, methods=METHODS) -> dict:
  """method -> [ratios] SelectionResults on the budget views of one task (`methods` only)."""
  target = float(max(cfg.subsets.sizes))
  ratios = [int(r) for r in cfg.selection.ratios]
  meta, _, rv = protocol.budget_views(curves, ratios, target)
  views = [v for _, v in rv]
  key = jax.random.key(cfg.selection.seed)
  opts = fitting.FitOptions(max_steps=int(cfg.selection.max_steps))
  restarts = int(cfg.selection.num_restarts)
  tr = cfg.train
  steps = functools.partial(dynamic_law.study_steps, batch_size=int(tr.batch_size),
                            epochs=float(tr.epochs), min_steps=int(tr.min_steps),
                            max_steps=int(tr.max_steps))
  fits = {
    "LensLLM-NTK": lambda: selection.run_fitted_batch(
      "LensLLM", views, meta, key=key, num_restarts=restarts, fit_options=opts,
      f_term=ntk.ntk_f_term, aux=aux),
    "LensLLM-NTK-dynamic": lambda: selection.fit_law_views(
      "LensLLM-NTK-dynamic", dynamic_law.ntk_dynamic_law(steps), views, meta, key=key,
      use_zero_shot=True, num_restarts=restarts, aux=aux, fit_options=opts),
    "LensLLM": lambda: selection.run_fitted_batch("LensLLM", views, meta, key=key,
                                                  num_restarts=restarts, fit_options=opts),
    "Spectral": lambda: selection.fit_law_views(
      "Spectral", dynamic_law.spectral_lensllm_law(1), views, meta, key=key,
      use_zero_shot=True, num_restarts=restarts, fit_options=opts),
  }
  return {m: fits[m]() for m in methods}


def run(cfg, output_dir, methods=METHODS) -> pathlib.Path:
  """Fits `methods` on every task and ratio; writes ntk_dynamics.csv / .md to output_dir."""
  common.validate_study_selection(cfg)
  out = pathlib.Path(output_dir or cfg.output_dir)
  inputs = {f"curves_{task}": out / f"curves_{task}.csv" for task in cfg.tasks}
  inputs["ntk_eigenpairs"] = out / "ntk_eigenpairs.csv"
  for path in inputs.values():
    if not path.is_file():
      raise errors.WorkdirError(f"{path} does not exist; run experiments.lensllm_study (or its "
                              "--kernels_only step) into that directory first")
  target = float(max(cfg.subsets.sizes))
  loaded = {}  # every input read and checked before any work
  for task in cfg.tasks:
    (curves,) = common.load_all([inputs[f"curves_{task}"]], None)
    if target not in curves.data_sizes:
      raise errors.ConfigError(f"config.subsets.sizes: D* = {target:g} (the largest) is not a "
                               f"column of {curves.source}")
    loaded[task] = curves, read_eigenpairs(inputs["ntk_eigenpairs"], task, curves.models)
  config = {**cfg.to_dict(), "ntk_dynamics": {"methods": list(methods)}}
  # The budgeted step's settings are not read here (and postdate results/study's manifest).
  ignore = ("workdir", "output_dir", "selection.budget.levels", "selection.budget.method")
  with rundir.open_output_dir(out, config=config, inputs=inputs, outputs=OUTPUTS,
                              overwrite=cfg.overwrite, ignore=ignore, name=MANIFEST):
    path = out / "ntk_dynamics.csv"
    if path.is_file() and (out / "ntk_dynamics.md").is_file():
      logging.info("%s: made from these inputs already (%s); skipping", path, MANIFEST)
      return path
    return _run(cfg, out, methods, loaded)


def _run(cfg, out: pathlib.Path, methods, loaded) -> pathlib.Path:
  """loaded: task -> (CurveSet, eigenpairs of `read_eigenpairs`)."""
  t0 = time.time()
  ratios = [int(r) for r in cfg.selection.ratios]
  target = float(max(cfg.subsets.sizes))
  rows, notes = [], []
  for task, (curves, aux) in loaded.items():
    truth = curves.column(target)
    for m, results in task_results(cfg, curves, aux, methods).items():
      for r, res in zip(ratios, results, strict=True):
        sc = protocol.score_results(res, truth)
        rows += [{"task": task, "ratio": r, "method": m, "metric": k, "value": f"{sc[k]:.6f}"}
                 for k in protocol.METRICS]
        said = common.score_notes(res, truth, with_rmse=True)
        if int(cfg.selection.max_steps) == 0:  # every method here is a law fit
          said.append("config.selection.max_steps=0: the fits were not optimised")
        notes += [{"dataset": task, "method": m, "ratio": r, "note": n} for n in said]
    logging.info("[%s] %d methods x %d ratios (%.1fs)", task, len(methods), len(ratios),
                 time.time() - t0)
  path = out / "ntk_dynamics.csv"
  if path.exists():
    path.unlink()
  common.append_rows(path, HEADER, rows)
  (out / "ntk_dynamics.md").write_text(reporting.dynamics_tables(path, ratios, METHODS, notes)
                                            + "\n")
  logging.info("done in %.1fs; %s", time.time() - t0, path)
  return path


if __name__ == "__main__":
  define_flags()
  common.run_config_binary(run)
