r"""Fine-tuning sweep runs: loss curves L(D) of several models over nested subsets.

The run machinery of `experiments.finetune_sweep` (the sweep binary: its
docstring lists the workdir's files), also driven by `experiments.select`
(online selection) and `experiments.lensllm_study` (its zoo):

  load_splits / load_model   the task's fixed splits; a model of config.models
                             (a preset, optionally pre-trained here from a seeded
                             init, or a Hugging Face checkpoint directory)
  sweep_model                fine-tunes one model on the nested subsets of the
                             sizes asked that runs.jsonl lacks, with early
                             stopping on the fixed validation split, and appends
                             one runs.jsonl row per run (D = 0: zero-shot)
  run_one                    one fine-tuning run (orbax checkpoints of a long run,
                             config.checkpoint.every_seconds: a killed run resumes
                             mid-run, a shorter one is redone; deleted by
                             `clear_checkpoint` only after the run's row is durable)
  precompile_model           the fine-tuning and NTK programs of a model shape,
                             compiled once, in the background (start_precompile)
  read_runs / append_run     runs.jsonl (a row cut by a kill is dropped and the
                             run redone)
  open_workdir / bind_workdir  lock and manifest of a workdir (`rundir`): a workdir
                             of another configuration or other input files is
                             refused; it may grow (`WORKDIR_MERGE`)
  write_curve_file           curves.csv in the public format (complete models)

Multi-process (`sharding.initialize_distributed`; docs/scale.md): every
process calls these with the same arguments; only process 0 writes files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import time

import jax
import numpy as np
from absl import logging

from lensllm_jax import errors, models, rundir, xla_workarounds
from lensllm_jax.curves import benchmarks
from lensllm_jax.training import loop, sharding, textdata


@dataclasses.dataclass
class LoadedModel:
  name: str
  family: str
  config: models.ModelConfig
  params: object
  tokenizer: object
  apply_fn: object


# ---------------------------------------------------------------------------
# Step 1: data.


def task_spec(cfg, workdir: pathlib.Path) -> textdata.TaskSpec:
  """The TaskSpec of the config (writing the synthetic files if asked)."""
  common = dict(input_field=cfg.input_field or None, target_field=cfg.target_field,
                prompt=cfg.prompt, target_prefix=cfg.target_prefix)
  if cfg.task == "synthetic":
    path = workdir / "data" / "train.jsonl"
    if not path.exists() and sharding.is_primary():
      path.parent.mkdir(parents=True, exist_ok=True)
      recs = textdata.synthetic_translation_records(cfg.num_synthetic, seed=cfg.split_seed)
      tmp = path.with_suffix(".tmp")
      tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
      os.replace(tmp, path)
    sharding.barrier("synthetic data")
    return textdata.local_task(cfg.name, str(path), **common)
  if cfg.task == "local":
    files = {k: v for k, v in cfg.data_files.to_dict().items() if v}
    return textdata.local_task(cfg.name, files, validation_split=cfg.validation_split or None,
                               test_split=cfg.test_split or None, **common)
  if cfg.task not in textdata.TASKS:
    raise errors.ConfigError(f"config.task={cfg.task!r}: expected 'synthetic', 'local' or one "
                             f"of {sorted(textdata.TASKS)}")
  spec = textdata.TASKS[cfg.task]
  return dataclasses.replace(spec, config=cfg.hub_config or spec.config)


def load_splits(cfg, workdir: pathlib.Path) -> dict[str, list[textdata.Example]]:
  """The task's (source, target) examples per split (`textdata.load_task`).

  The synthetic task's file, JSON lines of string fields written by `task_spec`, is
  read with `json` (checked by `textdata.check_local_files` first): the records
  `datasets` would give, without its import and its cache (a second of a short sweep).
  """
  spec = task_spec(cfg, workdir)
  raw = None
  if cfg.task == "synthetic":
    textdata.check_local_files(spec)
    raw = {"train": [json.loads(line) for line in
                     pathlib.Path(spec.data_files["train"]).read_text().splitlines()]}
  splits = textdata.load_task(spec, num_validation=cfg.num_validation, num_test=cfg.num_test,
                              max_validation=cfg.num_validation, max_test=cfg.num_test,
                              max_train=cfg.get("max_train_rows", 0) or None,
                              seed=cfg.split_seed, cache_dir=str(workdir / "hf_cache"), raw=raw)
  biggest = max(cfg.subsets.sizes)
  if biggest > len(splits["train"]):
    raise errors.ConfigError(f"config.subsets.sizes needs {biggest} train examples, task "
                             f"{spec.name!r} has {len(splits['train'])} in its train pool")
  logging.info("task %s: %s examples", spec.name, {k: len(v) for k, v in splits.items()})
  return splits


def pretraining_texts(cfg) -> list[str]:
  return textdata.synthetic_monolingual_texts(cfg.pretrain_corpus_size, seed=cfg.split_seed + 1)


def preset_tokenizer(cfg, workdir: pathlib.Path, splits):
  """Byte-level BPE trained on the pre-training corpus and train pool (cached;
  process 0 trains and writes it, every process reads the file)."""
  path = workdir / "tokenizer.json"
  if not path.exists() and sharding.is_primary():
    texts = pretraining_texts(cfg) + [s + t for s, t in splits["train"]]
    tok = textdata.train_tokenizer(texts, vocab_size=cfg.tokenizer_vocab)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
  sharding.barrier("tokenizer")
  return models.load_tokenizer(path)


# ---------------------------------------------------------------------------
# Step 2: models.


def load_model(spec, cfg, workdir: pathlib.Path, splits, mesh, *,
               before_pretraining=None) -> LoadedModel:
  """A model of config.models: a HF checkpoint dir, or a preset (+ pre-training).

  before_pretraining: optional fn(config, tokenizer, apply_fn, params) called once
  the model's shape is known, before a preset is pre-trained (e.g. to start
  compiling its fine-tuning programs meanwhile).
  """
  if spec.hf_dir:
    config, params = models.load_hf_checkpoint(spec.hf_dir)
    tok = models.load_tokenizer(spec.hf_dir)
  else:
    if spec.preset not in models.presets:
      raise errors.ConfigError(
          f"config.models[{spec.name!r}]: set hf_dir (a Hugging Face checkpoint directory) "
          f"or preset (one of {sorted(models.presets)}); got preset {spec.preset!r}")
    tok = preset_tokenizer(cfg, workdir, splits)
    overrides = spec.get("overrides", None)
    overrides = overrides.to_dict() if overrides is not None else {}
    config = models.presets[spec.preset].replace(
        vocab_size=tok.get_vocab_size(), max_len=max(cfg.max_len, 8), **overrides)
    params = None
  if config.max_len < cfg.max_len:
    raise errors.ConfigError(f"config.max_len={cfg.max_len}: model {spec.name!r} takes at most "
                             f"{config.max_len} positions")
  source = spec.hf_dir or str(workdir / "tokenizer.json")
  if tok.get_vocab_size() > config.vocab_size:  # ids past the embedding: non-finite losses
    raise errors.CheckpointError(f"{source}: the tokenizer has {tok.get_vocab_size()} tokens, "
                                 f"more than the model's vocab_size {config.vocab_size}")
  apply_fn = loop.causal_lm_apply(models.build(config))
  if before_pretraining is not None:
    like = params if params is not None else jax.eval_shape(
        lambda: models.init_params(config, jax.random.key(spec.init_seed)))
    before_pretraining(config, tok, apply_fn, like)
  if params is None:
    params = pretrained_params(spec, cfg, config, tok, workdir, mesh)
  if sharding.is_primary():
    write_model_config(workdir / "models" / f"{spec.name}.json", config)
  return LoadedModel(spec.name, spec.family, config, params, tok, apply_fn)


def write_model_config(path: pathlib.Path, config) -> None:
  """The model's config (its dataclass fields) as JSON: what reads its saved params back."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(dataclasses.asdict(config), indent=1, sort_keys=True))
  os.replace(tmp, path)


