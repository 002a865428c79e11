"""Encoder-decoders (T5 / T5 v1.1 / mT5 / Switch / BART) reproduce transformers.

References are independent: tiny random PyTorch models built by `transformers`
(CPU), saved with save_pretrained (safetensors), converted and compared:
logits, the seq2seq loss and its gradient, parameter counts.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import import_torch_and_transformers
from lensllm_jax import models
from lensllm_jax.models import (
  CheckpointError,
  convert_bart_weights,
  convert_t5_weights,
  count_params,
  read_safetensors,
  seq2seq_logits,
  seq2seq_loss,
  shift_right,
  switch_router_losses,
)
from lensllm_jax.models.encdec_hf import encdec_config_from_hf
from lensllm_jax.models.t5 import relative_position_bucket, switch_routing
from lensllm_jax.theory import ntk

pytestmark = pytest.mark.torch
torch, transformers = import_torch_and_transformers()

VOCAB = 61
SRC, TGT = 10, 7
T5_DIMS = dict(vocab_size=VOCAB, d_model=16, d_kv=6, d_ff=24, num_heads=3, dropout_rate=0.0,
               decoder_start_token_id=0,
               relative_attention_num_buckets=8, relative_attention_max_distance=12)


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
  """Padded encoder inputs and right-padded targets (pad id 0 under the mask)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, size=(3, SRC))
  mask = np.ones((3, SRC), np.int64)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  targets = rng.integers(3, VOCAB, size=(3, TGT))
  target_mask = np.ones((3, TGT), np.int64)
  target_mask[1, 5:] = 0
  target_mask[2, 2:] = 0
  return {"input_ids": ids, "attention_mask": mask, "targets": targets * target_mask,
          "target_mask": target_mask}


def _save(model, path):
  model.save_pretrained(path, safe_serialization=True)
  return path


def _perturb_norms(model):
  # Non-trivial norm weights and biases so a mis-mapped tensor shows up.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (checkpoint dir, torch model in eval mode)."""
  torch.manual_seed(0)
  out = {}
  t5 = transformers.T5ForConditionalGeneration(
      transformers.T5Config(num_layers=2, num_decoder_layers=2, **T5_DIMS)).eval()
  out["t5"] = t5
  mt5 = transformers.MT5ForConditionalGeneration(
      transformers.MT5Config(num_layers=1, **{**T5_DIMS, "relative_attention_num_buckets": 6}))
  out["mt5"] = mt5.eval()
  switch = transformers.SwitchTransformersForConditionalGeneration(
      transformers.SwitchTransformersConfig(
          num_layers=2, num_sparse_encoder_layers=1, num_decoder_layers=2,
          num_sparse_decoder_layers=1, num_experts=3, expert_capacity=2,
          router_z_loss_coef=0.3, router_aux_loss_coef=0.2, router_jitter_noise=0.0,
          **T5_DIMS)).eval()
  out["switch"] = switch
  bart_dims = dict(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2,
                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=24,
                   decoder_ffn_dim=24, max_position_embeddings=16, dropout=0.0,
                   attention_dropout=0.0, activation_dropout=0.0)
  bart = transformers.BartForConditionalGeneration(
      transformers.BartConfig(scale_embedding=True, **bart_dims)).eval()
  with torch.no_grad():
    bart.final_logits_bias.normal_()
  out["bart"] = bart
  out["bart_causal"] = transformers.BartForCausalLM(transformers.BartConfig(**bart_dims)).eval()
  result = {}
  for name, model in out.items():
    _perturb_norms(model)
    result[name] = (_save(model, tmp_path_factory.mktemp(name)), model)
  return result


@pytest.fixture(scope="module")
def t5_v11_untied(tmp_path_factory, checkpoints):
  """A T5 v1.1 checkpoint in the hub layout: gated-GELU, own lm_head.weight, no rescale.

  transformers 5 always ties T5's head, so the hub layout is written by hand
  (config tie_word_embeddings=false, lm_head.weight) and the torch reference
  gets an untied head with the same values.
  """
  torch.manual_seed(1)
  config = transformers.T5Config(num_layers=1, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False, **T5_DIMS)
  model = transformers.T5ForConditionalGeneration(config).eval()
  _perturb_norms(model)
  model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))
  assert model.lm_head.weight is not model.shared.weight and not config.scale_decoder_outputs
  path = tmp_path_factory.mktemp("t5_v11")
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
           if "embed_tokens" not in k}
  save_file(state, str(path / "model.safetensors"))
  hf = json.loads(model.config.to_json_string())
  hf.pop("scale_decoder_outputs", None)
  hf["tie_word_embeddings"] = False
  (path / "config.json").write_text(json.dumps(hf))
  return path, model


