r"""Fine-tuning sweep: loss curves L(D) for several models over nested subsets.

  python -m experiments.finetune_sweep --config=configs/finetune_tiny.py \
      --workdir=results/finetune_tiny [--config.train.max_steps=100] [--distributed]

For each model of config.models (a preset of lensllm_jax.models, optionally
pre-trained here from a seeded init, or a Hugging Face checkpoint directory)
and each subset size D of config.subset_sizes, fine-tunes from the
pre-trained weights on the nested subset of D examples with early stopping on
the fixed validation split, and measures the mean per-token loss on the fixed
test split. Writes to --workdir:

  runs.jsonl   one JSON object per (model, D) run, appended as each finishes
               (D = 0 is the zero-shot evaluation): test_loss, best_val_loss,
               best_step, steps, stopped_early, train_tokens, scored_tokens,
               train_flops (model FLOPs of the steps run), flops_6nd, seconds,
               ntk (kernel distance / spectrum summary) ...
  curves.csv   the public benchmark format (`config name`, `0`, `200`, ...,
               `size`, `family`), rewritten whenever a model's curve is complete
               (lensllm_jax.benchmarks.write_curves; load_curves reads it back)
  ntk/         per-run NTK snapshots on the probe set (npz)
  config.json, tokenizer.json, data/, pretrained/, ckpt/ (in-flight runs)

Rerunning skips finished runs (read from runs.jsonl) and resumes an
interrupted run from its orbax checkpoint in ckpt/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from lensllm_jax import benchmarks, models, sharding, textdata, training

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune_tiny.py",
                                          "Sweep configuration (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", "results/finetune_sweep", "Output directory.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host GPU/TPU).")


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
    if not path.exists():
      path.parent.mkdir(parents=True, exist_ok=True)
      recs = textdata.synthetic_translation_records(cfg.num_synthetic, seed=cfg.split_seed)
      tmp = path.with_suffix(".tmp")
      tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
      os.replace(tmp, path)
    return textdata.local_task(cfg.name, str(path), **common)
  if cfg.task == "local":
    files = {k: v for k, v in cfg.data_files.to_dict().items() if v}
    return textdata.local_task(cfg.name, files, validation_split=cfg.validation_split or None,
                               test_split=cfg.test_split or None, **common)
  if cfg.task not in textdata.TASKS:
    raise ValueError(f"--config.task={cfg.task!r}: expected 'synthetic', 'local' or one of "
                     f"{sorted(textdata.TASKS)}")
  spec = textdata.TASKS[cfg.task]
  return dataclasses.replace(spec, config=cfg.hub_config or spec.config)


def load_splits(cfg, workdir: pathlib.Path) -> dict[str, list[textdata.Example]]:
  spec = task_spec(cfg, workdir)
  splits = textdata.load_task(spec, num_validation=cfg.num_validation, num_test=cfg.num_test,
                              max_validation=cfg.num_validation, max_test=cfg.num_test,
                              max_train=cfg.get("max_train_rows", 0) or None,
                              seed=cfg.split_seed, cache_dir=str(workdir / "hf_cache"))
  biggest = max(cfg.subset_sizes)
  if biggest > len(splits["train"]):
    raise ValueError(f"--config.subset_sizes needs {biggest} train examples, task "
                     f"{spec.name!r} has {len(splits['train'])}")
  logging.info("task %s: %s examples", spec.name, {k: len(v) for k, v in splits.items()})
  return splits


def pretraining_texts(cfg) -> list[str]:
  return textdata.synthetic_monolingual_texts(cfg.pretrain_corpus_size, seed=cfg.split_seed + 1)


def preset_tokenizer(cfg, workdir: pathlib.Path, splits):
  """Byte-level BPE trained on the pre-training corpus and train pool (cached)."""
  path = workdir / "tokenizer.json"
  if path.exists():
    return models.load_tokenizer(path)
  texts = pretraining_texts(cfg) + [s + t for s, t in splits["train"]]
  tok = textdata.train_tokenizer(texts, vocab_size=cfg.tokenizer_vocab)
  tok.save(str(path))
  return tok


# ---------------------------------------------------------------------------
# Step 2: models.


def load_model(spec, cfg, workdir: pathlib.Path, splits, mesh) -> LoadedModel:
  """A model of config.models: a HF checkpoint dir, or a preset (+ pre-training)."""
  if spec.hf_dir:
    config, params = models.load_hf_checkpoint(spec.hf_dir)
    tok = models.load_tokenizer(spec.hf_dir)
  else:
    if spec.preset not in models.presets:
      raise ValueError(f"model {spec.name!r}: set hf_dir (a Hugging Face checkpoint directory) "
                       f"or preset (one of {sorted(models.presets)}); got preset "
                       f"{spec.preset!r}")
    tok = preset_tokenizer(cfg, workdir, splits)
    overrides = spec.get("overrides", None)
    overrides = overrides.to_dict() if overrides is not None else {}
    config = models.presets[spec.preset].replace(
        vocab_size=tok.get_vocab_size(), max_len=max(cfg.max_len, 8), **overrides)
    params = pretrained_params(spec, cfg, config, tok, workdir, mesh)
  if config.max_len < cfg.max_len:
    raise ValueError(f"model {spec.name!r}: max_len {config.max_len} < --config.max_len")
  apply_fn = training.causal_lm_apply(models.CausalLM(config))
  return LoadedModel(spec.name, spec.family, config, params, tok, apply_fn)


def pretrained_params(spec, cfg, config, tok, workdir, mesh):
  """Seeded init, pre-trained for spec.pretrain_steps steps on the LM corpus (cached)."""
  params = models.init_params(config, jax.random.key(spec.init_seed))
  if not spec.pretrain_steps:
    return params
  path = workdir / "pretrained" / spec.name
  if path.exists():
    return training.load_params(str(path), params)
  corpus = textdata.encode_examples([("", t) for t in pretraining_texts(cfg)], tok, cfg.max_len)
  pcfg = training.TrainConfig(max_steps=spec.pretrain_steps, **cfg.pretrain.to_dict())
  t0 = time.time()
  params, losses = training.pretrain(training.causal_lm_apply(models.CausalLM(config)), params,
                                     corpus, pcfg, mesh=mesh)
  logging.info("pre-trained %s: %d steps, loss %.3f -> %.3f (%.1fs)", spec.name,
               spec.pretrain_steps, losses[0], losses[-1], time.time() - t0)
  training.save_params(str(path), params)
  return params


# ---------------------------------------------------------------------------
# Step 3: runs.


def read_runs(path: pathlib.Path) -> dict[tuple[str, int], dict]:
  runs = {}
  if path.exists():
    for i, line in enumerate(path.read_text().splitlines()):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {i + 1}: not JSON ({e}); delete the line to redo the run") from None
      runs[(rec["model"], int(rec["data_size"]))] = rec
  return runs


def append_run(path: pathlib.Path, rec: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(rec) + "\n")
    f.flush()
    os.fsync(f.fileno())


class NTKSnapshot:
  """Empirical NTK of the per-example mean log-likelihood on a probe set."""

  def __init__(self, m: LoadedModel, probe: textdata.TokenizedData, output: str):
    from lensllm_jax import ntk

    self._ntk = ntk
    self.fn = ntk.make_ntk_fn(ntk.lm_output_fn(models.CausalLM(m.config), output))
    self.out_fn = jax.jit(ntk.lm_output_fn(models.CausalLM(m.config), output))
    self.x = {"input_ids": probe.input_ids, "attention_mask": probe.attention_mask}
    self.theta0 = np.asarray(self.fn(m.params, self.x))
    self.f0 = np.asarray(self.out_fn(m.params, self.x))

  def record(self, params, path: pathlib.Path) -> dict:
    theta = np.asarray(self.fn(params, self.x))
    f1 = np.asarray(self.out_fn(params, self.x))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, theta_pretrained=self.theta0, theta_finetuned=theta,
             f_pretrained=self.f0, f_finetuned=f1)
    eig0 = np.linalg.eigvalsh(self.theta0)[::-1]
    eig1 = np.linalg.eigvalsh(theta)[::-1]
    return {"kernel_distance": float(self._ntk.kernel_distance(self.theta0, theta)),
            "top_eigvals_pretrained": eig0[:3].tolist(),
            "top_eigvals_finetuned": eig1[:3].tolist(), "file": str(path)}


def run_one(m: LoadedModel, data: dict, d: int, cfg, tcfg, workdir, mesh, snapshot) -> dict:
  """Fine-tunes on the nested subset of size d; returns the run record."""
  idx = textdata.nested_subset(data["train"].num_examples, d, seed=cfg.subset_seed)
  ckpt = workdir / "ckpt" / m.name / str(d)

  def log(r):
    logging.info("  %s D=%d step %d val %.4f (best %.4f @ %d) train %.4f", m.name, d,
                 r["step"], r["val_loss"], r["best_val_loss"], r["best_step"], r["train_loss"])

  res = training.finetune(m.apply_fn, m.params, data["train"].take(idx), data["validation"],
                          tcfg, checkpoint_dir=str(ckpt), mesh=mesh, log_fn=log)
  eval_step = training.cached_eval_step(m.apply_fn)
  test_loss = training.evaluate(eval_step, res.params, data["test"], tcfg.eval_batch_size,
                                mesh=mesh)
  positions = res.steps * tcfg.batch_size * cfg.max_len
  rec = dict(
      test_loss=test_loss, best_val_loss=res.best_val_loss,
      initial_val_loss=res.initial_val_loss, best_step=res.best_step, steps=res.steps,
      stopped_early=res.stopped_early, train_tokens=res.train_tokens,
      scored_tokens=res.scored_tokens,
      train_flops=models.flops_per_token(m.config, cfg.max_len) * positions,
      flops_6nd=6.0 * models.count_params(m.params) * res.train_tokens,
      seconds=res.seconds, history=res.history)
  if snapshot is not None:
    rec["ntk"] = snapshot.record(res.params, workdir / "ntk" / f"{m.name}_D{d}.npz")
  shutil.rmtree(ckpt, ignore_errors=True)
  return rec


def write_curve_file(cfg, runs: dict, model_rows: dict, path: pathlib.Path) -> int:
  """Writes the models whose every D (0 and subset_sizes) is done; returns their count."""
  grid = [0] + list(cfg.subset_sizes)
  done = [name for name in model_rows if all((name, d) in runs for d in grid)]
  if not done:
    return 0
  curves = benchmarks.CurveSet(
      name=path.stem, source=str(path), models=tuple(done),
      sizes=np.asarray([model_rows[n]["size"] for n in done], np.int64),
      families=tuple(model_rows[n]["family"] for n in done),
      data_sizes=np.asarray(grid, np.float64),
      losses=np.asarray([[runs[(n, d)]["test_loss"] for d in grid] for n in done]))
  benchmarks.write_curves(curves, path)
  return len(done)


# ---------------------------------------------------------------------------


def main(argv):
  del argv
  # Orbax logs every checkpoint step at INFO: keep the progress lines readable.
  logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname)
  sharding.initialize_distributed(_DISTRIBUTED.value)
  cfg = _CONFIG.value
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh() if cfg.data_parallel else None
  tcfg = training.TrainConfig(**cfg.train.to_dict())
  runs_path = workdir / "runs.jsonl"
  runs = read_runs(runs_path)
  splits = load_splits(cfg, workdir)
  model_rows = {}
  total = len(cfg.models) * (1 + len(cfg.subset_sizes))
  t_start, n_done = time.time(), 0
  for spec in cfg.models:
    todo = [d for d in [0] + list(cfg.subset_sizes) if (spec.name, d) not in runs]
    if not todo:
      rec = runs[(spec.name, 0)]
      model_rows[spec.name] = {"size": rec["size"], "family": rec["family"]}
      continue
    m = load_model(spec, cfg, workdir, splits, mesh)
    data = {k: textdata.encode_examples(v, m.tokenizer, cfg.max_len) for k, v in splits.items()}
    size = models.count_params(m.params)
    model_rows[m.name] = {"size": size, "family": m.family}
    base = {"model": m.name, "family": m.family, "size": size, "task": cfg.name,
            "max_len": cfg.max_len, "subset_seed": cfg.subset_seed}
    snapshot = None
    if cfg.ntk.num_probe:
      snapshot = NTKSnapshot(m, data["test"].take(np.arange(cfg.ntk.num_probe)), cfg.ntk.output)
    for d in todo:
      t0 = time.time()
      if d == 0:
        eval_step = training.cached_eval_step(m.apply_fn)
        rec = {"test_loss": training.evaluate(eval_step, m.params, data["test"],
                                              tcfg.eval_batch_size)}
      else:
        rec = run_one(m, data, d, cfg, tcfg, workdir, mesh, snapshot)
      rec = {**base, "data_size": d, **rec, "wall_seconds": time.time() - t0}
      append_run(runs_path, rec)
      runs[(m.name, d)] = rec
      n_done += 1
      rate = (time.time() - t_start) / n_done
      logging.info("[%d/%d] %s D=%d test loss %.4f (%.1fs; %.1fs/run)", len(runs), total,
                   m.name, d, rec["test_loss"], rec["wall_seconds"], rate)
    n = write_curve_file(cfg, runs, model_rows, workdir / "curves.csv")
    logging.info("curves.csv: %d complete model rows", n)
  n = write_curve_file(cfg, runs, model_rows, workdir / "curves.csv")
  print(f"wrote {workdir / 'curves.csv'} ({n} models) and {runs_path} "
        f"in {time.time() - t_start:.1f}s")


if __name__ == "__main__":
  app.run(main)