def pretrained_params(spec, cfg, config, tok, workdir, mesh):
  """Seeded init, pre-trained for spec.pretrain_steps steps on the LM corpus (cached)."""
  params = models.init_params(config, jax.random.key(spec.init_seed))
  if not spec.pretrain_steps:
    return params
  path = workdir / "pretrained" / spec.name
  if path.exists():
    return loop.load_params(str(path), params)
  corpus = textdata.encode_examples([("", t) for t in pretraining_texts(cfg)], tok, cfg.max_len,
                                   encoder_decoder=config.is_encoder_decoder)
  pcfg = loop.TrainConfig(max_steps=spec.pretrain_steps, **cfg.pretrain.to_dict())
  t0 = time.time()
  params, losses = loop.pretrain(loop.causal_lm_apply(models.build(config)), params,
                                     corpus, pcfg, mesh=mesh)
  logging.info("pre-trained %s: %d steps, loss %.3f -> %.3f (%.1fs)", spec.name,
               spec.pretrain_steps, losses[0], losses[-1], time.time() - t0)
  loop.save_params(str(path), params)
  return params


# ---------------------------------------------------------------------------
# Step 3: runs.


def read_runs(path: pathlib.Path) -> dict[tuple[str, int], dict]:
  """{(model, D): record} of runs.jsonl (`rundir.read_json_lines`: a partial last row of a
  killed process is dropped, removed from the file on process 0, and its run redone)."""
  recs = rundir.read_json_lines(path, truncate=sharding.is_primary(), redo="the run")
  return {(rec["model"], int(rec["data_size"])): rec for rec in recs}


