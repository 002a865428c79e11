"""Builds the study's model zoo in a workdir: corpus, tokenizer, pre-trained models.

Steps (each skipped when its output exists, so a rerun resumes):

  1. corpus.json     the standard-library corpus (`zoo.build_corpus`): docstring-free
                     pre-training chunks + task functions
  2. tokenizer.json  byte-level BPE (tokenizers) trained on the pre-training chunks
  3. zoo/<name>/     orbax parameters of each zoo model, pre-trained from a seeded
                     init for its pretrain_steps on the chunks (causal LM);
     zoo.jsonl       one line per finished model: config, params, losses, seconds

`build_zoo(cfg, workdir)` runs the three (cfg: a configs/study.py config);
`python -m experiments.build_zoo` runs them alone and `experiments.lensllm_study`
first, before its sweeps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lensllm_jax import models
from lensllm_jax.training import loop, textdata, zoo


def _log(msg: str) -> None:
  logging.info("%s", msg)


def write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def read_jsonl(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  out = []
  for i, line in enumerate(path.read_text().splitlines()):
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {i + 1}: not JSON ({e}); delete the line to redo "
                         "that step") from None
  return out


def append_jsonl(path: pathlib.Path, rec: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(rec) + "\n")
    f.flush()
    os.fsync(f.fileno())


# ---------------------------------------------------------------------------
# Step 1: corpus.


def corpus_step(cfg, workdir: pathlib.Path) -> zoo.Corpus:
  path = workdir / "corpus.json"
  if path.exists():
    return zoo.Corpus.from_json(path.read_text())
  t0 = time.time()
  corpus = zoo.build_corpus(max_files=cfg.corpus.max_files,
                            pretrain_fraction=cfg.corpus.pretrain_fraction,
                            chunk_chars=cfg.corpus.chunk_chars, log_every=200)
  write_atomic(path, corpus.to_json())
  _log(f"corpus: Python {corpus.python}, {len(corpus.pretrain_files)} pre-training files "
      f"({len(corpus.pretrain_texts)} chunks, "
      f"{sum(map(len, corpus.pretrain_texts)) / 1e6:.1f}M chars), {len(corpus.task_files)} "
      f"task files ({len(corpus.functions)} functions), {len(corpus.skipped)} skipped, "
      f"{time.time() - t0:.1f}s")
  return corpus


# ---------------------------------------------------------------------------
# Step 2: tokenizer.


def tokenizer_step(cfg, workdir: pathlib.Path, corpus: zoo.Corpus):
  path = workdir / "tokenizer.json"
  if path.exists():
    return models.load_tokenizer(path)
  tok = textdata.train_tokenizer(list(corpus.pretrain_texts), vocab_size=cfg.tokenizer_vocab)
  tok.save(str(path))
  _log(f"tokenizer: vocab {tok.get_vocab_size()}")
  return tok


# ---------------------------------------------------------------------------
# Step 3: pre-loop.


@functools.cache
def apply_fn_for(config: models.ModelConfig):
  """One apply function per config, so models of equal shape share compilations."""
  return loop.causal_lm_apply(models.build(config))


@dataclasses.dataclass
class ZooModel:
  spec: zoo.ZooSpec
  config: models.ModelConfig
  params: object
  size: int

  @property
  def apply_fn(self):
    return apply_fn_for(self.config)


def model_max_len(cfg) -> int:
  return max([cfg.pretrain_max_len] + [int(v) for v in cfg.task_max_len.to_dict().values()])


def pretrain_step(cfg, workdir: pathlib.Path, corpus: zoo.Corpus, tok) -> list[ZooModel]:
  """Pre-trains (or loads) every zoo model; returns them in config order."""
  specs = zoo.zoo_from_dicts([dict(r) for r in cfg.zoo])
  manifest = workdir / "zoo.jsonl"
  done = {r["name"]: r for r in read_jsonl(manifest)}
  corpus_data = None
  out = []
  for i, spec in enumerate(specs):
    config = zoo.model_config(spec, tok.get_vocab_size(), model_max_len(cfg))
    params = models.init_params(config, jax.random.key(spec.init_seed))
    path = workdir / "zoo" / spec.name
    if spec.name in done and path.exists():
      params = loop.load_params(str(path), params)
    else:
      if corpus_data is None:
        corpus_data = textdata.encode_examples([("", t) for t in corpus.pretrain_texts], tok,
                                               cfg.pretrain_max_len)
      t0 = time.time()
      losses = []
      if spec.pretrain_steps:
        pcfg = loop.TrainConfig(max_steps=spec.pretrain_steps, **cfg.pretrain.to_dict())
        params, losses = loop.pretrain(apply_fn_for(config), params, corpus_data, pcfg)
        params = loop.as_numpy(params)
      if path.exists():
        import shutil
        shutil.rmtree(path)
      loop.save_params(str(path), params)
      sec = time.time() - t0
      tail = losses[-20:] if losses else [float("nan")]
      rec = {"name": spec.name, "family": spec.family, **dataclasses.asdict(spec),
             "size": models.count_params(params), "final_train_loss": float(np.mean(tail)),
             "first_train_loss": float(losses[0]) if losses else float("nan"),
             "seconds": sec, "tokens": spec.pretrain_steps * cfg.pretrain.batch_size
             * cfg.pretrain_max_len}
      append_jsonl(manifest, rec)
      done[spec.name] = rec
      _log(f"zoo [{i + 1}/{len(specs)}] {spec.name}: {rec['size']} params, "
          f"{spec.pretrain_steps} steps, loss {rec['first_train_loss']:.3f} -> "
          f"{rec['final_train_loss']:.3f} ({sec:.1f}s, "
          f"{spec.pretrain_steps / max(sec, 1e-9):.1f} steps/s)")
    # Same array type for every model (pre-trained, loaded or fresh): equal
    # shapes then share every compiled function.
    params = jax.tree.map(jnp.asarray, loop.as_numpy(params))
    out.append(ZooModel(spec, config, params, models.count_params(params)))
  return out


def build_zoo(cfg, workdir: pathlib.Path):
  """Steps 1-3: (corpus, tokenizer, [ZooModel])."""
  workdir.mkdir(parents=True, exist_ok=True)
  corpus = corpus_step(cfg, workdir)
  tok = tokenizer_step(cfg, workdir, corpus)
  return corpus, tok, pretrain_step(cfg, workdir, corpus, tok)
