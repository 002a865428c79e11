r"""End-to-end LensLLM study on a zoo pre-trained here.

  python -m experiments.lensllm_study --config=configs/study.py:tiny    # ~1-2 min, CI
  python -m experiments.lensllm_study --config=configs/study.py:full    # ~1 h on 2 CPU cores

Steps (resumable: finished work is read back from --workdir and skipped):

  1-3. zoo        corpus, tokenizer, pre-trained models (lensllm_jax.training.zoo_build)
  4.   sweeps     one sweep of the fine-tuning binary (experiments.finetune_sweep,
                  `sweep_model`) per task in workdir/sweeps/<task>: zero-shot test
                  loss, then fine-tuning on nested subsets D (early stopping on the
                  validation split, test loss of the best checkpoint) and the
                  empirical NTK on the probe set after each run (kernel distance to
                  the pre-trained kernel); for the Hessian models, an `after_run`
                  hook adds the top Hessian eigenvalue of the training loss and the
                  per-layer PAC-Bayes table (v_i^T H_i^+ v_i, v_i = w_hat_i - w0_i).
                  One JSON line per run in sweeps/<task>/runs.jsonl; curves.csv.
  5.   kernels    pre-trained NTK spectra -> F(Theta, t) per model (aux of the law);
                  their eigenpairs -> ntk_eigenpairs.csv (--kernels_only: steps
                  1-3 and this step alone, no fine-tuning)
  6.   selection  every method on every budget D_max = D* / ratio: PearCorr,
                  RelAcc, Spearman, cost (6 N D per (model, D) read), and the
                  extrapolation RMSE of each law on the held-out D > D_max
  7.   report     CSV tables, PNG figures and summary.md in --output_dir

Outputs (--output_dir; results/study for the full preset): curves_<task>.csv
(public curve format), zoo.csv, runs.csv, pac_bayes_layers.csv, ntk_spectra.csv,
ntk_eigenpairs.csv (task,model,k,eigval,proj,eta), selection.csv, rmse.csv, cost.csv, phases.csv, curves_<task>.png,
phases_<task>.png, selection_<task>.png, summary.md; notes.csv (why a selection or
budgeted cell is NaN, and which models' fits ended degenerate or non-finite, listed under
summary.md; only when there is one).

NTK convention. The model output is the per-example mean target-token
log-likelihood f(x) (`ntk.lm_output_fn(model, "log_likelihood")` with the
task's loss mask), the regression target is Y = 0 (a perfect prediction), so
r0 = f_0(X) and, with the kernel Theta = U diag(lambda) U^T on n probe examples,

    F(Theta, t) = (1/n) sum_k exp(-2 eta lambda_k t) (u_k^T r0)^2,

eta the fine-tuning learning rate (`ntk.ntk_f_term` with proj = U^T r0 / sqrt(n)).
LensLLM-NTK fits (B, beta, E, t) of L(D) = B / (F(Theta, t) + D^beta) + E.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging

from experiments import common, hessian_common, reporting
from lensllm_jax import errors, models, rundir, selection, training
from lensllm_jax.curves import benchmarks
from lensllm_jax.laws import fitting, phases
from lensllm_jax.selection import budgeted, methods, metrics
from lensllm_jax.theory import hessian, nlp_metrics, ntk, pac_bayes
from lensllm_jax.training import study_tasks, textdata, zoo_build
from lensllm_jax.training import sweep as fs

FLAGS = flags.FLAGS


def define_flags() -> None:
  """--config and --workdir (as experiments.build_zoo), --output_dir, --skip_figures,
  --kernels_only."""
  common.define_config_file("configs/study.py:tiny",
                            "Study configuration (configs/study.py:tiny or :full).")
  flags.DEFINE_string("workdir", None, "Work directory (default: config.workdir).")
  flags.DEFINE_string("output_dir", None, "Results directory (default: config.output_dir).")
  flags.DEFINE_bool("skip_figures", False, "Do not draw PNG figures.")
  flags.DEFINE_bool("kernels_only", False,
                    "Only steps 1-3 and 5: the zoo and the pre-trained kernels -> "
                    "ntk_eigenpairs.csv (no fine-tuning; checked against an existing "
                    "ntk_spectra.csv in --output_dir).")


def log(msg: str) -> None:
  logging.info("%s", msg)


# ---------------------------------------------------------------------------
# Step 4: sweeps.


def task_data(cfg, corpus, tok, task: str):
  """Splits of a task, tokenised: {"train", "validation", "test"} -> TokenizedData."""
  recs = study_tasks.task_records(task, corpus, num_records=cfg.num_records, seed=cfg.split_seed,
                                  max_body_chars=cfg.max_body_chars)
  splits = study_tasks.make_splits(task, recs, num_validation=cfg.num_validation,
                                   num_test=cfg.num_test, min_train=max(cfg.subsets.sizes),
                                   seed=cfg.split_seed)
  t = int(cfg.task_max_len[task])
  data = {k: textdata.encode_examples(v, tok, t) for k, v in splits.items()}
  log(f"task {task}: " + ", ".join(f"{k} {v.num_examples}" for k, v in data.items())
      + f" examples, max_len {t}")
  return data


def sweep_config(cfg, task: str) -> ml_collections.ConfigDict:
  """The `experiments.finetune_sweep` configuration of one task's sweep.

  One TrainConfig for every D (constant learning rate after warm-up), so the
  compiled step is shared; each run stops at its step budget
  clip(ceil(epochs D / batch), min_steps, max_steps) or by early stopping.
  """
  tr = cfg.train
  max_steps = int(math.ceil(tr.max_steps / tr.eval_every) * tr.eval_every)
  train = dict(learning_rate=tr.learning_rate, warmup_steps=tr.warmup_steps,
               end_lr_fraction=1.0, batch_size=tr.batch_size, max_steps=max_steps,
               eval_every=tr.eval_every, patience=tr.patience,
               eval_batch_size=tr.eval_batch_size, seed=tr.seed)
  hessian = cfg.hessian.to_dict() if task in cfg.hessian.tasks else {"models": []}
  return ml_collections.ConfigDict(dict(
      name=task, max_len=int(cfg.task_max_len[task]),
      subsets=dict(sizes=list(cfg.subsets.sizes), seed=cfg.subsets.seed),
      split_seed=cfg.split_seed, num_records=cfg.num_records,
      num_validation=cfg.num_validation, num_test=cfg.num_test, train=train,
      step_budget=dict(epochs=float(tr.epochs), min_steps=int(tr.min_steps)),
      ntk=dict(num_probe=int(cfg.ntk.num_probe), output="log_likelihood",
               **{k: cfg.ntk[k] for k in ("kernel", "sketch_dim", "sketch_seed") if k in cfg.ntk}),
      checkpoint=dict(enabled=False), hessian=hessian))


@functools.cache
def loss_fn_for(config: models.ModelConfig):
  """Mean NLL per scored token of a batch dict (the fine-tuning objective): the Hessian
  binaries' loss, `hessian_common.lm_loss_fn`, one function per config."""
  return hessian_common.lm_loss_fn(models.build(config))