def _torch_logits(model, batch, decoder_mask=True):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(batch["input_ids"]),
                attention_mask=torch.tensor(batch["attention_mask"]),
                decoder_input_ids=torch.tensor(np.asarray(shift_right(batch["targets"],
                                                                      _config(model)))),
                decoder_attention_mask=(torch.tensor(batch["target_mask"]) if decoder_mask
                                        else None))
  return out.logits.float().numpy()


def _config(model):
  return encdec_config_from_hf(json.loads(model.config.to_json_string()))


GRAD_ARCHS = ("t5", "switch", "bart")


@pytest.fixture(scope="module")
def ours(checkpoints, t5_v11_untied):
  """name -> our results on `_batch()`, one compiled program per architecture:
  config, params, logits [3, TGT, V], router logits (Switch), and for
  GRAD_ARCHS the seq2seq loss (Switch: with the router losses) and its gradient."""
  paths = {name: path for name, (path, _) in checkpoints.items() if name != "bart_causal"}
  paths["t5_v11"] = t5_v11_untied[0]
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  results = {}
  for name, path in paths.items():
    config, params = models.load_hf_checkpoint(path)
    module = models.build(config)
    router = config.arch == "switch"

    def run(p, module=module, router=router, with_grad=name in GRAD_ARCHS):
      out = seq2seq_logits(module, p, batch, return_router_logits=router)
      # The NTK helpers' per-example output: mean target log-likelihood.
      x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
           "targets": batch["targets"], "loss_mask": batch["target_mask"]}
      ll = ntk.lm_output_fn(module, "log_likelihood")(p, x)
      if not with_grad:
        return out, ll, None, None
      loss, grads = jax.value_and_grad(
          lambda q: seq2seq_loss(module, q, batch, router_losses=router))(p)
      return out, ll, loss, grads

    out, ll, loss, grads = jax.jit(run)(params)
    logits, routers = out if router else (out, None)
    results[name] = {"config": config, "params": params, "logits": np.asarray(logits),
                     "routers": routers, "loss": loss, "grads": grads,
                     "log_likelihood": np.asarray(ll)}
  return results


@pytest.mark.parametrize("name", ["t5", "mt5", "switch", "bart"])
def test_logits_match_transformers(checkpoints, ours, name):
  _, model = checkpoints[name]
  batch = _batch()
  config, params, logits = (ours[name][k] for k in ("config", "params", "logits"))
  theirs = _torch_logits(model, batch)
  real = batch["target_mask"].astype(bool)
  assert logits.dtype == np.float32 and logits.shape == (3, TGT, VOCAB)
  np.testing.assert_allclose(logits[real], theirs[real], atol=1e-4, rtol=0)
  # ntk.lm_output_fn: each example's mean target log-likelihood, from torch's logits.
  logp = torch.log_softmax(torch.tensor(theirs), -1).numpy()
  picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  expected = (picked * real).sum(1) / real.sum(1)
  np.testing.assert_allclose(ours[name]["log_likelihood"], expected, rtol=1e-5, atol=1e-6)
  n_torch = sum(p.numel() for p in model.parameters())  # tied weights once
  # BART's final_logits_bias is a torch buffer but one of our parameters.
  extra = VOCAB if name == "bart" else 0
  assert count_params(params) == models.num_params(config) == n_torch + extra
  assert config.arch == name and config.is_encoder_decoder


def test_t5_v11_hub_layout_untied_head(t5_v11_untied, ours):
  _, model = t5_v11_untied
  batch = _batch()
  config, params, logits = (ours["t5_v11"][k] for k in ("config", "params", "logits"))
  assert config.gated and not config.tie_embeddings and not config.scale_decoder_outputs
  assert "lm_head" in params
  real = batch["target_mask"].astype(bool)
  np.testing.assert_allclose(logits[real], _torch_logits(model, batch)[real], atol=1e-4, rtol=0)
  assert models.num_params(config) == count_params(params) == sum(
      p.numel() for p in model.parameters())


def test_t5_v10_rescales_tied_head(ours):
  config = ours["t5"]["config"]
  assert config.tie_embeddings and config.scale_decoder_outputs and not config.gated
  assert config.activation == "relu"


