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
import pytest
from jax.flatten_util import ravel_pytree

from helpers import REPO_ROOT
from lensllm_jax import models, training
from lensllm_jax.theory import pac_bayes

pytestmark = pytest.mark.slow  # end-to-end run of the Hessian binary

T = 4  # encoder and decoder length


def _example_hessians(config, params, tokens) -> np.ndarray:
  """[N, P, P] float64: the dense Hessian of `models.seq2seq_loss` on each example
  (encoder: tokens[:, :T], targets: tokens[:, T:]) in ravel_pytree(params) order."""
  flat, unravel = ravel_pytree(params)
  module = models.build(config)

  def example_loss(w, ids, targets):
    return models.seq2seq_loss(module, unravel(w), {"input_ids": ids[None],
                                                    "targets": targets[None]})

  hessians = jax.jit(jax.vmap(jax.hessian(example_loss), (None, 0, 0)))(
      flat, jnp.asarray(tokens[:, :T]), jnp.asarray(tokens[:, T:]))
  return np.asarray(hessians, np.float64)


def test_hessian_spectrum_of_a_saved_t5_matches_the_dense_hessian(tmp_path):
  from lensllm_jax.training import sweep as finetune_sweep

  config = models.EncoderDecoderConfig(arch="t5", vocab_size=11, d_model=8, n_layers=1,
                                       n_heads=2, d_ff=8, relative_buckets=4,
                                       relative_max_distance=8)
  # Two random points of the model's parameter shapes (no compiled initialisation):
  # the "pre-trained" w0 and the "fine-tuned" w_hat where the Hessian is taken.
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.PRNGKey(0)))
  params0 = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float32), shapes)
  params1 = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(0, 0.3, p.shape), jnp.float32),
                         params0)
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
      num_examples=2, batch_size=1, seq_len=T, seed=0, **{
          "lanczos.k": 2, "lanczos.iters": 40, "hutchinson.probes": 8, "slq.probes": 1,
          "slq.iters": 4, "pac_bayes.iters": 3})
  log = tmp_path / "hessian_spectrum.log"
  with open(log, "w") as fh:  # runs while the reference is computed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.hessian_spectrum", f"--workdir={out}",
         "--config=configs/hessian_spectrum.py"] +
        [f"--config.{k}={v}" for k, v in settings.items()],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), stdout=fh,
        stderr=subprocess.STDOUT)

  try:
    per_example = _example_hessians(config, params1, tokens)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
  # The mean loss over the two examples (T target tokens each) has the mean of
  # their Hessians as its Hessian.
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
  v = np.asarray(ravel_pytree(params1)[0] - ravel_pytree(params0)[0], np.float64)
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