@functools.cache
def hessian_fn_for(config: models.ModelConfig, top_iters: int, pac_iters: int,
                   blocks: tuple[str, ...] = ()):
  """One jit-compiled function per (config, iterations) for the Hessian quantities.

  fn(params, params0, batch, pac_examples, key) -> (top eigenvalue of the mean
  training-loss Hessian on `batch` (Lanczos, `top_iters` steps), and per layer
  block i (`pac_bayes.layer_blocks`): ||v_i||, max_x v_i^T H_i,x v_i and
  max_x v_i^T H_i,x^+ v_i over the `pac_examples` (`pac_bayes.per_example_forms`,
  `pac_iters` Lanczos steps), v_i = w_hat_i - w0_i). `blocks` restricts the
  table to these block names (empty: all). Compiled once, so the sweep pays
  one compilation per model shape, not one per run and block.
  """
  loss_fn = loss_fn_for(config)

  @jax.jit
  def fn(params, params0, batch, pac_examples, key):
    op = hessian.hvp_operator(loss_fn, params, batch)
    top = hessian.lanczos_eigs(op, key, k=1, num_iters=top_iters,
                               compute_residuals=False).eigenvalues[0]
    out = {}
    for b, (name, ids) in enumerate(pac_bayes.layer_blocks(params).items()):
      if blocks and name not in blocks:
        continue
      forms = pac_bayes.per_example_forms(loss_fn, params, params0, pac_examples,
                                          jax.random.fold_in(key, b + 1), block=ids,
                                          num_iters=pac_iters)
      leaves = jax.tree_util.tree_leaves(params)
      leaves0 = jax.tree_util.tree_leaves(params0)
      v_norm = jnp.sqrt(sum(jnp.sum(jnp.square(leaves[i] - leaves0[i])) for i in ids))
      out[name] = (v_norm, jnp.max(forms.vhv), jnp.max(forms.vhpv))
    return top, out

  return fn