def append_run(path: pathlib.Path, rec: dict) -> None:
  """Appends one JSON line (process 0 only), in one write and synced to disk."""
  if sharding.is_primary():
    rundir.append_json_line(path, rec)


NTK_KERNELS = ("exact", "sketched")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """Which empirical NTK a snapshot computes (the kernel fields of config.ntk).

  Attributes:
    kernel: "exact" (`ntk.make_ntk_fn`; with block_size > 0 assembled from
      blocks whose pairs are sharded over all devices of all processes,
      `ntk.make_blocked_ntk_fn(devices=jax.devices())`) or "sketched"
      (`ntk.make_sketched_ntk_fn`: count sketch of sketch_dim directions,
      seeded; unbiased, memory O(n k + block)).
    block_size: examples per kernel block (0: the exact kernel in one block).
    sketch_dim, sketch_seed: the sketched kernel's directions and seed.
  """
  kernel: str = "exact"
  block_size: int = 0
  sketch_dim: int = 1024
  sketch_seed: int = 0

  def __post_init__(self):
    if self.kernel not in NTK_KERNELS:
      raise ValueError(f"config.ntk.kernel={self.kernel!r}: expected one of {NTK_KERNELS}")

  @classmethod
  def from_config(cls, ntk_config) -> KernelOptions:
    """The options config.ntk sets (the others keep their defaults)."""
    return cls(**{f.name: ntk_config[f.name] for f in dataclasses.fields(cls)
                  if f.name in ntk_config})


@functools.cache
def _ntk_fns(config: models.ModelConfig, output: str, options: KernelOptions | None = None):
  """(kernel fn, jitted output fn) of one model shape: compiled once per shape, not per model
  (the kernel of `options`, default the exact one in one block)."""
  from lensllm_jax.theory import ntk

  options = options or KernelOptions()
  apply_fn = ntk.lm_output_fn(models.build(config), output)
  if options.kernel == "exact":
    fn = ntk.make_ntk_fn(apply_fn)
    if options.block_size:
      fn = ntk.make_blocked_ntk_fn(fn, block_size=options.block_size, devices=jax.devices(),
                                   pairs_per_call=1)
  else:
    fn = ntk.make_sketched_ntk_fn(apply_fn, sketch_dim=options.sketch_dim,
                                  key=jax.random.key(options.sketch_seed),
                                  block_size=options.block_size or None)
  return fn, xla_workarounds.jit(apply_fn, program="ntk_output")


