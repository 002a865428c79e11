"""Hugging Face conversion: our Flax models reproduce transformers' logits.

References are independent: PyTorch models built by `transformers` (CPU) from
tiny random configs (GPT-2, Llama, OPT pre-LN, OPT post-LN with
project_in/out, Phi), saved with save_pretrained(safe_serialization=True),
loaded with `models.load_hf_checkpoint` and compared on a batch that mixes
right and left padding. GPT-2 and Llama get explicit positions on both
sides; OPT and Phi use both sides' defaults: Hugging Face OPT derives
positions from the attention mask (cumsum(mask) * mask - 1), ours must do the
same; Phi counts 0..T-1.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import import_torch_and_transformers
from lensllm_jax import models

pytestmark = pytest.mark.torch
torch, transformers = import_torch_and_transformers()

VOCAB = 97
BATCH, LENGTH = 3, 12


def _batch(seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, size=(BATCH, LENGTH))
  mask = np.ones((BATCH, LENGTH), np.int64)
  mask[1, 8:] = 0  # right padding
  mask[2, :3] = 0  # left padding
  return ids, mask


def _torch_logits(model, ids, mask, positions):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


def _positions(mask):
  # Left-padded rows count positions from their first real token (both models get these).
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _compare(hf_model, checkpoint_dir, atol=1e-4):
  config, params = models.load_hf_checkpoint(checkpoint_dir)
  ids, mask = _batch()
  positions = _positions(mask)
  apply = jax.jit(models.build(config).apply)
  ours = apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
               positions=jnp.asarray(positions))
  theirs = _torch_logits(hf_model, ids, mask, positions)
  real = mask.astype(bool)
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=atol, rtol=0)
  return config, params


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  torch.manual_seed(0)
  hf_config = transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
      bos_token_id=0, eos_token_id=0, attn_implementation="eager")
  model = transformers.GPT2LMHeadModel(hf_config).eval()
  # Make LayerNorms and biases non-trivial so a mis-mapped tensor shows up.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "ln" in name:
        p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("gpt2")
  model.save_pretrained(path, safe_serialization=True)
  return path, model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  torch.manual_seed(1)
  hf_config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
      bos_token_id=0, eos_token_id=0, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("llama")
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def test_gpt2_logits_match_transformers(gpt2_dir):
  path, hf_model = gpt2_dir
  config, params = _compare(hf_model, path)
  assert config.arch == "gpt2" and config.tie_embeddings
  assert set(params) == set(models.block_names(config))
  # Independent parameter count: torch's own count (tied weights once).
  n_torch = sum(p.numel() for p in hf_model.parameters())
  assert models.count_params(params) == models.num_params(config) == n_torch


def test_llama_logits_match_transformers(llama_dir):
  path, hf_model = llama_dir
  config, params = _compare(hf_model, path)
  assert config.arch == "llama" and config.n_kv_heads == 2 and config.rope_theta == 500.0
  n_torch = sum(p.numel() for p in hf_model.parameters())
  assert models.count_params(params) == models.num_params(config) == n_torch


def test_bfloat16_checkpoint_is_upcast(tmp_path, gpt2_dir):
  _, hf_model = gpt2_dir

  half = copy.deepcopy(hf_model).to(torch.bfloat16)
  half.save_pretrained(tmp_path, safe_serialization=True)
  _, params = models.load_hf_checkpoint(tmp_path)
  expected = half.transformer.h[1].mlp.c_fc.weight.detach().float().numpy()
  got = np.asarray(params["h_1"]["mlp"]["c_fc"]["kernel"])
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, expected)


def test_missing_and_misshaped_tensors_are_named(gpt2_dir, llama_dir):
  path, _ = gpt2_dir
  config = models.config_from_hf(json.loads((path / "config.json").read_text()))
  tensors = models.read_safetensors(path)
  missing = dict(tensors)
  missing.pop("transformer.h.1.mlp.c_fc.weight")
  with pytest.raises(models.CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight"):
    models.convert_gpt2_weights(missing, config)
  bad = dict(tensors)
  bad["transformer.h.0.attn.c_attn.weight"] = np.zeros((32, 95), np.float32)
  with pytest.raises(models.CheckpointError, match=r"h\.0\.attn\.c_attn\.weight.*\(32, 95\)"):
    models.convert_gpt2_weights(bad, config)
  extra = dict(tensors)
  extra["transformer.h.2.ln_1.weight"] = np.zeros((32,), np.float32)
  with pytest.raises(models.CheckpointError, match=r"h\.2\.ln_1\.weight"):
    models.convert_gpt2_weights(extra, config)
  lpath, _ = llama_dir
  lconfig = models.config_from_hf(json.loads((lpath / "config.json").read_text()))
  ltensors = models.read_safetensors(lpath)
  ltensors.pop("model.layers.0.self_attn.k_proj.weight")
  with pytest.raises(models.CheckpointError, match=r"layers\.0\.self_attn\.k_proj\.weight"):
    models.convert_llama_weights(ltensors, lconfig)


def test_unsupported_configs_are_rejected(tmp_path):
  with pytest.raises(models.CheckpointError, match="model_type"):
    models.config_from_hf({"model_type": "bert"})
  with pytest.raises(models.CheckpointError, match="rope_type"):
    models.config_from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                           "num_hidden_layers": 1, "num_attention_heads": 2,
                           "intermediate_size": 16,
                           "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
  with pytest.raises(models.CheckpointError, match="config.json"):
    models.load_hf_checkpoint(tmp_path)


def test_tokenizer_json_round_trip(tmp_path):
  from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
  from tokenizers import models as tok_models

  tokenizer = Tokenizer(tok_models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ["the cat sat on the mat", "the dog ate the cat's dinner",
            "fine-tuning dynamics of large language models"] * 20
  tokenizer.train_from_iterator(corpus, trainer)
  tokenizer.save(str(tmp_path / "tokenizer.json"))

  text = "the cat ate dinner, then the dog sat: ünïcode too"
  expected = tokenizer.encode(text).ids
  for location in (tmp_path, tmp_path / "tokenizer.json"):
    loaded = models.load_tokenizer(location)
    assert loaded.encode(text).ids == expected
    assert loaded.decode(expected) == text
    assert loaded.token_to_id("<|endoftext|>") == tokenizer.token_to_id("<|endoftext|>")
  with pytest.raises(models.CheckpointError, match="tokenizer.json"):
    models.load_tokenizer(tmp_path / "nowhere")


def test_sharded_checkpoint_gives_same_params(tmp_path, gpt2_dir):
  path, hf_model = gpt2_dir
  hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  _, sharded = models.load_hf_checkpoint(tmp_path)
  _, single = models.load_hf_checkpoint(path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, single)


# ---------------------------------------------------------------------------
# OPT and Phi.


def _perturb(model, scale: float = 0.1):
  # Non-trivial LayerNorms and biases, so that a mis-mapped tensor shows up.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(scale * torch.randn_like(p))
  return model


def _save(tmp_path_factory, name, model):
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(path, safe_serialization=True)
  ids, mask = _batch()
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  return {"path": path, "model": model, "logits": logits.float().numpy()}


def _opt(tmp_path_factory, name, seed, *, word_embed_proj_dim, do_layer_norm_before):
  torch.manual_seed(seed)
  config = transformers.OPTConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      ffn_dim=64, max_position_embeddings=24, word_embed_proj_dim=word_embed_proj_dim,
      do_layer_norm_before=do_layer_norm_before, pad_token_id=1, bos_token_id=2,
      eos_token_id=2, attn_implementation="eager")
  return _save(tmp_path_factory, name, _perturb(transformers.OPTForCausalLM(config).eval()))


@pytest.fixture(scope="module")
def opt_pre(tmp_path_factory):
  """Pre-LayerNorm OPT (the layout of OPT-125m/1.3b/2.7b/6.7b), final LayerNorm, tied head."""
  return _opt(tmp_path_factory, "opt_pre", 0, word_embed_proj_dim=32, do_layer_norm_before=True)


@pytest.fixture(scope="module")
def opt_post(tmp_path_factory):
  """Post-LayerNorm OPT with project_in / project_out (the layout of OPT-350m)."""
  return _opt(tmp_path_factory, "opt_post", 1, word_embed_proj_dim=16,
              do_layer_norm_before=False)


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
  """Phi with partial rotary (factor 0.5 as phi-1.5: 4 of 8 channels), 2 kv heads."""
  torch.manual_seed(2)
  config = transformers.PhiConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
      rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                       "partial_rotary_factor": 0.5},
      bos_token_id=0, eos_token_id=0, attn_implementation="eager")
  return _save(tmp_path_factory, "phi", _perturb(transformers.PhiForCausalLM(config).eval()))


@pytest.fixture(scope="module", params=["opt_pre", "opt_post", "phi"])
def loaded(request):
  """(reference dict, config, params, jitted apply(params, ids, mask)) per architecture."""
  ref = request.getfixturevalue(request.param)
  config, params = models.load_hf_checkpoint(ref["path"])
  apply = jax.jit(lambda p, ids, mask, c=config: models.build(c).apply(
      {"params": p}, ids, attention_mask=mask))
  return request.param, ref, config, params, apply


@pytest.fixture(scope="module")
def opt_apply(opt_pre):
  """Config, params and a jitted apply(params, ids, mask, positions) of the pre-LN OPT."""
  config, params = models.load_hf_checkpoint(opt_pre["path"])
  apply = jax.jit(lambda p, ids, mask, pos: models.build(config).apply(
      {"params": p}, ids, attention_mask=mask, positions=pos))
  return config, params, apply


def test_opt_phi_logits_match_transformers(loaded):
  name, ref, config, params, apply = loaded
  ids, mask = _batch()
  ours = apply(params, jnp.asarray(ids), jnp.asarray(mask))
  assert ours.dtype == jnp.float32 and ours.shape == (BATCH, LENGTH, VOCAB)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], ref["logits"][real], atol=1e-4, rtol=0)
  # Parameter count: torch's own (tied weights once) = closed form = our pytree.
  n_torch = sum(p.numel() for p in ref["model"].parameters())
  assert models.count_params(params) == models.num_params(config) == n_torch
  assert set(params) == set(models.block_names(config))
  expected = {"opt_pre": ("opt", True, True, 32), "opt_post": ("opt", False, False, 16),
              "phi": ("phi", True, True, 32)}[name]
  assert (config.arch, config.pre_norm, config.final_norm, config.word_embed_dim) == expected
  if name == "phi":
    assert config.rotary_dim == 4 and config.n_kv_heads == 2 and not config.tie_embeddings


def test_opt_phi_bfloat16_compute_close_to_transformers(loaded):
  # bf16 matmuls (8 mantissa bits) against torch float32: within 5% of the logits' spread.
  name, ref, config, params, _ = loaded
  ids, mask = _batch()
  bf16 = jax.jit(models.build(config.replace(dtype="bfloat16")).apply)(
      {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  theirs = ref["logits"][real]
  err = float(np.max(np.abs(np.asarray(bf16)[real] - theirs)))
  assert bf16.dtype == jnp.float32
  assert 0 < err < 0.05 * float(np.std(theirs)), (name, err, float(np.std(theirs)))


def test_opt_positions_follow_the_mask(opt_apply):
  """Left padding shifts OPT's positions: with HF's cumsum rule (our default, checked
  against transformers above) the real tokens of a left-padded row give the same logits
  as the same tokens right-padded, and not with positions 0..T-1."""
  config, params, apply = opt_apply
  ids = jnp.asarray(_batch()[0][:1, :8])
  pad = jnp.zeros((1, 4), ids.dtype)
  padded = jnp.concatenate([pad, ids], axis=1)
  mask = jnp.concatenate([pad, jnp.ones_like(ids)], axis=1).astype(jnp.int32)
  cumsum_positions = jnp.cumsum(mask, axis=1) * mask - 1  # HF OPT's rule, written here
  plain = apply(params, jnp.concatenate([ids, pad], axis=1),
                jnp.concatenate([jnp.ones_like(ids), pad], axis=1).astype(jnp.int32),
                jnp.concatenate([jnp.arange(8), -jnp.ones(4, jnp.int32)])[None])
  left = apply(params, padded, mask, cumsum_positions)
  np.testing.assert_allclose(left[:, 4:], plain[:, :8], atol=1e-5)
  shifted = apply(params, padded, mask, jnp.arange(12)[None])
  assert float(jnp.max(jnp.abs(shifted[:, 4:] - plain[:, :8]))) > 1e-3


def test_opt_phi_sharded_checkpoints(tmp_path, opt_post, phi):
  for ref in (opt_post, phi):
    out = tmp_path / ref["path"].name
    ref["model"].save_pretrained(out, safe_serialization=True, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    _, sharded = models.load_hf_checkpoint(out)
    _, single = models.load_hf_checkpoint(ref["path"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, single)


def test_unknown_model_type_names_it_and_lists_the_supported(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
  with pytest.raises(models.CheckpointError,
                     match=r"'mamba'.*supported: .*gpt2.*llama.*opt.*phi"):
    models.load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("fixture,convert,missing,misshaped", [
    ("opt_post", "convert_opt_weights", "model.decoder.project_in.weight",
     "model.decoder.layers.1.fc1.weight"),
    ("phi", "convert_phi_weights", "lm_head.bias", "model.layers.0.self_attn.dense.weight"),
])
def test_opt_phi_missing_and_misshaped_tensors_are_named(request, fixture, convert, missing, misshaped):
  path = request.getfixturevalue(fixture)["path"]
  config = models.config_from_hf(json.loads((path / "config.json").read_text()))
  tensors = models.read_safetensors(path)
  convert = getattr(models, convert)

  def short(name):  # errors name tensors without the model.decoder. / model. prefix
    return name.removeprefix("model.").removeprefix("decoder.").replace(".", r"\.")

  without = {k: v for k, v in tensors.items() if k != missing}
  with pytest.raises(models.CheckpointError, match=rf"missing tensor '{short(missing)}'"):
    convert(without, config)
  bad = dict(tensors)
  bad[misshaped] = np.zeros((3, 5), np.float32)
  with pytest.raises(models.CheckpointError, match=rf"'{short(misshaped)}' has shape \(3, 5\)"):
    convert(bad, config)