def hessian_quantities(cfg, m: zoo_build.ZooModel, params, train: textdata.TokenizedData,
                       idx: np.ndarray, key) -> dict:
  """Top Hessian eigenvalue of the training loss and the per-layer PAC-Bayes quantities.

  H_i = max over config.hessian.pac_bayes.examples training examples of v_i^T H_i^+ v_i
  (docs/pac_bayes.md); the reported sum is sum_i sqrt(H_i) (the bound's layer sum with C = n = 1).
  """
  hc = cfg.hessian
  sub = train.take(idx[:hc.num_examples])
  batch = {k: jnp.asarray(v) for k, v in textdata.as_batch(sub).items()}
  ex = {k: v[:hc.pac_bayes.examples] for k, v in batch.items()}
  fn = hessian_fn_for(m.config, int(hc.lanczos.iters), int(hc.pac_bayes.iters),
                      tuple(hc.pac_bayes.blocks or ()))
  top, blocks = jax.device_get(fn(params, m.params, batch, ex, key))
  layers = [{"block": name, "v_norm": float(v[0]), "vhv_max": float(v[1]),
             "vhpv_max": float(v[2])} for name, v in blocks.items()]
  return {"hessian_top": float(top),
          "pac_sum_sqrt": float(sum(math.sqrt(max(r["vhpv_max"], 0.0)) for r in layers)),
          "pac_layers": layers}


def sweep_step(cfg, workdir: pathlib.Path, corpus, tok, zoo_models) -> dict:
  """Runs (or reads back) every (task, model, D) with `experiments.finetune_sweep`.

  Each task is one sweep of the fine-tuning binary in workdir/sweeps/<task>
  (runs.jsonl, curves.csv, ntk/, config.json); the Hessian quantities of the
  fine-tuned weights are added to each run record through its `after_run` hook.

  Returns:
    {task: {(model, D): run record}}.
  """
  grid = [0] + list(cfg.subsets.sizes)
  total = len(cfg.tasks) * len(zoo_models) * len(grid)
  all_runs, t_start, n_new = {}, time.time(), 0

  def progress(rec):
    nonlocal n_new
    n_new += 1
    rate = (time.time() - t_start) / n_new
    left = total - sum(len(r) for r in all_runs.values())
    kd = rec.get("ntk", {}).get("kernel_distance")
    extra = (f" kd {kd:.3g}" if kd is not None else "") + (
        f" H {rec['hessian_top']:.3g} pac {rec['pac_sum_sqrt']:.3g}"
        if "hessian_top" in rec else "")
    log(f"[{total - left}/{total}] {rec['task']} {rec['model']} D={rec['data_size']}: test "
        f"{rec['test_loss']:.4f} steps {rec['steps']}{extra} ({rec['wall_seconds']:.1f}s; "
        f"{rate:.1f}s/run, ~{left * rate / 60:.1f} min left)")

  for task in cfg.tasks:
    scfg = sweep_config(cfg, task)
    sdir = workdir / "sweeps" / task
    fs.bind_workdir(scfg, sdir, overwrite=cfg.overwrite)
    runs = all_runs[task] = fs.read_runs(sdir / "runs.jsonl")
    if not all((m.spec.name, d) in runs for m in zoo_models for d in grid):
      run_task_sweep(cfg, task, scfg, sdir, runs, corpus, tok, zoo_models, progress)
    fs.write_curve_file(scfg, runs, {m.spec.name: {"size": m.size, "family": m.spec.family}
                                     for m in zoo_models}, sdir / "curves.csv")
  return all_runs