class NTKSnapshot:
  """Empirical NTK of the per-example output (`ntk.lm_output_fn`) on a probe set.

  The probe inputs carry the task's loss mask, so "log_likelihood" is the mean
  log-likelihood of the scored (target) tokens: the quantity fine-tuning moves.
  The pre-trained kernel Theta_0 [n, n] and outputs f_0 [n] are cached in
  `pretrained_path` (theta, f0; float64), which also feeds F(Theta, t).
  `options` (`KernelOptions`, from config.ntk) choose the exact (blocked over
  all devices) or the sketched kernel. With several processes the parameters are gathered to a host
  copy, the block pairs are shared by all devices of all processes, every
  process gets the whole kernel, and process 0 writes the files.
  """

  def __init__(self, m: LoadedModel, probe: textdata.TokenizedData, output: str,
               pretrained_path: pathlib.Path, options: KernelOptions | None = None):
    from lensllm_jax.theory import ntk

    self._ntk = ntk
    self.fn, self.out_fn = _ntk_fns(m.config, output, options)
    self.x = probe_inputs(probe, m.config)
    if pretrained_path.exists():
      with np.load(pretrained_path) as z:
        self.theta0, self.f0 = z["theta"], z["f0"]
    else:
      params = sharding.host_copy(m.params)
      self.theta0 = np.asarray(sharding.host_copy(self.fn(params, self.x)), np.float64)
      self.f0 = np.asarray(self.out_fn(params, self.x), np.float64)
      if sharding.is_primary():
        pretrained_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = pretrained_path.with_suffix(".tmp.npz")
        np.savez(tmp, theta=self.theta0, f0=self.f0)
        os.replace(tmp, pretrained_path)
    self._ntk.kernel_distance(self.theta0, self.theta0)  # compiled here, not in the first run

  def record(self, params, path: pathlib.Path) -> dict:
    params = sharding.host_copy(params)
    theta = np.asarray(sharding.host_copy(self.fn(params, self.x)), np.float64)
    f1 = np.asarray(self.out_fn(params, self.x), np.float64)
    if sharding.is_primary():
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(".tmp.npz")
      np.savez(tmp, theta_pretrained=self.theta0, theta_finetuned=theta,
               f_pretrained=self.f0, f_finetuned=f1)
      os.replace(tmp, path)
    eig0 = np.linalg.eigvalsh(self.theta0)[::-1]
    eig1 = np.linalg.eigvalsh(theta)[::-1]
    return {"kernel_distance": float(self._ntk.kernel_distance(self.theta0, theta)),
            "trace": float(np.trace(theta)), "top_eigvals_pretrained": eig0[:3].tolist(),
            "top_eigvals_finetuned": eig1[:3].tolist(), "file": str(path)}


def step_budget(cfg, d: int) -> int | None:
  """Step budget of the run on D examples, or None (train.max_steps, early stopping only).

  With config.step_budget.epochs > 0: clip(ceil(epochs D / batch), min_steps,
  train.max_steps), rounded up to a multiple of train.eval_every, so that small
  subsets are not over-trained and the last step is evaluated. The learning-rate
  schedule is that of train.max_steps for every D (one compiled step for the
  sweep); use end_lr_fraction=1 for a schedule that does not depend on D.
  """
  budget = cfg.get("step_budget", None)
  if budget is None or not budget.epochs:
    return None
  tr = cfg.train
  steps = min(max(math.ceil(budget.epochs * d / tr.batch_size), budget.min_steps), tr.max_steps)
  return int(math.ceil(steps / tr.eval_every) * tr.eval_every)


