r"""Fine-tuning sweep: loss curves L(D) for several models over nested subsets.

  python -m experiments.finetune_sweep --config=configs/finetune_tiny.py \
      --workdir=results/finetune_tiny [--config.train.max_steps=100] [--distributed]

For each model of config.models (a preset of lensllm_jax.models, optionally
pre-trained here from a seeded init, or a Hugging Face checkpoint directory)
and each subset size D of config.subsets.sizes, fine-tunes from the
pre-trained weights on the nested subset of D examples with early stopping on
the fixed validation split, and measures the mean per-token loss on the fixed
test split. Writes to --workdir:

  runs.jsonl   one JSON object per (model, D) run, appended as each finishes
               (D = 0 is the zero-shot evaluation): test_loss, best_val_loss,
               best_step, steps, stopped_early, train_tokens, scored_tokens,
               train_flops (model FLOPs of the steps run), flops_6nd, seconds
               (fine-tuning), seconds_train (its train steps), seconds_eval
               (validation and test evaluations), seconds_ntk, wall_seconds
               (the whole run), ntk (kernel distance / spectrum summary) ...
  curves.csv   the public benchmark format (`config name`, `0`, `200`, ...,
               `size`, `family`), rewritten whenever a model's curve is complete
               (lensllm_jax.curves.benchmarks.write_curves; load_curves reads it back)
  ntk/         per-run NTK snapshots on the probe set (npz) and each model's
               pre-trained kernel <model>_pretrained.npz (theta, f0)
  finetuned/   with config.save_finetuned: the fine-tuned parameters of each
               run, finetuned/<model>/<D> (training.save_params)
  models/      <model>.json, each model's config fields (ModelConfig or
               EncoderDecoderConfig, read back by models.config_from_dict: the
               shape and vocabulary of pretrained/<model> and
               finetuned/<model>/<D>; experiments.hessian_spectrum's
               config.model_config)
  manifest.json  the resolved config, the sha256 of the input files (local
               data files, checkpoint directories) and the package version
               (lensllm_jax/rundir.py); .lock: one sweep per workdir
  tokenizer.json, data/, pretrained/, ckpt/ (in-flight runs)

Each run logs its breakdown once its row is written (`sweep.RUN_TIMING`): its whole
wall time = training steps + evaluations (validation and test) + outside (state set-up,
NTK snapshot, the row, checkpoint clean-up); `experiments.bench_sweep_overhead` reads
these lines.

Rerunning skips finished runs (read from runs.jsonl) and resumes an
interrupted run from its orbax checkpoint in ckpt/ (config.checkpoint.enabled:
written asynchronously every config.checkpoint.every_seconds, the last one
kept, so a run shorter than that writes none and, interrupted, is redone);
a row cut by a kill during its append is dropped and the run redone, and a
run's checkpoint is deleted only after its row is durable. A workdir holding
runs of another configuration or other input files is refused with one line
naming the difference (--config.overwrite=True deletes them); a rerun may add
subset sizes or models, or leave models out (`sweep.WORKDIR_MERGE`). A second
sweep on the same workdir is refused at once, naming the first one's pid.
tests/experiments/test_finetune_sweep.py
SIGKILLs a sweep mid-run and checks that the restarted one writes the same files.

Multi-process (--distributed; docs/scale.md): every process runs this program
with the same flags and workdir; the batches are split over the global
device mesh, orbax checkpoints are written and restored by all processes
together, and only process 0 writes runs.jsonl, curves.csv, manifest.json, the
tokenizer, the data files and the NTK snapshots (config.ntk.kernel "exact" or
"sketched"). The run machinery is the library module `lensllm_jax.training.sweep`
(also driven by experiments.select's online selection and by
experiments.lensllm_study for its zoo).
"""

from __future__ import annotations

import pathlib
import time

from absl import flags, logging

from experiments import common  # also defines --compilation_cache_dir
from lensllm_jax import models, training
from lensllm_jax.progress import progress as progress_bar
from lensllm_jax.training import sharding, sweep, textdata

FLAGS = flags.FLAGS


def define_flags() -> None:
  common.define_config_file("configs/finetune_tiny.py",
                            "Sweep configuration (configs/*.py).")
  flags.DEFINE_string("workdir", "results/finetune_sweep", "Output directory.")
  flags.DEFINE_bool("distributed", False,
                    "Call jax.distributed.initialize() (multi-host GPU/TPU).")


# ---------------------------------------------------------------------------


def main(argv):
  del argv
  # Orbax logs every checkpoint step at INFO: keep the progress lines readable.
  logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname)
  sharding.initialize_distributed(FLAGS.distributed)
  run(FLAGS.config, pathlib.Path(FLAGS.workdir))


def run(cfg, workdir: pathlib.Path) -> None:
  """The whole sweep of a config into workdir: checks, lock and manifest, runs, curves.csv."""
  common.validate_sweep_config(cfg)
  with sweep.open_workdir(cfg, workdir, overwrite=cfg.get("overwrite", False)):
    sharding.barrier("workdir checked")
    run_sweep(cfg, workdir)


def run_sweep(cfg, workdir: pathlib.Path) -> None:
  """Every (model, D) run of the config that runs.jsonl lacks, then curves.csv."""
  mesh = sharding.make_mesh() if cfg.data_parallel else None
  tcfg = training.TrainConfig(**cfg.train.to_dict())
  runs = sweep.read_runs(workdir / "runs.jsonl")
  splits = sweep.load_splits(cfg, workdir)
  model_rows = {}
  total = len(cfg.models) * (1 + len(cfg.subsets.sizes))
  t_start, n_new = time.time(), 0

  def progress(rec):
    nonlocal n_new
    n_new += 1
    logging.info("[%d/%d] %s D=%d test loss %.4f (%.1fs; %.1fs/run)", len(runs), total,
                 rec["model"], rec["data_size"], rec["test_loss"], rec["wall_seconds"],
                 (time.time() - t_start) / n_new)

  for spec in progress_bar(cfg.models, desc="sweep models", unit="model"):
    if all((spec.name, d) in runs for d in [0] + list(cfg.subsets.sizes)):
      rec = runs[(spec.name, 0)]
      model_rows[spec.name] = {"size": rec["size"], "family": rec["family"]}
      continue
    started = {}

    def before_pretraining(config, tok, apply_fn, params_like, started=started):
      # Encode the task and compile the fine-tuning and NTK programs in the
      # background while the main thread pre-trains (two compilations at once).
      started["data"] = {k: textdata.encode_examples(v, tok, cfg.max_len,
                                                     encoder_decoder=config.is_encoder_decoder)
                         for k, v in splits.items()}
      started["compiling"] = sweep.start_precompile(config, apply_fn, params_like,
                                                    started["data"], cfg, tcfg, mesh)

    m = sweep.load_model(spec, cfg, workdir, splits, mesh, before_pretraining=before_pretraining)
    model_rows[m.name] = {"size": models.count_params(m.params), "family": m.family}
    sweep.sweep_model(m, started["data"], cfg, tcfg, workdir, runs, mesh=mesh,
                      progress=progress, compiling=started["compiling"])
    n = sweep.write_curve_file(cfg, runs, model_rows, workdir / "curves.csv")
    logging.info("curves.csv: %d complete model rows", n)
  n = sweep.write_curve_file(cfg, runs, model_rows, workdir / "curves.csv")
  logging.info("wrote %s (%d models) and %s in %.1fs", workdir / "curves.csv", n,
               workdir / "runs.jsonl", time.time() - t_start)


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
