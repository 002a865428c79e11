"""OPT and Phi downstream: NTK outputs and kernel, the Hessian loss, NLPMetrics, the sweep.

Every number is checked against PyTorch (transformers' OPTForCausalLM and
PhiForCausalLM, CPU): the models are tiny random checkpoints saved locally with
a tokenizer.json trained here, so nothing is downloaded.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import hessian_common
from helpers import import_torch_and_transformers, local_hf
from lensllm_jax import models
from lensllm_jax.theory import nlp_metrics, ntk
from lensllm_jax.training import textdata

pytestmark = pytest.mark.torch
torch, transformers = import_torch_and_transformers()

MAX_LEN = 24
NUM_RECORDS = 240  # 200 train (the one fine-tuning size) + 20 validation + 20 test


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  """A local jsonl translation task and a byte-level BPE tokenizer trained on it."""
  return local_hf.translation_task(tmp_path_factory.mktemp("task"), NUM_RECORDS, 400)


def _save(root, name, model, tok):
  path = root / name
  model.save_pretrained(path, safe_serialization=True)
  tok.save(str(path / "tokenizer.json"))
  return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, task):
  """{"opt": (dir, torch model), "phi": (dir, torch model)}: OPT-350m's layout (post-LN,
  project_in/out) and Phi's (parallel blocks, partial rotary), vocab of the tokenizer."""
  _, tok = task
  vocab = tok.get_vocab_size()
  root = tmp_path_factory.mktemp("ckpts")
  torch.manual_seed(0)
  opt = transformers.OPTForCausalLM(transformers.OPTConfig(
      vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
      max_position_embeddings=32, word_embed_proj_dim=16, do_layer_norm_before=False,
      pad_token_id=0, bos_token_id=1, eos_token_id=1, attn_implementation="eager")).eval()
  phi = transformers.PhiForCausalLM(transformers.PhiConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, max_position_embeddings=32, bos_token_id=1, eos_token_id=1,
      attn_implementation="eager")).eval()
  return {"opt": (_save(root, "opt", opt, tok), opt), "phi": (_save(root, "phi", phi, tok), phi)}


def _torch_sequence_ll(model, data):
  """Per-sequence mean target-token log-likelihood (the "log_likelihood" NTK output)."""
  lp = local_hf.torch_token_log_probs(model, data.input_ids, data.attention_mask, data.targets)
  m = torch.as_tensor(data.loss_mask, dtype=torch.float64)
  return (lp * m).sum(1) / m.sum(1).clamp(min=1)


@pytest.mark.parametrize("arch", ["opt", "phi"])
def test_ntk_outputs_and_kernel_match_torch(arch, checkpoints, task):
  """lm_output_fn and the empirical NTK J J^T, with J from torch autograd."""
  path, hf_model = checkpoints[arch]
  config, params = models.load_hf_checkpoint(path)
  train, tok = task
  spec = textdata.local_task("t", str(train), input_field="src", target_field="tgt",
                             prompt="{input} =>", target_prefix=" ")
  examples = textdata.format_split(spec, [json.loads(x) for x in
                                          train.read_text().splitlines()[:3]])
  data = textdata.encode_examples(examples, tok, MAX_LEN)
  assert not data.attention_mask.all()  # right padding present
  x = {"input_ids": jnp.asarray(data.input_ids),
       "attention_mask": jnp.asarray(data.attention_mask),
       "loss_mask": jnp.asarray(data.loss_mask)}
  apply_fn = ntk.lm_output_fn(models.build(config), "log_likelihood")
  theta = np.asarray(ntk.make_ntk_fn(apply_fn)(params, x), np.float64)
  ours = np.asarray(apply_fn(params, x))

  ll = _torch_sequence_ll(hf_model, data)
  rows = []
  for i in range(len(ll)):
    grads = torch.autograd.grad(ll[i], list(hf_model.parameters()), retain_graph=True)
    rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
  jac = np.stack(rows)
  np.testing.assert_allclose(ours, ll.detach().numpy(), atol=1e-5)
  ref = jac @ jac.T
  np.testing.assert_allclose(theta, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("arch", ["opt", "phi"])
def test_hessian_loss_and_gradient_match_torch(arch, checkpoints):
  """The binaries' LM loss (experiments/hessian_common.py) and its gradient, whose
  torch counterpart is mapped to our layout by the (logit-tested) converter."""
  path, hf_model = checkpoints[arch]
  config, params = models.load_hf_checkpoint(path)
  batch = hessian_common.markov_sequences(config.vocab_size, 3, 10, chain_seed=0, seed=1)
  loss_fn = hessian_common.lm_loss_fn(models.build(config))
  loss, grads = jax.value_and_grad(loss_fn)(params, {k: jnp.asarray(v) for k, v in batch.items()})

  hf_model.zero_grad()
  lp = local_hf.torch_token_log_probs(hf_model, batch["input_ids"],
                                      np.ones_like(batch["input_ids"]), batch["targets"])
  m = torch.as_tensor(batch["loss_mask"], dtype=torch.float64)
  ref = -((lp * m).sum(1) / m.sum(1)).mean()
  ref.backward()
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
  torch_grads = {n: p.grad.numpy() for n, p in hf_model.named_parameters()}
  convert = {"opt": models.convert_opt_weights, "phi": models.convert_phi_weights}[arch]
  ref_grads = convert(torch_grads, config)
  pad = hf_model.config.pad_token_id
  if pad is not None:
    # torch's nn.Embedding(padding_idx) drops the lookup gradient of the pad row; ours
    # keeps it. (In real batches the pad id sits only at masked positions: no gradient.)
    assert (batch["input_ids"] == pad).any()
    lookup_free = grads["embed_tokens"]["embedding"].at[pad].set(
        ref_grads["embed_tokens"]["embedding"][pad])
    grads = {**grads, "embed_tokens": {"embedding": lookup_free}}
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale),
      grads, ref_grads)