def run_one(m: LoadedModel, data: dict, d: int, cfg, tcfg, workdir, mesh, snapshot):
  """Fine-tunes on the nested subset of size d.

  Returns:
    (run record, fine-tuned parameters (best validation step), subset indices [d]).
  """
  idx = textdata.nested_subset(data["train"].num_examples, d, seed=cfg.subsets.seed)
  checkpoint = cfg.get("checkpoint") or {}  # a config without the block checkpoints runs
  ckpt = workdir / "ckpt" / m.name / str(d) if checkpoint.get("enabled", True) else None
  budget = step_budget(cfg, d)

  def log(r):
    logging.info("  %s D=%d step %d / %d val %.4f (best %.4f @ %d) train %.4f", m.name, d,
                 r["step"], budget or tcfg.max_steps, r["val_loss"], r["best_val_loss"],
                 r["best_step"], r["train_loss"])

  res = loop.finetune(m.apply_fn, m.params, data["train"].take(idx), data["validation"],
                          tcfg, checkpoint_dir=str(ckpt) if ckpt else None,
                          checkpoint_every_s=checkpoint.get("every_seconds", 0.0),
                          stop_after_steps=budget, mesh=mesh, log_fn=log)
  eval_step = loop.cached_eval_step(m.apply_fn)
  t0 = time.perf_counter()
  test_loss = loop.evaluate(eval_step, res.params, data["test"], tcfg.eval_batch_size,
                                mesh=mesh)
  seconds_test = time.perf_counter() - t0
  max_len = data["train"].input_ids.shape[1]
  positions = res.steps * tcfg.batch_size * max_len
  rec = dict(
      test_loss=test_loss, best_val_loss=res.best_val_loss,
      initial_val_loss=res.initial_val_loss, best_step=res.best_step, steps=res.steps,
      step_budget=budget, stopped_early=res.stopped_early, train_tokens=res.train_tokens,
      scored_tokens=res.scored_tokens,
      train_flops=models.flops_per_token(m.config, max_len) * positions,
      flops_6nd=6.0 * models.count_params(m.params) * res.train_tokens,
      seconds=res.seconds, seconds_train=res.seconds_train,
      seconds_eval=res.seconds_eval + seconds_test, history=res.history)
  if cfg.get("save_finetuned", False):
    path = workdir / "finetuned" / m.name / str(d)
    if sharding.is_primary():
      shutil.rmtree(path, ignore_errors=True)  # a partial save of an interrupted run
    sharding.barrier("finetuned params cleared")
    loop.save_params(str(path), res.params)  # collective: every process calls it
    rec["finetuned_params"] = str(path)
  if snapshot is not None:
    t0 = time.perf_counter()
    rec["ntk"] = snapshot.record(res.params, workdir / "ntk" / f"{m.name}_D{d}.npz")
    rec["seconds_ntk"] = time.perf_counter() - t0
  return rec, res.params, idx


def clear_checkpoint(workdir: pathlib.Path, model: str, d: int) -> None:
  """Deletes the run's orbax checkpoints; called only once its row is durable in runs.jsonl
  (a failure in between leaves a run that resumes from its last checkpoint)."""
  ckpt = workdir / "ckpt" / model / str(d)
  sharding.barrier("run recorded")  # no process still reads the checkpoint
  if sharding.is_primary():
    shutil.rmtree(ckpt, ignore_errors=True)


def probe_inputs(probe: textdata.TokenizedData, config) -> dict:
  """The NTK output function's inputs of the probe examples (numpy arrays)."""
  x = {"input_ids": probe.input_ids, "attention_mask": probe.attention_mask,
       "loss_mask": probe.loss_mask}
  if config.is_encoder_decoder:  # the decoder reads the targets
    x["targets"] = probe.targets
  return x


def _probe_and_options(data: dict, cfg) -> tuple[textdata.TokenizedData, KernelOptions]:
  """The probe set (the first config.ntk.num_probe test examples) and the kernel options."""
  probe = data["test"].take(np.arange(min(cfg.ntk.num_probe, data["test"].num_examples)))
  return probe, KernelOptions.from_config(cfg.ntk)


def pretrained_snapshot(m: LoadedModel, data: dict, cfg, workdir: pathlib.Path):
  """The `NTKSnapshot` of model m on the task's probe set (the first config.ntk.num_probe
  test examples); its pre-trained kernel is computed once and cached in
  workdir/ntk/<model>_pretrained.npz. None when config.ntk.num_probe is 0."""
  if not cfg.ntk.num_probe:
    return None
  probe, options = _probe_and_options(data, cfg)
  return NTKSnapshot(m, probe, cfg.ntk.output, workdir / "ntk" / f"{m.name}_pretrained.npz",
                     options)