def run_task_sweep(cfg, task, scfg, sdir, runs, corpus, tok, zoo_models, progress) -> None:
  """The task's fine-tuning sweep: `finetune_sweep.sweep_model` for every zoo model."""
  data = task_data(cfg, corpus, tok, task)
  tcfg = training.TrainConfig(**scfg.train.to_dict())
  for m in zoo_models:
    loaded = fs.LoadedModel(m.spec.name, m.spec.family, m.config, m.params, tok, m.apply_fn)
    after_run = None
    if m.spec.name in scfg.hessian.models:
      def after_run(params, d, idx, m=m):
        t0 = time.time()
        rec = hessian_quantities(cfg, m, params, data["train"], idx, jax.random.key(d))
        return {**rec, "seconds_hessian": time.time() - t0}
    fs.sweep_model(loaded, data, scfg, tcfg, sdir, runs, after_run=after_run, progress=progress)


def run_row(rec: dict) -> dict:
  """One runs.csv row: the scalar fields of a sweep record (no history, kernels or layers)."""
  row = {k: v for k, v in rec.items() if k not in ("history", "ntk", "pac_layers")}
  row["kernel_distance"] = reporting.kernel_distance(rec)
  row["ntk_trace"] = rec["ntk"]["trace"] if "ntk" in rec else float("nan")
  return row


def curve_set(workdir: pathlib.Path, task: str, zoo_models, out: pathlib.Path):
  """The curve file the task's sweep wrote (sweeps/<task>/curves.csv), copied to
  out/curves_<task>.csv; every selection method reads it as a public curve file."""
  path = workdir / "sweeps" / task / "curves.csv"
  curves = benchmarks.load_curves(str(path))
  names = tuple(m.spec.name for m in zoo_models)
  if curves.models != names:
    raise errors.WorkdirError(f"{path}: models {curves.models}, expected the zoo's {names}")
  curves = dataclasses.replace(curves, name=task, source=str(out / f"curves_{task}.csv"))
  benchmarks.write_curves(curves, out / f"curves_{task}.csv")
  return curves


# ---------------------------------------------------------------------------
# Step 5: kernels -> F(Theta, t).


def ntk_aux(cfg, workdir: pathlib.Path, task: str, zoo_models) -> tuple:
  """(eigvals [M, n], proj [M, n], eta [M]) for `ntk.ntk_f_term` (float64)."""
  eig, proj = [], []
  for m in zoo_models:
    with np.load(workdir / "sweeps" / task / "ntk" / f"{m.spec.name}_pretrained.npz") as z:
      theta, f0 = z["theta"], z["f0"]
    spec = ntk.ntk_spectrum(theta, f0)
    eig.append(np.asarray(spec.eigvals, np.float64))
    proj.append(np.asarray(spec.proj, np.float64) / math.sqrt(theta.shape[0]))
  eta = np.full(len(zoo_models), float(cfg.train.learning_rate))
  return np.stack(eig), np.stack(proj), eta


def eigenpair_rows(task: str, zoo_models, aux) -> list[dict]:
  """Rows of ntk_eigenpairs.csv: (lambda_k, p_k, eta) of `ntk_aux`, 17 significant digits,
  so that F(Theta, t) = sum_k exp(-2 eta lambda_k t) p_k^2 can be rebuilt from the file."""
  eig, proj, eta = aux
  return [{"task": task, "model": m.spec.name, "k": k, "eigval": f"{eig[i, k]:.17g}",
           "proj": f"{proj[i, k]:.17g}", "eta": f"{eta[i]:.17g}"}
          for i, m in enumerate(zoo_models) for k in range(eig.shape[1])]