@pytest.mark.parametrize("arch", ["opt", "phi"])
def test_nlp_metrics_analyse_every_linear_layer(arch, checkpoints):
  """NLPMetrics sees exactly torch's nn.Linear weights (transposed), with the alphas of
  power-law fits to their own eigenvalues."""
  path, hf_model = checkpoints[arch]
  _, params = models.load_hf_checkpoint(path)
  result = nlp_metrics.nlp_metrics(params, min_tail=5)
  linear = [m.weight.detach().numpy() for m in hf_model.modules()
            if isinstance(m, torch.nn.Linear) and m.weight is not hf_model.get_input_embeddings()
            .weight]
  assert len(result.alphas) == len(linear)
  ours = sorted(result.alphas.values())
  theirs = sorted(nlp_metrics.fit_power_law(
      nlp_metrics.empirical_spectral_density(w.T.astype(np.float64)), min_tail=5).alpha
      for w in linear)
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)
  assert np.isfinite(result.mean_alpha)


@pytest.mark.slow
def test_finetune_sweep_offline(checkpoints, task, tmp_path):
  """experiments.finetune_sweep on the local OPT and Phi checkpoints and the local task:
  the zero-shot test loss equals torch's, sizes equal torch's parameter counts, and
  fine-tuning on 200 examples lowers the test loss. (The NTK snapshots are off: the
  kernel of these models is checked against torch above.)"""
  train, tok = task
  train_cfg = dict(max_steps=6, eval_every=3, batch_size=8, eval_batch_size=20,
                   learning_rate=3e-3, warmup_steps=0)
  by_key, test = local_hf.offline_sweep([checkpoints[a][0] for a in ("opt", "phi")], train,
                                        tok, tmp_path, MAX_LEN, train_cfg, timeout=600)
  assert set(by_key) == {(a, d) for a in ("opt", "phi") for d in (0, 200)}
  for arch in ("opt", "phi"):
    hf_model = checkpoints[arch][1]
    with torch.no_grad():
      lp = local_hf.torch_token_log_probs(hf_model, test.input_ids, test.attention_mask,
                                          test.targets)
      nll = float(-(lp * torch.as_tensor(test.loss_mask)).sum() / test.loss_mask.sum())
    zero_shot = by_key[(arch, 0)]
    assert zero_shot["test_loss"] == pytest.approx(nll, rel=1e-5)
    assert zero_shot["size"] == sum(p.numel() for p in hf_model.parameters())
    tuned = by_key[(arch, 200)]
    assert tuned["steps"] > 0 and tuned["test_loss"] < zero_shot["test_loss"]
    assert tuned["train_flops"] > 0