_PRECOMPILED: set = set()  # precompile_model's calls done in this process


def precompile_model(config, apply_fn, params, data: dict, cfg, tcfg: loop.TrainConfig,
                     mesh=None, ntk: bool = True) -> None:
  """Compiles a model's fine-tuning programs (`loop.precompile`) and its NTK snapshot
  programs for the probe set (unless ntk=False), from shapes only: once per model shape
  and process (a repeated call returns at once), before its runs.

  Thread-safe; `start_precompile` runs it in the background while the main thread
  pre-trains or computes the pre-trained kernel, so the two cores compile in parallel.
  """
  from lensllm_jax.theory import ntk as ntk_lib

  key = (apply_fn, tcfg, mesh, ntk, data["train"].input_ids.shape[1:],
         data["test"].input_ids.shape[1:])
  if key in _PRECOMPILED:
    return
  abstract = jax.eval_shape(lambda p: p, params)
  loop.precompile(apply_fn, tcfg, abstract, data["train"], mesh=mesh)
  if ntk and cfg.ntk.num_probe:
    probe, options = _probe_and_options(data, cfg)
    fn, out_fn = _ntk_fns(config, cfg.ntk.output, options)
    x = probe_inputs(probe, config)
    if hasattr(fn, "precompile"):  # the blocked kernel: a Python function around a jit
      fn.precompile(abstract, x)
    else:
      fn.lower(abstract, x).compile()
    out_fn.lower(abstract, x).compile()
    n, *out = jax.eval_shape(out_fn, abstract, x).shape
    theta = np.ones((n, n, *(d for d in out for _ in range(2))))  # [n1, n2, d1, d1', ...]
    ntk_lib.kernel_distance(theta, theta)  # op by op: each op's program compiled here
  _PRECOMPILED.add(key)


def start_precompile(*args, **kwargs) -> concurrent.futures.Future:
  """`precompile_model(*args, **kwargs)` in a background thread; .result() waits for it."""
  pool = concurrent.futures.ThreadPoolExecutor(1)
  future = pool.submit(precompile_model, *args, **kwargs)
  pool.shutdown(wait=False)
  return future


# The breakdown of each run that `sweep_model` logs once the run's row is durable and its
# checkpoint removed: the wall time of all the per-run work = its training steps + its
# evaluations (validation and test) + the rest ("outside": state set-up, subset, NTK
# snapshot, the runs.jsonl row, checkpoint clean-up). Read back by experiments.bench_sweep_overhead.
RUN_TIMING = ("%s D=%d: %.3f s = steps %.3f + eval %.3f + outside %.3f "
              "(NTK snapshot %.3f, row + clean-up %.3f)")
RUN_TIMING_PATTERN = (r"(?P<model>\S+) D=(?P<d>\d+): (?P<total>[\d.]+) s = steps (?P<steps>[\d.]+) "
                      r"\+ eval (?P<eval>[\d.]+) \+ outside (?P<outside>[\d.]+) "
                      r"\(NTK snapshot (?P<ntk>[\d.]+), row \+ clean-up (?P<bookkeeping>[\d.]+)\)")