def spectrum_row(task: str, name: str, eigvals, proj, eta) -> dict:
  """One row of ntk_spectra.csv: top / median eigenvalue and F(Theta, t) at t = 0, 1, 10, 100."""
  f = ntk.ntk_test_loss(eigvals, proj, eta, np.array([0.0, 1.0, 10.0, 100.0]))
  return {"task": task, "model": name, "n": len(eigvals), "lambda_max": float(eigvals.max()),
          "lambda_median": float(np.median(eigvals)), "F_t0": float(f[0]), "F_t1": float(f[1]),
          "F_t10": float(f[2]), "F_t100": float(f[3])}


def kernels_step(cfg, workdir: pathlib.Path, out: pathlib.Path, corpus, tok, zoo_models) -> None:
  """Step 5 without the sweeps: pre-trained kernels -> out/ntk_eigenpairs.csv.

  The kernels are those the sweeps compute first (`finetune_sweep.pretrained_snapshot`,
  cached in workdir/sweeps/<task>/ntk). If out/ntk_spectra.csv exists (a finished
  study), every recomputed spectrum must match its row (relative 1e-4): the
  eigenpairs are then those of the models behind the committed curves.
  """
  old = {(r["task"], r["model"]): r for r in common.read_rows(out / "ntk_spectra.csv")}
  rows = []
  for task in cfg.tasks:
    scfg = sweep_config(cfg, task)
    sdir = workdir / "sweeps" / task
    fs.bind_workdir(scfg, sdir, overwrite=cfg.overwrite)
    data = task_data(cfg, corpus, tok, task)
    for m in zoo_models:
      t0 = time.time()
      fs.pretrained_snapshot(fs.LoadedModel(m.spec.name, m.spec.family, m.config, m.params, tok,
                                            m.apply_fn), data, scfg, sdir)
      log(f"kernel {task} {m.spec.name} ({time.time() - t0:.1f}s)")
    aux = ntk_aux(cfg, workdir, task, zoo_models)
    for i, m in enumerate(zoo_models):
      new = spectrum_row(task, m.spec.name, aux[0][i], aux[1][i], aux[2][i])
      ref = old.get((task, m.spec.name))
      bad = [k for k in ("lambda_max", "lambda_median", "F_t0", "F_t1", "F_t10", "F_t100")
             if ref is not None and not math.isclose(float(ref[k]), new[k], rel_tol=1e-4,
                                                     abs_tol=1e-12)]
      if bad:
        raise errors.WorkdirError(f"{out / 'ntk_spectra.csv'}: {task} {m.spec.name}: recomputed {bad} "
                         f"= {[new[k] for k in bad]} differ from the study's "
                         f"{[float(ref[k]) for k in bad]}: not the study's pre-trained models")
    rows += eigenpair_rows(task, zoo_models, aux)
  out.mkdir(parents=True, exist_ok=True)
  reporting.write_csv(out / "ntk_eigenpairs.csv", rows)
  log(f"kernels: {out / 'ntk_eigenpairs.csv'} ({len(old)} spectra checked)")


# ---------------------------------------------------------------------------
# Step 6: selection.


def nlp_alpha(zoo_models) -> np.ndarray:
  """[M] mean HT-SR power-law alpha of each pre-trained model's weight matrices."""
  return np.asarray([nlp_metrics.nlp_metrics(m.params).mean_alpha for m in zoo_models])