def test_relative_buckets_match_transformers():
  attn = transformers.models.t5.modeling_t5.T5Attention
  rel = np.arange(-300, 300)[None, :]
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (8, 12)):
      theirs = attn._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                              num_buckets=buckets, max_distance=distance)
      ours = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets,
                                      max_distance=distance)
      np.testing.assert_array_equal(ours, theirs.numpy())


def _set_capacity(model, capacity):
  for module in model.modules():
    if isinstance(module, transformers.models.switch_transformers.modeling_switch_transformers
                  .SwitchTransformersTop1Router):
      module.expert_capacity = capacity


def test_switch_drops_tokens_like_transformers(checkpoints, ours):
  """Capacity 2 per expert and sequence: tokens ARE dropped, and identically."""
  _, model = checkpoints["switch"]
  batch = _batch()
  config = ours["switch"]["config"]
  enc_routers, dec_routers = ours["switch"]["routers"]
  assert len(enc_routers) == 1 and len(dec_routers) == 1  # block 1 of each stack
  route = jax.jit(switch_routing, static_argnums=1)
  dropped = 0
  for logits in enc_routers + dec_routers:
    keep, gate = route(logits, config.expert_capacity)
    assert int(keep.sum(axis=1).max()) <= config.expert_capacity
    dropped += int((keep.sum(-1) == 0).sum())
    assert np.all(np.asarray(gate) > 1.0 / config.num_experts - 1e-6)
  assert dropped > 0
  # transformers' own router logits and dispatch agree with ours.
  with torch.no_grad():
    out = model(input_ids=torch.tensor(batch["input_ids"]),
                attention_mask=torch.tensor(batch["attention_mask"]),
                decoder_input_ids=torch.tensor(np.asarray(shift_right(batch["targets"], config))),
                decoder_attention_mask=torch.tensor(batch["target_mask"]),
                output_router_logits=True)
  for mine, theirs in ((enc_routers, out.encoder_router_logits),
                       (dec_routers, out.decoder_router_logits)):
    np.testing.assert_allclose(np.concatenate([np.asarray(x) for x in mine], 1),
                               np.concatenate([t.numpy() for t in theirs], 1), atol=1e-5)
  router = model.encoder.block[1].layer[1].mlp.router
  with torch.no_grad():
    h = torch.tensor(np.random.default_rng(3).normal(size=(2, 9, 16)), dtype=torch.float32)
    their_keep, their_gate, their_logits = router(h)
  keep, gate = route(jnp.asarray(their_logits.numpy()), config.expert_capacity)
  np.testing.assert_array_equal(np.asarray(keep), their_keep.numpy())
  np.testing.assert_allclose(np.asarray(gate), their_gate.numpy()[..., 0], atol=1e-6)
  # Without the capacity limit transformers' logits change: the drops matter.
  real = batch["target_mask"].astype(bool)
  _set_capacity(model, 64)
  try:
    roomy = _torch_logits(model, batch)
  finally:
    _set_capacity(model, config.expert_capacity)
  assert np.abs(roomy[real] - ours["switch"]["logits"][real]).max() > 1e-3


def _torch_loss_and_grads(model, batch, **kwargs):
  labels = np.where(batch["target_mask"] == 1, batch["targets"], -100)
  model.zero_grad()
  out = model(input_ids=torch.tensor(batch["input_ids"]),
              attention_mask=torch.tensor(batch["attention_mask"]),
              decoder_attention_mask=torch.tensor(batch["target_mask"]),
              labels=torch.tensor(labels), **kwargs)
  out.loss.backward()
  # An expert no token reached has no torch gradient: it is zero.
  grads = {n: np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.numpy().copy()
           for n, p in model.named_parameters()}
  model.zero_grad()
  return out, grads


def _relative_error(ours, theirs):
  flat_ours = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(ours)])
  flat_theirs = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(theirs)])
  return np.linalg.norm(flat_ours - flat_theirs) / np.linalg.norm(flat_theirs)


@pytest.mark.parametrize("name", GRAD_ARCHS)
def test_seq2seq_loss_gradient_matches_torch(checkpoints, ours, name):
  _, model = checkpoints[name]
  batch = _batch()
  config, loss, grads = (ours[name][k] for k in ("config", "loss", "grads"))
  router = name == "switch"
  out, torch_grads = _torch_loss_and_grads(model, batch,
                                           **({"output_router_logits": True} if router else {}))
  if router:
    # The auxiliary terms are there and equal to transformers' (weights 0.3 and 0.2).
    theirs_aux = (0.3 * (out.encoder_z_loss + out.decoder_z_loss)
                  + 0.2 * (out.encoder_aux_loss + out.decoder_aux_loss)).item()
    assert theirs_aux > 1e-3
    np.testing.assert_allclose(float(switch_router_losses(ours[name]["routers"], config)),
                               theirs_aux, rtol=1e-5)
  np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
  convert = convert_bart_weights if name == "bart" else convert_t5_weights
  grads = dict(grads)
  if name == "bart":
    torch_grads["final_logits_bias"] = np.zeros((1, VOCAB), np.float32)  # a buffer in torch
    grads.pop("final_logits_bias")
  theirs = convert(torch_grads, config)
  theirs.pop("final_logits_bias", None)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(theirs)
  assert _relative_error(grads, theirs) < 1e-4
  for key in grads:  # and block by block
    assert _relative_error(grads[key], theirs[key]) < 1e-4, key


