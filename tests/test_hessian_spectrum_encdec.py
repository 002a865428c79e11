"""experiments.hessian_spectrum on saved encoder-decoder checkpoints, against a dense Hessian.

A tiny T5 (about 1.2k parameters) is saved the way experiments.finetune_sweep
saves its models (models/<model>.json via `write_model_config`, orbax params
via `training.save_params`); the binary reads them back with the task tokens
from a .npy file. The reference is the dense Hessian of `models.seq2seq_loss`
(the target-token NLL, per token) on the flattened parameters, built with
jax.hessian as the mean of the two single-example Hessians and diagonalised
in float64 by numpy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from conftest import REPO_ROOT
from jax.flatten_util import ravel_pytree

from lensllm_jax import models, pac_bayes, training

T = 4  # encoder and decoder length


def test_hessian_spectrum_of_a_saved_t5_matches_the_dense_hessian(tmp_path):
  from experiments import finetune_sweep

  config = models.EncoderDecoderConfig(arch="t5", vocab_size=11, d_model=8, n_layers=1,
                                       n_heads=2, d_ff=8, relative_buckets=4,
                                       relative_max_distance=8)
  params0 = models.init_params(config, jax.random.PRNGKey(0))
  noise = jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(params0)))
  params1 = jax.tree.map(lambda p, k: p + 0.3 * jax.random.normal(k, p.shape), params0,
                         jax.tree.unflatten(jax.tree.structure(params0), list(noise)))
  sweep = tmp_path / "sweep"
  finetune_sweep.write_model_config(sweep / "models" / "tiny-t5.json", config)
  training.save_params(str(sweep / "pretrained" / "tiny-t5"), params0)
  training.save_params(str(sweep / "finetuned" / "tiny-t5" / "2"), params1)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 2 * T))
  np.save(tmp_path / "tokens.npy", tokens)

  out = tmp_path / "hessian"
  settings = dict(
      pretrained_ckpt=sweep / "pretrained" / "tiny-t5",
      finetuned_ckpt=sweep / "finetuned" / "tiny-t5" / "2",
      model_config=sweep / "models" / "tiny-t5.json", tokens_npy=tmp_path / "tokens.npy",
      num_examples=2, batch_size=1, seq_len=T, k=2, lanczos_iters=40, hutchinson_probes=8,
      slq_probes=1, slq_iters=4, pac_iters=3, seed=0)
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.hessian_spectrum", f"--workdir={out}",
       "--config=configs/hessian_spectrum.py"] +
      [f"--config.{k}={v}" for k, v in settings.items()],
      cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  # Reference: per-example dense Hessians of the seq2seq loss; the mean loss over
  # the two examples (T target tokens each) has their mean as its Hessian.
  flat1, unravel = ravel_pytree(params1)
  module = models.build(config)

  def example_loss(flat, ids, targets):
    return models.seq2seq_loss(module, unravel(flat), {"input_ids": ids[None],
                                                       "targets": targets[None]})

  per_example = np.asarray(jax.jit(jax.vmap(jax.hessian(example_loss), (None, 0, 0)))(
      flat1, jnp.asarray(tokens[:, :T]), jnp.asarray(tokens[:, T:])), np.float64)
  dense = per_example.mean(0)
  dense = (dense + dense.T) / 2
  exact = np.linalg.eigvalsh(dense)[::-1]
  assert dense.shape == (models.num_params(config),) * 2

  eig = pd.read_csv(out / "eigenvalues.csv")
  scale = abs(exact[0])
  np.testing.assert_allclose(eig["eigenvalue"], exact[:2], rtol=0, atol=1e-3 * scale)
  trace = json.loads((out / "trace.json").read_text())
  assert trace["num_params"] == dense.shape[0]
  # Power iteration converges to the eigenvalue of largest magnitude.
  largest = exact[np.argmax(np.abs(exact))]
  assert abs(trace["power_eigenvalue"] - largest) <= 2e-2 * abs(largest)
  # Hutchinson: unbiased; with a fixed seed its error is within 4 of its standard errors.
  assert abs(trace["trace"] - np.trace(dense)) <= 4 * trace["stderr"]

  # PAC-Bayes table: v_i^T H_{i,x} v_i, maximised over the two examples, per block.
  table = pd.read_csv(out / "pac_bayes.csv")
  v = np.asarray(flat1 - ravel_pytree(params0)[0], np.float64)
  sizes = [leaf.size for leaf in jax.tree.leaves(params1)]
  starts = np.concatenate([[0], np.cumsum(sizes)])
  blocks = pac_bayes.layer_blocks(params1)
  assert list(table["block"]) == list(blocks) and len(blocks) > 2
  for name, ids in blocks.items():
    vb = np.zeros_like(v)
    for i in ids:
      vb[starts[i]:starts[i + 1]] = v[starts[i]:starts[i + 1]]
    row = table[table["block"] == name].iloc[0]
    np.testing.assert_allclose(row["vhv_max"], max(vb @ h @ vb for h in per_example),
                               rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(row["v_norm"], np.linalg.norm(vb), rtol=1e-5)
