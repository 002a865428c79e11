"""Local stand-ins for hub checkpoints and the torch references the zoo tests share.

`translation_task` writes a jsonl task and trains a tokenizer on it;
`torch_token_log_probs` is the torch side of the LM-loss convention;
`offline_sweep` runs experiments.finetune_sweep on local checkpoint directories
and returns its runs with the test split as the sweep drew it.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from helpers import REPO_ROOT
from lensllm_jax.training import textdata


def translation_task(root: pathlib.Path, num_records: int, vocab_size: int):
  """(train.jsonl path, byte-level BPE tokenizer trained on it) of a synthetic task."""
  records = textdata.synthetic_translation_records(num_records, seed=0)
  train = root / "train.jsonl"
  train.write_text("".join(json.dumps(r) + "\n" for r in records))
  tok = textdata.train_tokenizer([r["src"] + " " + r["tgt"] for r in records],
                                 vocab_size=vocab_size)
  return train, tok


def torch_token_log_probs(model, input_ids, attention_mask, targets):
  """log p(targets[b, t]) [B, T] from a torch causal LM (differentiable; float64 softmax,
  transformers' default positions)."""
  import torch

  logits = model(input_ids=torch.as_tensor(input_ids, dtype=torch.long),
                 attention_mask=torch.as_tensor(attention_mask, dtype=torch.long)).logits
  logp = torch.log_softmax(logits.double(), dim=-1)
  return torch.gather(logp, -1, torch.as_tensor(targets, dtype=torch.long)[..., None])[..., 0]


def offline_sweep(dirs: list, train: pathlib.Path, tok, workdir: pathlib.Path, max_len: int,
                  train_cfg: dict, timeout: float = 900):
  """Runs experiments.finetune_sweep (configs/finetune_hf.py:local:DIRS, one size, 200,
  20 validation and 20 test rows, NTK snapshots off) in a subprocess.

  Returns:
    ({(model, data_size): run record of runs.jsonl}, the test split encoded as the
    sweep encodes it: same config and seed, `textdata.encode_examples`).
  """
  from configs import finetune_hf
  from lensllm_jax.training import sweep

  spec = ",".join(str(d) for d in dirs)
  overrides = dict(max_len=max_len, num_validation=20, num_test=20, **{"subsets.sizes": "(200,)"})
  args = [f"--config=configs/finetune_hf.py:local:{spec}", f"--workdir={workdir}",
          f"--config.data_files.train={train}", "--config.ntk.num_probe=0",
          "--config.checkpoint.enabled=False"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  args += [f"--config.train.{k}={v}" for k, v in train_cfg.items()]
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  proc = subprocess.run([sys.executable, "-m", "experiments.finetune_sweep", *args],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = [json.loads(x) for x in (workdir / "runs.jsonl").read_text().splitlines()]
  cfg = finetune_hf.get_config(f"local:{spec}")
  cfg.data_files.train = str(train)
  cfg.update(dict(max_len=max_len, num_validation=20, num_test=20))
  cfg.subsets.sizes = (200,)
  test = textdata.encode_examples(sweep.load_splits(cfg, workdir)["test"], tok, max_len)
  return {(r["model"], r["data_size"]): r for r in runs}, test
