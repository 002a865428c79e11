"""The model families beyond the curve files, against transformers (one table of families).

Every family of `FAMILIES` is a tiny random model built by transformers (CPU),
perturbed so that norms and biases are not at their init values, saved with
save_pretrained plus a tokenizer.json trained on a local task (module scope,
once), loaded with `models.load_hf_checkpoint` and compared with the torch
model on a batch that mixes right and left padding and is longer than every
sliding window: logits (torch float32, explicit positions on both sides),
bfloat16 compute, the LM loss and its gradient, parameter counts, a sharded
copy, missing / mis-shaped tensors, and downstream the NTK outputs and kernel
(J from torch autograd), NLPMetrics over exactly torch's nn.Linear weights and
experiments.finetune_sweep on the local checkpoints. The presets of the published
models are counted against transformers' modules (meta device) and the published
totals, and their FLOPs against a hand closed form. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import hessian_common
from helpers import import_torch_and_transformers, local_hf
from lensllm_jax import models, training
from lensllm_jax.models.presets import HF_CONFIGS
from lensllm_jax.theory import nlp_metrics, ntk
from lensllm_jax.training import textdata

pytestmark = pytest.mark.torch
torch, transformers = import_torch_and_transformers()

BATCH, LENGTH = 3, 12  # longer than every sliding window below (4, 5, 7)
NUM_RECORDS = 240  # 200 train + 20 validation + 20 test (finetune_sweep)
SWEEP_LEN = 24
NTK_LEN = 48  # longer than some of the task's examples: right padding in the NTK batch


@dataclasses.dataclass(frozen=True)
class Family:
  """One Hugging Face model class, its tiny config, and what a test checks of it.

  Attributes:
    name: test id (also the checkpoint directory name).
    model_cls, config_cls: transformers class names.
    hf_kwargs: config arguments (vocab_size and common sizes are added).
    arch: our config.arch after loading.
    expect: config fields the loader must produce.
    missing, misshaped: a checkpoint tensor name each (missing / wrong shape test).
    ablations: config changes that switch off a tested path (sliding window,
      soft-capping, RoPE scaling, ...); each must move the logits by more than
      10x the tolerance, so that the comparison with transformers sees the path.
  """
  name: str
  model_cls: str
  config_cls: str
  hf_kwargs: dict
  arch: str
  expect: dict
  missing: str
  misshaped: str
  ablations: tuple[dict, ...] = ()


# initializer_range 0.05: attention far from uniform, so RoPE and masks matter (Gemma's
# q/k-normed, sqrt(d)-scaled models use 0.02 to keep bf16 near the others' bound).
_COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, initializer_range=0.05, bos_token_id=1,
               eos_token_id=1, pad_token_id=None, attn_implementation="eager")

FAMILIES = [
    # Llama 3.x: llama3 RoPE scaling with every wavelength regime (head 8, theta 1e4:
    # wavelengths 6, 63, 628, 6283 against 16 and 64), tied head (SmolLM, Llama 3.2).
    Family("llama3_tied", "LlamaForCausalLM", "LlamaConfig",
           dict(num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
                rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}),
           "llama", dict(rope_type="llama3", tie_embeddings=True, rope_factor=8.0),
           "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight",
           (dict(rope_type="default"),)),
    # Qwen2 / 2.5: q/k/v biases, tied (Qwen2.5-0.5B), layer 1 slides (max_window_layers 1).
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config",
           dict(num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                sliding_window=4, max_window_layers=1,
                rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
           "qwen2", dict(qkv_bias=True, sliding_window=4,
                         layer_types=("full_attention", "sliding_attention")),
           "model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.v_proj.bias",
           (dict(sliding_window=None, layer_types=None),)),
    # Mistral: every layer slides.
    Family("mistral", "MistralForCausalLM", "MistralConfig",
           dict(num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False),
           "mistral", dict(sliding_window=5, layer_types=("sliding_attention",) * 2),
           "lm_head.weight", "model.layers.1.mlp.down_proj.weight",
           (dict(sliding_window=None, layer_types=None),)),
    # Qwen3: q/k RMSNorm per head, head_dim != hidden / heads.
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3Config",
           dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
           "qwen3", dict(qk_norm=True, qkv_bias=False, head_dim=16),
           "model.layers.1.self_attn.k_norm.weight", "model.layers.0.self_attn.q_norm.weight"),
    # Pythia: parallel residual, fused per-head QKV, partial rotary, untied embed_out.
    Family("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig",
           dict(rotary_pct=0.5, hidden_act="gelu", tie_word_embeddings=False),
           "gpt_neox", dict(rotary_dim=4, activation="gelu"),
           "gpt_neox.layers.1.post_attention_layernorm.bias",
           "gpt_neox.layers.0.attention.query_key_value.weight",
           (dict(rotary_dim=8),)),
    # Phi-3: fused qkv_proj / gate_up_proj, LongRoPE (factor 64 / 8 = 8: cos/sin scaled),
    # sliding window 7; positions reach 11 >= 8, so the long factors are in use.
    Family("phi3", "Phi3ForCausalLM", "Phi3Config",
           dict(num_key_value_heads=2, sliding_window=7, original_max_position_embeddings=8,
                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                 "short_factor": [1.0, 1.5, 2.0, 3.0],
                                 "long_factor": [1.0, 2.0, 5.0, 9.0],
                                 "original_max_position_embeddings": 8},
                tie_word_embeddings=False),
           "phi3", dict(fused_projections=True, rope_type="longrope", sliding_window=7,
                        rope_factor=8.0),
           "model.layers.1.mlp.gate_up_proj.weight", "model.layers.0.self_attn.qkv_proj.weight",
           (dict(rope_long_factor=(1.0, 1.5, 2.0, 3.0)), dict(rope_factor=1.0),
            dict(sliding_window=None, layer_types=None))),
    # Gemma 2: GeGLU, 1 + w norms, sandwich norms, sqrt(d) embeddings, soft-capping
    # small enough to bend (attention 0.02, logits 2.0), query_pre_attn_scalar != head_dim,
    # alternating sliding (window 4) / global layers.
    Family("gemma2", "Gemma2ForCausalLM", "Gemma2Config",
           dict(num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
                attn_logit_softcapping=0.02, final_logit_softcapping=2.0, sliding_window=4,
                hidden_activation="gelu_pytorch_tanh", initializer_range=0.02),
           "gemma2", dict(sandwich_norms=True, norm_offset=1.0, embed_scale=True,
                          attn_softcap=0.02, final_softcap=2.0, query_pre_attn_scalar=12.0,
                          layer_types=("sliding_attention", "full_attention")),
           "model.layers.0.pre_feedforward_layernorm.weight",
           "model.layers.1.post_feedforward_layernorm.weight",
           (dict(attn_softcap=None), dict(final_softcap=None),
            dict(sliding_window=None, layer_types=None))),
    # Gemma 3 (text): q/k norms (1 + w), local RoPE base 10 on the sliding layer,
    # global base 1000 with linear scaling (factor 2) on the full one.
    Family("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig",
           dict(num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=32, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                    "full_attention": {"rope_type": "linear", "rope_theta": 1000.0,
                                       "factor": 2.0}},
                hidden_activation="gelu_pytorch_tanh", initializer_range=0.02),
           "gemma3", dict(qk_norm=True, rope_local_theta=10.0, rope_type="linear",
                          rope_theta=1000.0, query_pre_attn_scalar=32.0),
           "model.layers.1.self_attn.q_norm.weight", "model.norm.weight",
           (dict(rope_local_theta=None), dict(rope_type="default"),
            dict(sliding_window=None, layer_types=None))),
]
NAMES = [f.name for f in FAMILIES]
BY_NAME = {f.name: f for f in FAMILIES}


def _batch(seed: int = 0, vocab: int = 97):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(BATCH, LENGTH))
  mask = np.ones((BATCH, LENGTH), np.int64)
  mask[1, 8:] = 0  # right padding
  mask[2, :3] = 0  # left padding
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # both models get these
  return ids, mask, positions


def _build(family: Family, vocab: int):
  torch.manual_seed(NAMES.index(family.name))
  config = getattr(transformers, family.config_cls)(
      **{**_COMMON, "vocab_size": vocab, **family.hf_kwargs})
  model = getattr(transformers, family.model_cls)(config).eval()
  with torch.no_grad():  # norms and biases away from their init, so a mis-mapping shows
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  """A local jsonl translation task and a byte-level BPE tokenizer trained on it."""
  return local_hf.translation_task(tmp_path_factory.mktemp("task"), NUM_RECORDS, 300)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, task):
  """name -> {"path", "model" (torch, float32), "config", "params"}: every family saved
  once with the task's tokenizer (its vocabulary is the models')."""
  _, tok = task
  root = tmp_path_factory.mktemp("families")
  out = {}
  for family in FAMILIES:
    model = _build(family, tok.get_vocab_size())
    path = root / family.name
    model.save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    config, params = models.load_hf_checkpoint(path)
    out[family.name] = {"path": path, "model": model, "config": config, "params": params}
  return out


def _torch_logits(model, ids, mask, positions):
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(positions)).logits
  return logits.float().numpy()


def _apply(config, params, ids, mask, positions):
  return jax.jit(models.build(config).apply)(
      {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
      positions=jnp.asarray(positions))


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, checkpoints):
  ref, family = checkpoints[name], BY_NAME[name]
  config, params = ref["config"], ref["params"]
  assert config.arch == family.arch
  for field, value in family.expect.items():
    assert getattr(config, field) == value, field
  ids, mask, positions = _batch(vocab=config.vocab_size)
  ours = np.asarray(_apply(config, params, ids, mask, positions))
  theirs = _torch_logits(ref["model"], ids, mask, positions)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
  if config.rope_type == "longrope":  # short sequences take the short factors
    short = _apply(config, params, ids[:1, :6], mask[:1, :6], positions[:1, :6])
    np.testing.assert_allclose(np.asarray(short)[0], _torch_logits(
        ref["model"], ids[:1, :6], mask[:1, :6], positions[:1, :6])[0], atol=1e-4, rtol=0)
  n_torch = sum(p.numel() for p in ref["model"].parameters())
  assert models.count_params(params) == models.num_params(config) == n_torch
  assert set(params) == set(models.block_names(config))
  for change in family.ablations:
    off = np.asarray(_apply(config.replace(**change), params, ids, mask, positions))
    assert np.max(np.abs(off - ours)[real]) > 1e-3, change


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_compute_close_to_transformers(name, checkpoints):
  # bf16 matmuls (8 mantissa bits) against torch: within 5 % of the logits' spread; 7.5 %
  # for Gemma, whose largest error moves with which bf16 roundings XLA's fusion elides
  # (excess precision): 4.7 % of the spread with the stacks on [B, T, d], 6.2 % on rows
  # [B T, d] (gemma3; op by op, every rounding kept, 4.7 % both).
  bound = 0.075 if name.startswith("gemma") else 0.05
  ref = checkpoints[name]
  ids, mask, positions = _batch(vocab=ref["config"].vocab_size)
  bf16 = _apply(ref["config"].replace(dtype="bfloat16"), ref["params"], ids, mask, positions)
  theirs = _torch_logits(ref["model"], ids, mask, positions)
  real = mask.astype(bool)
  err = float(np.max(np.abs(np.asarray(bf16)[real] - theirs[real])))
  assert bf16.dtype == jnp.float32
  assert 0 < err < bound * float(np.std(theirs[real])), (name, err)


# The train step's loss checked too: an untied head and a soft-capped tied one.
_TRAINING_LOSS_FAMILIES = ("mistral", "gemma2")


@pytest.mark.parametrize("name", NAMES)
def test_lm_loss_gradient_matches_torch(name, checkpoints):
  """The project's LM loss as the Hessian binaries take it (`hessian_common.lm_loss_fn`,
  positions 0..T-1 as transformers' default), for _TRAINING_LOSS_FAMILIES also as the
  train step takes it (the model's fused head and loss), and their gradients on the
  padded batch, against torch's mapped to our layout by the (logit-tested) converter:
  within 1e-4 relative (max abs error over max abs entry) per parameter tensor."""
  ref = checkpoints[name]
  config, params = ref["config"], ref["params"]
  ids, mask, _ = _batch(seed=1, vocab=config.vocab_size)
  targets, loss_mask = models.next_token_targets(jnp.asarray(ids), jnp.asarray(mask))
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
           "targets": targets, "loss_mask": loss_mask}
  module = models.build(config)
  loss_fn = hessian_common.lm_loss_fn(module)

  def training_loss(params, batch):  # the train step's: the model's fused head and loss
    total, count = training.causal_lm_apply(module).token_loss_sums(params, batch, None)
    return total / count

  fns = (loss_fn, training_loss) if name in _TRAINING_LOSS_FAMILIES else (loss_fn,)
  results = jax.jit(lambda p, b: [jax.value_and_grad(f)(p, b) for f in fns])(params, batch)

  model = ref["model"]
  model.zero_grad()
  lp = local_hf.torch_token_log_probs(model, ids, mask, np.asarray(targets))
  m = torch.as_tensor(np.asarray(loss_mask), dtype=torch.float64)
  ref_loss = -(lp * m).sum() / m.sum()
  ref_loss.backward()
  torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
  fmt = models.HF_FORMATS[json.loads((ref["path"] / "config.json").read_text())["model_type"]]
  ref_grads = dict(jax.tree_util.tree_leaves_with_path(
      fmt.convert(torch_grads, config, "torch grads")))
  for loss, grads in results:
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
    for path, ours in jax.tree_util.tree_leaves_with_path(grads):
      theirs = np.asarray(ref_grads[path])
      scale = float(np.max(np.abs(theirs)))
      err = float(np.max(np.abs(np.asarray(ours) - theirs)))
      assert err <= 1e-4 * scale, (jax.tree_util.keystr(path), err, scale)


@pytest.mark.parametrize("name", NAMES)
def test_sharded_checkpoint_gives_same_params(name, checkpoints, tmp_path):
  ref = checkpoints[name]
  ref["model"].save_pretrained(tmp_path, safe_serialization=True, max_shard_size="30KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  _, sharded = models.load_hf_checkpoint(tmp_path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, ref["params"])


@pytest.mark.parametrize("name", NAMES)
def test_missing_and_misshaped_tensors_are_named(name, checkpoints):
  ref, family = checkpoints[name], BY_NAME[name]
  hf_config = json.loads((ref["path"] / "config.json").read_text())
  config = models.config_from_hf(hf_config)
  fmt = models.HF_FORMATS[hf_config["model_type"]]
  tensors = models.read_safetensors(ref["path"])

  def short(tensor):  # errors name tensors without the model. / gpt_neox. prefix
    return tensor.removeprefix("model.").removeprefix("gpt_neox.").replace(".", r"\.")

  assert family.missing in tensors and family.misshaped in tensors
  without = {k: v for k, v in tensors.items() if k != family.missing}
  with pytest.raises(models.CheckpointError, match=rf"missing tensor '{short(family.missing)}'"):
    fmt.convert(without, config, str(ref["path"]))
  bad = dict(tensors)
  bad[family.misshaped] = np.zeros((3, 5), np.float32)
  with pytest.raises(models.CheckpointError,
                     match=rf"'{short(family.misshaped)}' has shape \(3, 5\)"):
    fmt.convert(bad, config, str(ref["path"]))


# ---------------------------------------------------------------------------
# Presets of the published models.

# Totals published for the released checkpoints (model cards / hub file listings; tied
# embeddings counted once), written here independently of presets.HF_CONFIGS.
PUBLISHED_SIZES = {
    "Qwen/Qwen2.5-0.5B": 494_032_768, "Qwen/Qwen2.5-1.5B": 1_543_714_304,
    "Qwen/Qwen3-0.6B": 596_049_920, "google/gemma-2-2b": 2_614_341_888,
    "google/gemma-3-1b-pt": 999_885_952, "HuggingFaceTB/SmolLM2-135M": 134_515_008,
    "HuggingFaceTB/SmolLM2-360M": 361_821_120, "HuggingFaceTB/SmolLM2-1.7B": 1_711_376_384,
    "meta-llama/Llama-3.2-1B": 1_235_814_400, "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "mistralai/Mistral-7B-v0.3": 7_248_023_552, "EleutherAI/pythia-160m": 162_322_944,
    "EleutherAI/pythia-410m": 405_334_016, "EleutherAI/pythia-1b": 1_011_781_632,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
}


@pytest.mark.parametrize("model_id", sorted(HF_CONFIGS))
def test_preset_counts_equal_transformers_and_published(model_id):
  """num_params of each preset = torch's count of transformers' module built from the same
  config.json fields (meta device: no memory) = the published total where one is listed;
  the Flax module's own shapes agree (eval_shape)."""
  fields = dict(HF_CONFIGS[model_id])
  hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
  with torch.device("meta"):
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
  config = models.presets[model_id]
  n = models.num_params(config)
  assert n == sum(p.numel() for p in hf_model.parameters())
  assert n == PUBLISHED_SIZES.get(model_id, n)
  if model_id in ("google/gemma-3-1b-pt", "EleutherAI/pythia-160m"):
    shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
    assert models.count_params(shapes) == n


def test_flops_per_token_closed_form_one_preset_per_family():
  """6 N_mm + 12 sum_l H Dh K_l with N_mm written out by hand from the config values;
  K_l = T on full layers and min(T, W) on sliding ones (Mistral v0.1, Phi-3, Gemma)."""
  def mm(layers, d, q, kv, ff, vocab, mlp=3):
    return layers * (d * (q + 2 * kv) + q * d + mlp * d * ff) + vocab * d

  cases = {  # id: (T, N_mm, sum_l H Dh K_l)
      "Qwen/Qwen2.5-0.5B": (2048, mm(24, 896, 896, 128, 4864, 151936), 24 * 896 * 2048),
      "Qwen/Qwen3-0.6B": (2048, mm(28, 1024, 2048, 1024, 3072, 151936), 28 * 2048 * 2048),
      "meta-llama/Llama-3.2-1B": (4096, mm(16, 2048, 2048, 512, 8192, 128256),
                                  16 * 2048 * 4096),
      "mistralai/Mistral-7B-v0.1": (8192, mm(32, 4096, 4096, 1024, 14336, 32000),
                                    32 * 4096 * 4096),
      "EleutherAI/pythia-160m": (2048, mm(12, 768, 768, 768, 3072, 50304, mlp=2),
                                 12 * 768 * 2048),
      "microsoft/Phi-3-mini-4k-instruct": (4096, mm(32, 3072, 3072, 3072, 8192, 32064),
                                           32 * 3072 * 2047),
      "google/gemma-2-2b": (8192, mm(26, 2304, 2048, 1024, 9216, 256000),
                            2048 * (13 * 4096 + 13 * 8192)),
      "google/gemma-3-1b-pt": (4096, mm(26, 1152, 1024, 256, 6912, 262144),
                               1024 * (22 * 512 + 4 * 4096)),
  }
  for model_id, (seq_len, n_mm, span) in cases.items():
    config = models.presets[model_id]
    assert models.flops_per_token(config, seq_len) == pytest.approx(
        6 * n_mm + 12 * span, rel=1e-12), model_id
    assert models.flops_per_token(config, seq_len, training=False) == pytest.approx(
        2 * n_mm + 4 * span, rel=1e-12), model_id


# ---------------------------------------------------------------------------
# Downstream: NTK, NLPMetrics, finetune_sweep.


def _task_data(task, num, max_len):
  train, tok = task
  spec = textdata.local_task("t", str(train), input_field="src", target_field="tgt",
                             prompt="{input} =>", target_prefix=" ")
  examples = textdata.format_split(spec, [json.loads(x) for x in
                                          train.read_text().splitlines()[:num]])
  return textdata.encode_examples(examples, tok, max_len)


# The NTK helpers are generic over the module (logits and gradients are checked for every
# family above): three families with the most distinct code run by default, the rest slow.
_NTK_DEFAULT = ("gpt_neox", "phi3", "gemma2")


@pytest.mark.parametrize("name", [n if n in _NTK_DEFAULT else pytest.param(
    n, marks=pytest.mark.slow) for n in NAMES])
def test_ntk_outputs_and_kernel_match_torch(name, checkpoints, task):
  """lm_output_fn ("log_likelihood") and the empirical NTK J J^T, J from torch autograd."""
  ref = checkpoints[name]
  data = _task_data(task, 3, NTK_LEN)
  assert not data.attention_mask.all()  # right padding present
  x = {"input_ids": jnp.asarray(data.input_ids),
       "attention_mask": jnp.asarray(data.attention_mask),
       "loss_mask": jnp.asarray(data.loss_mask)}
  apply_fn = ntk.lm_output_fn(models.build(ref["config"]), "log_likelihood")
  theta = np.asarray(ntk.make_ntk_fn(apply_fn)(ref["params"], x), np.float64)
  ours = np.asarray(apply_fn(ref["params"], x))

  model = ref["model"]
  lp = local_hf.torch_token_log_probs(model, data.input_ids, data.attention_mask, data.targets)
  m = torch.as_tensor(data.loss_mask, dtype=torch.float64)
  ll = (lp * m).sum(1) / m.sum(1).clamp(min=1)
  rows = []
  for i in range(len(ll)):
    grads = torch.autograd.grad(ll[i], list(model.parameters()), retain_graph=True)
    rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
  jac = np.stack(rows)
  np.testing.assert_allclose(ours, ll.detach().numpy(), atol=1e-5)
  reference = jac @ jac.T
  np.testing.assert_allclose(theta, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("name", NAMES)
def test_nlp_metrics_analyse_every_linear_layer(name, checkpoints):
  """NLPMetrics sees exactly torch's nn.Linear weights (fused ones fused), with the alphas
  of power-law fits to their own eigenvalues."""
  ref = checkpoints[name]
  model = ref["model"]
  result = nlp_metrics.nlp_metrics(ref["params"], min_tail=5)
  embedding = model.get_input_embeddings().weight
  linear = [m.weight.detach().numpy() for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.weight is not embedding]
  theirs = [nlp_metrics.fit_power_law(nlp_metrics.empirical_spectral_density(
      w.T.astype(np.float64)), min_tail=5).alpha for w in linear if min(w.shape) > 5]
  assert len(result.alphas) == len(theirs) > 0
  np.testing.assert_allclose(sorted(result.alphas.values()), sorted(theirs), rtol=1e-6)


@pytest.mark.slow
def test_finetune_sweep_offline(checkpoints, task, tmp_path):
  """experiments.finetune_sweep on every family's local checkpoint and the local task: the
  zero-shot test loss equals torch's, sizes equal torch's parameter counts, and
  fine-tuning on 200 examples lowers the test loss (NTK snapshots off: checked above)."""
  train, tok = task
  train_cfg = dict(max_steps=4, eval_every=4, batch_size=8, eval_batch_size=20,
                   learning_rate=3e-3, warmup_steps=0)
  by_key, test = local_hf.offline_sweep([checkpoints[n]["path"] for n in NAMES], train, tok,
                                        tmp_path, SWEEP_LEN, train_cfg)
  assert set(by_key) == {(n, d) for n in NAMES for d in (0, 200)}
  for name in NAMES:
    model = checkpoints[name]["model"]
    with torch.no_grad():
      lp = local_hf.torch_token_log_probs(model, test.input_ids, test.attention_mask, test.targets)
      nll = float(-(lp * torch.as_tensor(test.loss_mask)).sum() / test.loss_mask.sum())
    zero_shot, tuned = by_key[(name, 0)], by_key[(name, 200)]
    assert zero_shot["test_loss"] == pytest.approx(nll, rel=1e-5), name
    assert zero_shot["size"] == sum(p.numel() for p in model.parameters()), name
    assert tuned["steps"] > 0 and tuned["test_loss"] < zero_shot["test_loss"], name