def selection_step(cfg, task: str, curves, aux, alphas):
  """All methods on all budgets of one task: (selection rows, rmse rows, cost rows, fits)."""
  target = float(max(cfg.subsets.sizes))
  meta = selection.metadata_of(curves, target_data_num=target)
  truth = curves.column(target)
  ratios = [int(r) for r in cfg.selection.ratios]
  views = [selection.visible_view(curves, target / r) for r in ratios]
  key = jax.random.key(cfg.selection.seed)
  opts = fitting.FitOptions(max_steps=int(cfg.selection.max_steps))
  results = {r: {} for r in ratios}
  for name in selection.DETERMINISTIC_METHODS:
    for r, v in zip(ratios, views, strict=True):
      results[r][name] = methods.run_method(name, v, meta)
  for name in selection.FITTED_LAWS:
    for r, res in zip(ratios, selection.run_fitted_batch(
        name, views, meta, key=key, num_restarts=int(cfg.selection.num_restarts),
        fit_options=opts), strict=True):
      results[r][name] = res
  ntk_res = selection.run_fitted_batch("LensLLM", views, meta, key=key,
                                       num_restarts=int(cfg.selection.num_restarts),
                                       fit_options=opts, f_term=ntk.ntk_f_term, aux=aux)
  for r, res in zip(ratios, ntk_res, strict=True):
    results[r]["LensLLM-NTK"] = res
    results[r]["NLPMetrics"] = selection.SelectionResult(
        "NLPMetrics", alphas, selection.rank_by(alphas))
  sel_rows, rmse_rows, cost_rows = [], [], []
  for r in ratios:
    dmax = target / r
    for name in reporting.ALL_METHODS:
      res = results[r][name]
      vals = {**metrics.selection_scores(res, truth), "chosen": curves.models[res.chosen]}
      for k, val in vals.items():
        sel_rows.append({"task": task, "ratio": r, "max_data_num": int(dmax), "method": name,
                         "metric": k, "value": val})
      flops, relative = common.method_cost(reporting.STUDY_READS[name], curves, dmax, target)
      cost_rows.append({"task": task, "ratio": r, "max_data_num": int(dmax), "method": name,
                        "flops_per_token": flops, "relative_to_full": relative,
                        "RelAcc": vals["RelAcc"], "PearCorr": vals["PearCorr"]})
      if name in reporting.LAW_NAMES:
        per_model, pooled = common.heldout_rmse(res, curves, dmax, target)
        rmse_rows.append({"task": task, "ratio": r, "max_data_num": int(dmax),
                          "law": reporting.LAW_NAMES[name], "model": "ALL", "rmse": pooled})
        for mi, val in enumerate(per_model):
          rmse_rows.append({"task": task, "ratio": r, "max_data_num": int(dmax),
                            "law": reporting.LAW_NAMES[name], "model": curves.models[mi], "rmse": val})
  return sel_rows, rmse_rows, cost_rows, results


def budgeted_step(cfg, task: str, curves) -> tuple[list[dict], list[dict]]:
  """Budgeted selection (`budgeted.budgeted_selection` with config.selection.budget: its method,
  default LensLLM with a scalar F, and levels z): models are fine-tuned on D = 200 * 2^s in turn
  and dropped once confidently worse; (rows per level z, notes of its NaN PearCorr cells and
  of the degenerate or non-finite fits it read)."""
  target = float(max(cfg.subsets.sizes))
  dmax = target / min(int(r) for r in cfg.selection.ratios)
  options = budgeted.BudgetOptions(cfg.selection.budget.levels, cfg.selection.budget.method, dmax)
  res = budgeted.budgeted_selection(
      curves, options, key=jax.random.key(cfg.selection.seed + 1),
      num_restarts=int(cfg.selection.num_restarts),
      fit_options=fitting.FitOptions(max_steps=int(cfg.selection.max_steps)), target_data_num=target)
  truth = curves.column(target)
  full = budgeted.full_tuning_flops(curves.sizes, target)
  rows = []
  for b in res:
    rows.append({"task": task, "z": b.z, "max_data_num": int(dmax),
                 "chosen": curves.models[b.selection.chosen],
                 "RelAcc": metrics.relative_accuracy(b.selection.chosen, truth),
                 "PearCorr": metrics.pearson_corr(b.selection.feature, truth),
                 "flops_per_token": b.flops, "relative_to_full": b.flops / full,
                 "stopped_at": " ".join(str(int(x)) for x in b.stopped_at)})
  tag = f"Budgeted{cfg.selection.budget.method}"
  notes = [{"dataset": task, "method": tag, "ratio": f"z={b.z:g}", "note": n}
           for b in res for n in common.budgeted_status_notes(b, curves.models)
           + common.score_notes(b.selection, truth)]
  return rows, notes


# ---------------------------------------------------------------------------
# Step 7: report.