def test_bart_causal_lm_matches_transformers(checkpoints):
  path, model = checkpoints["bart_causal"]
  config, params = models.load_hf_checkpoint(path)
  assert config.decoder_only and not config.is_encoder_decoder
  rng = np.random.default_rng(4)
  ids = rng.integers(3, VOCAB, size=(2, 9))
  mask = np.ones((2, 9), np.int64)
  mask[1, 6:] = 0
  ours = jax.jit(models.build(config).apply)({"params": params}, jnp.asarray(ids),
                                              attention_mask=jnp.asarray(mask))
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=1e-4, rtol=0)
  # BartForCausalLM's count: the decoder stack with its (unused) cross-attention.
  n_torch = sum(p.numel() for p in model.parameters())
  assert models.num_params(config) == count_params(params) == n_torch
  # A full BART checkpoint loaded decoder-only takes the decoder and the shared embedding.
  full_path, full = checkpoints["bart"]
  dconfig, dparams = models.load_bart_causal_lm(full_path)
  assert dconfig.decoder_only
  np.testing.assert_array_equal(np.asarray(dparams["layers_1"]["fc1"]["kernel"]),
                                full.model.decoder.layers[1].fc1.weight.detach().numpy().T)
  np.testing.assert_array_equal(np.asarray(dparams["embed_tokens"]["embedding"]),
                                full.model.shared.weight.detach().numpy())


def test_shift_right_matches_transformers(checkpoints):
  labels = np.array([[5, 6, 7, -100], [8, -100, -100, -100]])
  for name in ("t5", "bart"):
    model = checkpoints[name][1]
    config = _config(model)
    if name == "t5":
      theirs = model._shift_right(torch.tensor(labels)).numpy()
    else:
      theirs = transformers.models.bart.modeling_bart.shift_tokens_right(
          torch.tensor(labels), config.pad_token_id, config.decoder_start_token_id).numpy()
    np.testing.assert_array_equal(np.asarray(shift_right(labels, config)), theirs)


def test_bad_checkpoints_name_the_tensor(checkpoints):
  for name, convert, victim, bad_name in (
      ("t5", convert_t5_weights, "decoder.block.1.layer.1.EncDecAttention.k.weight",
       "encoder.block.0.layer.1.DenseReluDense.wi.weight"),
      ("switch", convert_t5_weights, "encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight",
       "decoder.block.1.layer.2.mlp.router.classifier.weight"),
      ("bart", convert_bart_weights, "model.decoder.layers.0.encoder_attn.q_proj.bias",
       "model.encoder.embed_positions.weight")):
    path, model = checkpoints[name]
    config = _config(model)
    tensors = read_safetensors(path)
    missing = dict(tensors)
    missing.pop(victim)
    short = victim.removeprefix("model.").replace(".", r"\.")
    with pytest.raises(CheckpointError, match=short):
      convert(missing, config)
    bad = dict(tensors)
    bad[bad_name] = np.zeros((3, 5), np.float32)
    with pytest.raises(CheckpointError,
                       match=bad_name.removeprefix("model.").replace(".", r"\.") + r".*\(3, 5\)"):
      convert(bad, config)
  extra = read_safetensors(checkpoints["t5"][0])
  extra["encoder.block.2.layer.0.layer_norm.weight"] = np.ones(16, np.float32)
  with pytest.raises(CheckpointError, match=r"encoder\.block\.2"):
    convert_t5_weights(extra, _config(checkpoints["t5"][1]))


def test_unsupported_configs_are_rejected():
  with pytest.raises(CheckpointError, match="feed_forward_proj"):
    encdec_config_from_hf({"model_type": "t5", "feed_forward_proj": "gated-swish-x",
                           "vocab_size": 8, "d_model": 4, "d_kv": 2, "d_ff": 8,
                           "num_layers": 1, "num_heads": 2})
  with pytest.raises(CheckpointError, match="model_type"):
    encdec_config_from_hf({"model_type": "pegasus"})