def sweep_model(m: LoadedModel, data: dict, cfg, tcfg: loop.TrainConfig,
                workdir: pathlib.Path, runs: dict, *, mesh=None, after_run=None,
                progress=None, sizes=None,
                compiling: concurrent.futures.Future | None = None) -> None:
  """Runs every D of `sizes` (default [0] + config.subsets.sizes) that `runs` lacks for m.

  Each record is appended to workdir/runs.jsonl as soon as its run finishes and
  added to `runs` ({(model, D): record}).

  Args:
    m: the model and its pre-trained parameters.
    data: {"train", "validation", "test"} -> TokenizedData (the task, tokenised).
    cfg: the sweep configuration (subsets.sizes, subsets.seed, name, ntk, ...).
    tcfg: the fine-tuning hyper-parameters (one TrainConfig for every D).
    after_run: optional fn(params, d, subset_indices) -> dict of extra fields for
      the record of a fine-tuning run (e.g. Hessian quantities of the fine-tuned
      weights).
    progress: optional fn(record) called after each run (default: a log line).
    sizes: the data sizes to run (experiments.select runs one size per round).
    compiling: the `start_precompile` of this model if already started (default:
      started here, running while the pre-trained kernel is computed).
  """
  sizes = [0] + list(cfg.subsets.sizes) if sizes is None else [int(d) for d in sizes]
  todo = [d for d in sizes if (m.name, d) not in runs]
  if not todo:
    return
  size = models.count_params(m.params)
  # (The row keeps its subset_seed column: the committed runs.csv files have it.)
  base = {"model": m.name, "family": m.family, "size": size, "task": cfg.name,
          "max_len": int(data["train"].input_ids.shape[1]), "subset_seed": cfg.subsets.seed}
  if compiling is None and any(todo):  # the snapshot below compiles the NTK meanwhile
    compiling = start_precompile(m.config, m.apply_fn, m.params, data, cfg, tcfg, mesh,
                                 ntk=False)
  elif compiling is not None:
    compiling.result()  # NTK programs included: not compiled twice at once
  snapshot = pretrained_snapshot(m, data, cfg, workdir) if any(todo) else None
  if compiling is not None:
    compiling.result()
  for d in todo:
    t0 = time.perf_counter()
    if d == 0:
      eval_step = loop.cached_eval_step(m.apply_fn)
      rec = {"test_loss": loop.evaluate(eval_step, m.params, data["test"],
                                        tcfg.eval_batch_size, mesh=mesh), "steps": 0}
      seconds_eval = time.perf_counter() - t0
    else:
      rec, params, idx = run_one(m, data, d, cfg, tcfg, workdir, mesh, snapshot)
      seconds_eval = rec.get("seconds_eval", 0.0)
      if after_run is not None:
        rec.update(after_run(params, d, idx))
    rec = {**base, "data_size": d, **rec, "wall_seconds": time.perf_counter() - t0}
    if not math.isfinite(rec["test_loss"]):
      raise FloatingPointError(f"{workdir}: non-finite test loss for {m.name} at D={d}")
    append_run(workdir / "runs.jsonl", rec)  # durable (fsynced) before the checkpoint goes
    if d:
      clear_checkpoint(workdir, m.name, d)
    runs[(m.name, d)] = rec
    total = time.perf_counter() - t0
    steps = rec.get("seconds_train", 0.0)
    logging.info(RUN_TIMING, m.name, d, total, steps, seconds_eval, total - steps - seconds_eval,
                 rec.get("seconds_ntk", 0.0), total - rec["wall_seconds"])
    if progress is not None:
      progress(rec)
    else:
      logging.info("%s D=%d test loss %.4f (%.1fs)", m.name, d, rec["test_loss"],
                   rec["wall_seconds"])


# What a sweep writes in its workdir (removed by config.overwrite=True when the manifest
# differs), and the config keys whose elements are independent runs: a rerun may add sizes
# or models, or leave models out; a model of the same name must keep its spec.
WORKDIR_OUTPUTS = ("runs.jsonl", "curves.csv", "config.json", "tokenizer.json", "data", "ntk",
                   "finetuned", "models", "pretrained", "ckpt", "hf_cache")
WORKDIR_MERGE = {"subsets.sizes": None, "models": lambda spec: spec["name"]}
# Fields that do not change any run's result.
WORKDIR_IGNORE = ("overwrite", "checkpoint")


def sweep_inputs(cfg) -> dict[str, pathlib.Path]:
  """{name: path} of the sweep's input files: local data files and checkpoint directories."""
  inputs = {}
  if cfg.get("task") == "local":
    for split, path in cfg.data_files.to_dict().items():
      if path:
        if not pathlib.Path(path).is_file():
          raise errors.DataError(f"config.data_files.{split}: {path} does not exist"
                                 + (" (a directory)" if pathlib.Path(path).is_dir() else ""))
        inputs[f"data/{split}"] = pathlib.Path(path)
  for spec in cfg.get("models", ()):  # (experiments.lensllm_study's sweeps have no models)
    if spec.hf_dir:
      if not pathlib.Path(spec.hf_dir).is_dir():
        raise errors.CheckpointError(f"config.models[{spec.name!r}].hf_dir: {spec.hf_dir} is "
                                     "not a checkpoint directory")
      inputs[f"checkpoint/{spec.name}"] = pathlib.Path(spec.hf_dir)
  return inputs