def transition_of(curves) -> np.ndarray:
  """[M] first power-phase D of each full curve (AtS test on D > 0, k=3, delta=5;
  a curve with no rejected point is all power phase: its first D)."""
  d = np.asarray(curves.data_sizes)
  pos = d > 0
  log_d = np.log(np.broadcast_to(d[pos], (len(curves.models), int(pos.sum()))))
  with jax.enable_x64(True):
    first, _ = phases.phase_transition(jnp.asarray(log_d),
                                       jnp.asarray(np.log(curves.losses[:, pos])),
                                       published_convention=False)
  return d[pos][np.asarray(first)]


def report_step(cfg, workdir, out: pathlib.Path, all_runs, zoo_models, t_start) -> None:
  out.mkdir(parents=True, exist_ok=True)
  manifest = {r["name"]: r for r in zoo_build.read_jsonl(workdir / "zoo.jsonl")}
  alphas = nlp_alpha(zoo_models)
  target = max(cfg.subsets.sizes)
  (sel_rows, rmse_rows, cost_rows, run_rows, pac_rows, spec_rows, eig_rows, phase_rows,
   budget_rows, notes) = ([] for _ in range(10))
  task_info = {}
  zoo_rows = [{**{k: manifest[m.spec.name][k] for k in ("name", "family", "size",
                                                         "pretrain_steps", "final_train_loss",
                                                         "seconds")},
               "nlp_alpha": float(a)} for m, a in zip(zoo_models, alphas, strict=True)]
  for task in cfg.tasks:
    runs = all_runs[task]
    curves = curve_set(workdir, task, zoo_models, out)
    aux = ntk_aux(cfg, workdir, task, zoo_models)
    spec_rows += [spectrum_row(task, m.spec.name, aux[0][i], aux[1][i], aux[2][i])
                  for i, m in enumerate(zoo_models)]
    eig_rows += eigenpair_rows(task, zoo_models, aux)
    log(f"selection {task}: {len(reporting.ALL_METHODS)} methods x {len(cfg.selection.ratios)} budgets")
    t0 = time.time()
    s, r, c, results = selection_step(cfg, task, curves, aux, alphas)
    log(f"selection {task} done ({time.time() - t0:.1f}s)")
    sel_rows += s
    rmse_rows += r
    cost_rows += c
    truth = curves.column(float(target))
    notes += [{"dataset": task, "method": name, "ratio": ratio, "note": n}
              for ratio, by_method in results.items() for name, res in by_method.items()
              for n in (common.status_notes(res.status, curves.models)
                        + common.score_notes(res, truth))]
    t0 = time.time()
    rows, budget_notes = budgeted_step(cfg, task, curves)
    budget_rows += rows
    notes += budget_notes
    log(f"budgeted selection {task} done ({time.time() - t0:.1f}s)")
    transition = transition_of(curves)
    for i, m in enumerate(zoo_models):
      zoo_rows[i][f"{task}_zero_shot"] = float(curves.losses[i, 0])
      zoo_rows[i][f"{task}_final"] = float(curves.losses[i, -1])
      row = {"task": task, "model": m.spec.name, "transition_D": int(transition[i])}
      at = {"first": min(cfg.subsets.sizes), "transition": int(transition[i]), "last": target}
      for short, get in (("kd", reporting.kernel_distance),
                         ("hess", lambda r: r.get("hessian_top", float("nan"))),
                         ("pac", lambda r: r.get("pac_sum_sqrt", float("nan")))):
        for where, d in at.items():
          row[f"{short}_{where}"] = float(get(runs[(m.spec.name, d)]))
      phase_rows.append(row)
    for (name, d), rec in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
      run_rows.append(run_row(rec))
      for layer in rec.get("pac_layers", []):
        pac_rows.append({"task": task, "model": name, "data_size": d, **layer})
    task_info[task] = {
        "rank_agreement": metrics.spearman_corr(curves.losses[:, 0], curves.losses[:, -1]),
        "best_zero": curves.models[int(np.argmin(curves.losses[:, 0]))],
        "best_final": curves.models[int(np.argmin(curves.losses[:, -1]))],
        "phase_rows": [p for p in phase_rows if p["task"] == task]}
    if not FLAGS.skip_figures:
      reporting.study_figures(cfg, out, task, curves, runs, results, transition)
  reporting.write_csv(out / "zoo.csv", zoo_rows)
  reporting.write_csv(out / "runs.csv", run_rows)
  reporting.write_csv(out / "pac_bayes_layers.csv", pac_rows)
  reporting.write_csv(out / "ntk_spectra.csv", spec_rows)
  reporting.write_csv(out / "ntk_eigenpairs.csv", eig_rows)
  reporting.write_csv(out / "selection.csv", sel_rows)
  reporting.write_csv(out / "rmse.csv", rmse_rows)
  reporting.write_csv(out / "cost.csv", cost_rows)
  reporting.write_csv(out / "budgeted.csv", budget_rows)
  reporting.write_csv(out / "phases.csv", phase_rows)
  if (out / "notes.csv").exists():
    (out / "notes.csv").unlink()
  if notes:  # why a selection or budgeted cell is NaN (none in a clean study)
    common.append_rows(out / "notes.csv", common.NOTES_HEADER, notes)
  (out / "summary.md").write_text(reporting.study_summary_md(
      cfg, zoo_rows, run_rows, task_info, sel_rows, rmse_rows, cost_rows, budget_rows,
      time.time() - t_start, notes=reporting.selection_notes_lines(out)))
  log(f"report: {out}")


