r"""Builds the study's model zoo: stdlib corpus, tokenizer, pre-trained models.

  python -m experiments.build_zoo --config=configs/study.py:full [--workdir=runs/study_full]

Steps (each skipped when its output exists, so a rerun resumes):

  1. corpus.json     the standard-library corpus (lensllm_jax.training.zoo.build_corpus):
                     docstring-free pre-training chunks + task functions
  2. tokenizer.json  byte-level BPE (tokenizers) trained on the pre-training chunks
  3. zoo/<name>/     orbax parameters of each zoo model, pre-trained from a seeded
                     init for its pretrain_steps on the chunks (causal LM);
     zoo.jsonl       one line per finished model: config, params, losses, seconds

The steps are `lensllm_jax.training.zoo_build.build_zoo`, which `experiments.lensllm_study`
runs first; this binary runs them alone.
"""

from __future__ import annotations

import pathlib
import time

from absl import flags, logging

from experiments import common  # also defines --compilation_cache_dir
from lensllm_jax import rundir
from lensllm_jax.training import zoo_build

FLAGS = flags.FLAGS


def define_flags() -> None:
  """--config and --workdir; defined only when the binary runs as a program."""
  common.define_config_file("configs/study.py:tiny",
                            "Study configuration (configs/study.py:tiny or :full).")
  flags.DEFINE_string("workdir", None, "Work directory (default: config.workdir).")


def build(cfg, workdir: pathlib.Path) -> list:
  """The config checked, the workdir locked (one writer) and its zoo manifest bound
  (`zoo_build.bind_zoo_workdir`), then the zoo steps; returns its models."""
  common.validate_study_config(cfg)
  t0 = time.time()
  with rundir.directory_lock(rundir.prepare_directory(workdir)):
    zoo_build.bind_zoo_workdir(cfg, workdir, overwrite=cfg.overwrite)
    _, _, zoo_models = zoo_build.build_zoo(cfg, workdir)
  logging.info("%s", f"zoo of {len(zoo_models)} models in {workdir} ({time.time() - t0:.1f}s)")
  return zoo_models


def main(argv):
  del argv
  build(FLAGS.config, pathlib.Path(FLAGS.workdir or FLAGS.config.workdir))


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