def test_training_and_hessian_losses_of_an_encoder_decoder(checkpoints, ours):
  """training's steps, the Hessian binaries' loss and NLPMetrics take a Switch model."""
  from experiments.hessian_common import lm_loss_fn
  from lensllm_jax import training
  from lensllm_jax.theory import nlp_metrics

  config, params = ours["switch"]["config"], ours["switch"]["params"]
  module = models.build(config)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  tbatch = {**batch, "loss_mask": batch["target_mask"].astype(jnp.float32)}
  apply_fn = training.causal_lm_apply(module)  # dispatches to seq2seq_apply
  assert apply_fn.encoder_decoder

  @jax.jit
  def losses(p):
    key = jax.random.key(0)
    train_sum, count = training.loop._batch_sums(apply_fn, p, tbatch, key, training=True)
    eval_sum, _ = training.loop._batch_sums(apply_fn, p, tbatch, key)
    return (train_sum / count, eval_sum / count, lm_loss_fn(module)(p, tbatch),
            seq2seq_loss(module, p, batch))

  train, evaluation, hessian_loss, per_token = losses(params)
  # The training loss is transformers' loss with the router terms (checked against
  # torch in test_seq2seq_loss_gradient_matches_torch); evaluation has none.
  np.testing.assert_allclose(float(train), float(ours["switch"]["loss"]), rtol=1e-5)
  aux = float(switch_router_losses(ours["switch"]["routers"], config))
  np.testing.assert_allclose(float(evaluation), float(train) - aux, rtol=1e-5)
  np.testing.assert_allclose(float(hessian_loss), float(per_token), rtol=1e-6)
  np.testing.assert_allclose(float(evaluation), float(per_token), rtol=1e-5)
  # NLPMetrics: each expert's wi / wo is a layer of its own.
  result = nlp_metrics.nlp_metrics(params, min_tail=4)
  expert_layers = [n for n in result.alphas if "/mlp/wi/kernel[" in n or "/mlp/wo/kernel[" in n]
  assert len(expert_layers) == 2 * 2 * config.num_experts  # 2 sparse blocks x (wi, wo) x E
  np.testing.assert_array_equal(
      nlp_metrics.weight_matrices(params)["encoder_block_1/mlp/wo/kernel[2]"],
      np.asarray(params["encoder_block_1"]["mlp"]["wo"]["kernel"][2], np.float64))


@pytest.mark.parametrize("config", [
    models.EncoderDecoderConfig(arch="switch", vocab_size=50, d_model=8, d_ff=12, n_layers=2,
                                n_decoder_layers=3, n_heads=2, head_dim=3, num_experts=4,
                                num_sparse_encoder_layers=1, num_sparse_decoder_layers=1),
    models.EncoderDecoderConfig(arch="mt5", vocab_size=50, d_model=8, d_ff=12, n_layers=1,
                                n_heads=2),
    models.EncoderDecoderConfig(arch="bart", vocab_size=50, d_model=8, d_ff=12, n_layers=1,
                                n_decoder_layers=2, n_heads=2, max_len=16),
    models.EncoderDecoderConfig(arch="bart", vocab_size=50, d_model=8, d_ff=12, n_layers=1,
                                n_decoder_layers=2, n_heads=2, max_len=16, decoder_only=True),
], ids=["switch", "mt5", "bart", "bart_causal"])
def test_flops_per_token_from_the_built_shapes(config):
  """2 N_mm + 4 W T with N_mm read off the module's kernels (an expert stack counts
  one expert: the active parameters; unused cross-attention does not count)."""
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  n_mm = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] != "kernel" or (config.decoder_only and "encoder_attn" in names):
      continue
    n_mm += leaf.size // (leaf.shape[0] if leaf.ndim == 3 else 1)
  if config.tie_embeddings:
    n_mm += config.vocab_size * config.d_model
  width = config.n_heads * config.head_dim
  layers = (config.n_decoder_layers if config.decoder_only
            else config.n_layers + 2 * config.n_decoder_layers)
  t = 7
  expected = 2 * n_mm + 4 * width * layers * t
  assert models.flops_per_token(config, t, training=False) == expected
  assert models.flops_per_token(config, t) == 3 * expected
  assert models.count_params(shapes) == models.num_params(config)
  assert set(shapes) == set(models.block_names(config))
  if config.arch == "switch":  # active < total
    assert n_mm < sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
