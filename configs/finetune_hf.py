r"""Hugging Face checkpoints fine-tuned on a hub dataset (the GPU + internet path).

Command (download the checkpoints first, e.g. `huggingface-cli download gpt2
--local-dir ckpts/gpt2`; each directory needs config.json, model.safetensors
and tokenizer.json):

  python -m experiments.finetune_sweep \
      --config=configs/finetune_hf.py:gigaword:ckpts/gpt2,ckpts/gpt2-medium \
      --workdir=results/finetune_gigaword

The argument is TASK[:DIR,DIR,...]: a task of lensllm_jax.training.textdata.TASKS
(flan, gigaword, wmt19, wikitext) and the checkpoint directories (model name
= directory name; or set them later with '--config.models[0].hf_dir=...').
The dataset is downloaded by `datasets` into
workdir/hf_cache (offline: point HF_DATASETS_OFFLINE=1 at a filled cache, or
use configs/finetune_tiny.py-style "local" files). Output as in
configs/finetune_tiny.py: curves.csv in the public format with columns 0,
200, ..., 25600 (extend subsets.sizes to 1638400 for the full grid), runs.jsonl
with per-run metadata and FLOPs, ntk/ snapshots.

Expected time: dominated by fine-tuning; a 124M-parameter GPT-2 at
batch 16 x 256 tokens runs a few steps per second on one modern GPU, so each
(model, D) run with early stopping takes minutes. Add --distributed on a
multi-host cluster (jax.distributed.initialize); the batch is split over
all devices of the ("data", "fsdp") mesh.
"""

import os

import ml_collections

from configs import finetune_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Sweep over HF checkpoints; arg = "TASK[:DIR,DIR,...]" (default task "gigaword")."""
  task, _, dirs = (arg or "gigaword").partition(":")
  c = finetune_tiny.get_config()
  c.task = task
  c.name = c.task
  c.max_len = 256
  c.max_train_rows = 2_000_000  # WMT19 zh-en has ~26M rows; the largest D is far below
  c.num_validation = 500
  c.num_test = 1000
  c.subsets.sizes = tuple(200 * 2**k for k in range(8))  # 200 ... 25600
  dirs = [d for d in dirs.split(",") if d] or ["", ""]
  c.models = [
      ml_collections.ConfigDict(dict(
          name=os.path.basename(os.path.normpath(d)) if d else f"model{i}", family="hf",
          preset="", hf_dir=d, init_seed=0, pretrain_steps=0))
      for i, d in enumerate(dirs)]
  c.train = ml_collections.ConfigDict(dict(
      learning_rate=5e-5, warmup_steps=50, end_lr_fraction=0.1, weight_decay=0.01,
      grad_clip=1.0, batch_size=16, grad_accum=1, max_steps=5000, eval_every=100,
      patience=3, min_delta=0.0, eval_batch_size=32, seed=0))
  # kernel "sketched" (count sketch, memory O(num_probe sketch_dim)) for billion-parameter models.
  c.ntk = ml_collections.ConfigDict(dict(num_probe=32, output="log_likelihood", kernel="exact",
                                         block_size=8, sketch_dim=4096, sketch_seed=0))
  return c