def open_workdir(cfg, workdir: pathlib.Path, *, overwrite: bool = False, ignore=(),
                 outputs=()):
  """`rundir.open_output_dir` of a sweep workdir for the whole run (lock + manifest; process
  0 locks and writes).

  ignore / outputs: config keys and output patterns of a caller's own, added to
  `WORKDIR_IGNORE` / `WORKDIR_OUTPUTS` (experiments.select's procedure settings and files).
  """
  return rundir.open_output_dir(workdir, config=cfg, inputs=sweep_inputs(cfg),
                                outputs=(*WORKDIR_OUTPUTS, *outputs), merge=WORKDIR_MERGE,
                                overwrite=overwrite, ignore=(*WORKDIR_IGNORE, *ignore),
                                primary=sharding.is_primary())


def bind_workdir(cfg, workdir: pathlib.Path, *, overwrite: bool = False) -> None:
  """Checks and records the workdir's manifest (`rundir.bind_manifest`, `WORKDIR_MERGE`)
  without taking its lock: for a caller that runs several sweeps inside a directory it
  holds (experiments.lensllm_study). Runs of two configurations are never mixed into one
  curve file; overwrite=True deletes the workdir's runs instead of refusing. A workdir of
  a version before manifests is adopted when `adopt_legacy_workdir` can vouch for it."""
  if sharding.is_primary():
    rundir.prepare_directory(workdir)
    manifest = rundir.make_manifest(cfg, sweep_inputs(cfg), ignore=WORKDIR_IGNORE)
    adopt_legacy_workdir(workdir, manifest)
    rundir.bind_manifest(workdir, manifest, outputs=WORKDIR_OUTPUTS, merge=WORKDIR_MERGE,
                         overwrite=overwrite)
  sharding.barrier("workdir checked")


def adopt_legacy_workdir(workdir: pathlib.Path, manifest: dict) -> bool:
  """Records `manifest` for a workdir made before manifests, when its config.json vouches
  for it; returns whether it did.

  Such a workdir holds config.json, the sweep's whole config (written by every
  earlier version, which refused a rerun whose config.json differed). It is adopted
  when that config equals this one (`WORKDIR_IGNORE` left out) and the sweep reads
  no input file (no local data, no checkpoint directory: config.json records no
  digest of those). Anything else is left to `rundir.bind_manifest`, which refuses
  it naming --config.overwrite=True or a new directory.
  """
  path = workdir / "config.json"
  if rundir.read_manifest(workdir) is not None or not path.is_file() or manifest["inputs"]:
    return False
  try:
    old = rundir.flatten_config(json.loads(path.read_text()), WORKDIR_IGNORE)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return False
  if old != manifest["config"]:
    return False
  rundir.bind_manifest(workdir, manifest, outputs=(), merge=WORKDIR_MERGE)
  logging.info("%s: a workdir made before manifests; its config.json equals this sweep's "
               "config: adopted (manifest.json written)", workdir)
  return True


def write_curve_file(cfg, runs: dict, model_rows: dict, path: pathlib.Path) -> int:
  """Writes the models whose every D (0 and subsets.sizes) is done (process 0 writes);
  returns their count."""
  grid = [0] + list(cfg.subsets.sizes)
  done = [name for name in model_rows if all((name, d) in runs for d in grid)]
  if not done:
    return 0
  curves = benchmarks.CurveSet(
      name=path.stem, source=str(path), models=tuple(done),
      sizes=np.asarray([model_rows[n]["size"] for n in done], np.int64),
      families=tuple(model_rows[n]["family"] for n in done),
      data_sizes=np.asarray(grid, np.float64),
      losses=np.asarray([[runs[(n, d)]["test_loss"] for d in grid] for n in done]))
  if sharding.is_primary():
    benchmarks.write_curves(curves, path)
  return len(done)
