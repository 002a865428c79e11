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
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lensllm_jax import errors, models, rundir
from lensllm_jax.training import loop, textdata, zoo


def _log(msg: str) -> None:
  logging.info("%s", msg)


def write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def read_jsonl(path: pathlib.Path) -> list[dict]:
  """Records of zoo.jsonl (`rundir.read_json_lines`: a cut last row is dropped, its model
  pre-trained again)."""
  return rundir.read_json_lines(path, redo="that step")


def append_jsonl(path: pathlib.Path, rec: dict) -> None:
  rundir.append_json_line(path, rec)


# ---------------------------------------------------------------------------
# Step 1: corpus.


def corpus_step(cfg, workdir: pathlib.Path) -> zoo.Corpus:
  path = workdir / "corpus.json"
  if path.exists():
    try:
      return zoo.Corpus.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as e:  # a cut or foreign corpus.json
      raise errors.WorkdirError(f"{path}: not a corpus of build_zoo ({type(e).__name__}: {e}); "
                                "delete it to rebuild the corpus") from None
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


# What the corpus, tokenizer and zoo of a workdir are made of (config fields), and the files.
_ZOO_FIELDS = ("corpus", "tokenizer_vocab", "pretrain_max_len", "task_max_len", "zoo", "pretrain")
_ZOO_OUTPUTS = ("corpus.json", "tokenizer.json", "zoo.jsonl", "zoo")
ZOO_MANIFEST = "manifest.zoo.json"


def bind_zoo_workdir(cfg, workdir: pathlib.Path, *, overwrite: bool = False) -> None:
  """Checks and records what the workdir's corpus, tokenizer and zoo are made of (the config's
  _ZOO_FIELDS, `rundir.bind_manifest`; models may be added to the zoo): a rerun with another
  corpus, vocabulary, length or model spec is refused, overwrite=True rebuilds them. Call
  with the workdir's lock held. A workdir made before this manifest is adopted when its
  zoo.jsonl records exactly the config's specs of the models it holds (its corpus settings
  are not recorded there and are taken on trust)."""
  manifest = rundir.make_manifest({k: cfg[k] for k in _ZOO_FIELDS}, {})
  records = workdir / "zoo.jsonl"
  if rundir.read_manifest(workdir, ZOO_MANIFEST) is None and records.exists():
    specs = {s.name: dataclasses.asdict(s) for s in zoo.zoo_from_dicts([dict(r) for r in cfg.zoo])}
    done = read_jsonl(records)
    if all(r.get("name") in specs and all(r.get(k) == v for k, v in specs[r["name"]].items())
           for r in done):
      rundir.bind_manifest(workdir, manifest, outputs=(), name=ZOO_MANIFEST)  # adopted
  rundir.bind_manifest(workdir, manifest, outputs=_ZOO_OUTPUTS, overwrite=overwrite,
                       merge={"zoo": lambda spec: spec["name"]}, name=ZOO_MANIFEST)


def build_zoo(cfg, workdir: pathlib.Path):
  """Steps 1-3: (corpus, tokenizer, [ZooModel])."""
  workdir.mkdir(parents=True, exist_ok=True)
  corpus = corpus_step(cfg, workdir)
  tok = tokenizer_step(cfg, workdir, corpus)
  return corpus, tok, pretrain_step(cfg, workdir, corpus, tok)