# What the study writes in --output_dir; --kernels_only writes only the eigenpairs.
OUTPUTS = ("*.csv", "*.md", "*.png", "wall_time.json")
KERNELS_ONLY_OUTPUTS = ("ntk_eigenpairs.csv",)


def open_output_dir(cfg, out: pathlib.Path, *, kernels_only: bool = False):
  """`rundir.open_output_dir` of the results directory: locked, keyed on the config (the
  study reads no input file: its corpus and zoo are built from the config)."""
  return rundir.open_output_dir(out, config=cfg, inputs={},
                                outputs=KERNELS_ONLY_OUTPUTS if kernels_only else OUTPUTS,
                                overwrite=cfg.overwrite, ignore=("workdir", "output_dir"))


@contextlib.contextmanager
def open_study(cfg, workdir: pathlib.Path, out: pathlib.Path, *, kernels_only: bool = False):
  """The config checked (`common.validate_study_config`), the workdir locked (one study per
  workdir) with its zoo manifest (`zoo_build.bind_zoo_workdir`) and the results directory
  opened (`open_output_dir`), before any work."""
  common.validate_study_config(cfg)
  with (rundir.directory_lock(rundir.prepare_directory(workdir)),
        open_output_dir(cfg, out, kernels_only=kernels_only)):
    zoo_build.bind_zoo_workdir(cfg, workdir, overwrite=cfg.overwrite)
    yield


def main(argv):
  del argv
  cfg = FLAGS.config
  workdir = pathlib.Path(FLAGS.workdir or cfg.workdir)
  out = pathlib.Path(FLAGS.output_dir or cfg.output_dir)
  with open_study(cfg, workdir, out, kernels_only=FLAGS.kernels_only):
    run(cfg, workdir, out)


def run(cfg, workdir: pathlib.Path, out: pathlib.Path) -> None:
  """The zoo, the sweeps and the report (config checked, workdir locked: `open_study`)."""
  t0 = time.time()
  log(f"study preset {cfg.preset}: workdir {workdir}, output {out}")
  corpus, tok, zoo_models = zoo_build.build_zoo(cfg, workdir)
  log(f"zoo ready: {len(zoo_models)} models ({time.time() - t0:.1f}s)")
  if FLAGS.kernels_only:
    kernels_step(cfg, workdir, out, corpus, tok, zoo_models)
    log(f"done in {time.time() - t0:.1f}s")
    return
  all_runs = sweep_step(cfg, workdir, corpus, tok, zoo_models)
  log(f"sweeps done ({time.time() - t0:.1f}s)")
  report_step(cfg, workdir, out, all_runs, zoo_models, t0)
  (out / "wall_time.json").write_text(json.dumps({"preset": cfg.preset,
                                                  "seconds_this_call": time.time() - t0}))
  log(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
