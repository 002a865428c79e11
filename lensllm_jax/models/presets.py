"""Named model configurations: `presets`, the single dict of them.

Two kinds of entries:

* small development presets ("tiny-gpt2", "small-llama", ...): CPU-sized
  models for tests, smoke runs and synthetic experiments;
* the benchmark models of the public fine-tuning curves, keyed by their
  Hugging Face id exactly as in the curve files' first column
  (``presets["gpt2"]``, ``presets["facebook/opt-350m"]``, ...). They are
  written from the models' published config.json files (values noted per
  family below) and `num_params` of each equals the ``size`` column of the
  curve files (tests/models/test_model_zoo.py). Loading the real weights goes
  through `load_hf_checkpoint`; the presets give shapes, parameter counts and
  FLOPs without a download.
"""

from __future__ import annotations

from lensllm_jax.models.config import ModelConfig
from lensllm_jax.models.encdec_config import EncoderDecoderConfig

presets: dict[str, ModelConfig | EncoderDecoderConfig] = {
    # Fast on CPU: used by the tests and the smoke runs.
    "tiny-gpt2": ModelConfig(arch="gpt2", vocab_size=256, max_len=128, d_model=64,
                             n_layers=2, n_heads=4, d_ff=256),
    "tiny-llama": ModelConfig(arch="llama", vocab_size=256, max_len=128, d_model=64,
                              n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176),
    # A few million parameters: CPU-trainable in minutes.
    "small-gpt2": ModelConfig(arch="gpt2", vocab_size=8192, max_len=256, d_model=256,
                              n_layers=4, n_heads=4, d_ff=1024),
    "small-llama": ModelConfig(arch="llama", vocab_size=8192, max_len=256, d_model=256,
                               n_layers=4, n_heads=4, d_ff=704),
    # The published GPT-2 sizes (vocabulary and context of the released models).
    "gpt2-124m": ModelConfig(arch="gpt2", vocab_size=50257, max_len=1024, d_model=768,
                             n_layers=12, n_heads=12, d_ff=3072),
    "gpt2-355m": ModelConfig(arch="gpt2", vocab_size=50257, max_len=1024, d_model=1024,
                             n_layers=24, n_heads=16, d_ff=4096),
    # Llama-style model of GPT-2-small width (vocab of GPT-2's tokenizer).
    "llama-124m": ModelConfig(arch="llama", vocab_size=50257, max_len=1024, d_model=768,
                              n_layers=12, n_heads=12, d_ff=2048, tie_embeddings=True),
}


def _gpt2(vocab_size: int, max_len: int, d_model: int, n_layers: int, n_heads: int,
          activation: str = "gelu_new") -> ModelConfig:
  """A GPT2LMHeadModel: d_ff = 4 d (n_inner null), LayerNorm eps 1e-5, tied head."""
  return ModelConfig(arch="gpt2", vocab_size=vocab_size, max_len=max_len, d_model=d_model,
                     n_layers=n_layers, n_heads=n_heads, d_ff=4 * d_model, norm_eps=1e-5,
                     tie_embeddings=True, activation=activation)


# ---------------------------------------------------------------------------
# Decoder-only benchmark models (GPT-2 architecture).
#
# GPT-2 (openai-community/gpt2*, config.json): vocab_size 50257, n_positions
# 1024, activation_function "gelu_new"; (n_embd, n_layer, n_head) =
# (768, 12, 12), (1024, 24, 16), (1280, 36, 20), (1600, 48, 25).
# LaMini-GPT (MBZUAI/LaMini-GPT-*): GPT-2 fine-tuned with one added padding
# token, vocab_size 50258, otherwise the GPT-2 of the same size.
# Cerebras-GPT (cerebras/Cerebras-GPT-*): GPT-2 blocks with n_positions 2048,
# vocab_size 50257, n_inner 4 n_embd, activation_function "gelu" (exact);
# (n_embd, n_layer, n_head) = 111M (768, 10, 12), 256M (1088, 14, 17),
# 1.3B (2048, 24, 16), 2.7B (2560, 32, 32).
# mGPT (ai-forever/mGPT): GPT-2 blocks, vocab_size 100000, n_positions 2048,
# n_embd 2048, n_layer 24, n_head 16, "gelu_new".
_GPT2_SHAPES = {"124M": (768, 12, 12), "355M": (1024, 24, 16), "774M": (1280, 36, 20),
                "1.5B": (1600, 48, 25)}
presets["gpt2"] = _gpt2(50257, 1024, *_GPT2_SHAPES["124M"])
presets["gpt2-medium"] = _gpt2(50257, 1024, *_GPT2_SHAPES["355M"])
presets["gpt2-large"] = _gpt2(50257, 1024, *_GPT2_SHAPES["774M"])
presets["gpt2-xl"] = _gpt2(50257, 1024, *_GPT2_SHAPES["1.5B"])
for _size in ("124M", "774M", "1.5B"):
  presets[f"MBZUAI/LaMini-GPT-{_size}"] = _gpt2(50258, 1024, *_GPT2_SHAPES[_size])
for _size, _shape in (("111M", (768, 10, 12)), ("256M", (1088, 14, 17)),
                      ("1.3B", (2048, 24, 16)), ("2.7B", (2560, 32, 32))):
  presets[f"cerebras/Cerebras-GPT-{_size}"] = _gpt2(50257, 2048, *_shape, activation="gelu")
presets["ai-forever/mGPT"] = _gpt2(100000, 2048, 2048, 24, 16)

# ---------------------------------------------------------------------------
# Decoder-only benchmark models: OPT.
#
# OPT (facebook/opt-*, config.json): vocab_size 50272, max_position_embeddings
# 2048 (table of 2050 rows: offset 2), ffn_dim 4 hidden_size, "relu",
# enable_bias, tied lm_head, do_layer_norm_before true and
# word_embed_proj_dim = hidden_size except OPT-350m (do_layer_norm_before
# false: post-LN, no final LayerNorm; word_embed_proj_dim 512 with
# project_in/project_out). (hidden_size, num_hidden_layers,
# num_attention_heads) = 350m (1024, 24, 16), 1.3b (2048, 24, 32),
# 2.7b (2560, 32, 32), 6.7b (4096, 32, 32).
for _size, (_d, _layers, _heads) in (("350m", (1024, 24, 16)), ("1.3b", (2048, 24, 32)),
                                     ("2.7b", (2560, 32, 32)), ("6.7b", (4096, 32, 32))):
  _post_ln = _size == "350m"
  presets[f"facebook/opt-{_size}"] = ModelConfig(
      arch="opt", vocab_size=50272, max_len=2048, d_model=_d, n_layers=_layers, n_heads=_heads,
      d_ff=4 * _d, norm_eps=1e-5, word_embed_dim=512 if _post_ln else _d,
      pre_norm=not _post_ln, final_norm=not _post_ln, tie_embeddings=True, activation="relu")

# ---------------------------------------------------------------------------
# Decoder-only benchmark models: Phi.
#
# Phi (microsoft/phi-1_5, microsoft/phi-2, config.json, model_type "phi"):
# vocab_size 51200, max_position_embeddings 2048, rope_theta 10000,
# layer_norm_eps 1e-5, "gelu_new", intermediate_size 4 hidden_size, no
# qk_layernorm, untied lm_head with bias; phi-1_5: hidden_size 2048, 24
# layers, 32 heads (head 64), partial_rotary_factor 0.5 (32 rotated channels);
# phi-2: hidden_size 2560, 32 layers, 32 heads (head 80),
# partial_rotary_factor 0.4 (32 rotated channels).
for _name, _d, _layers, _rotary in (("phi-1_5", 2048, 24, 32), ("phi-2", 2560, 32, 32)):
  presets[f"microsoft/{_name}"] = ModelConfig(
      arch="phi", vocab_size=51200, max_len=2048, d_model=_d, n_layers=_layers, n_heads=32,
      d_ff=4 * _d, norm_eps=1e-5, rope_theta=10000.0, rotary_dim=_rotary,
      tie_embeddings=False, activation="gelu_new")

# ---------------------------------------------------------------------------
# Encoder-decoder benchmark models (`EncoderDecoderConfig`).
#
# T5 (t5-small, t5-base = google-t5/*, config.json): vocab_size 32128, d_kv 64,
# "relu", 32 buckets, max distance 128, tied head with the d^-0.5 rescale;
# (d_model, d_ff, num_layers, num_heads) = small (512, 2048, 6, 8),
# base (768, 3072, 12, 12).
# T5 v1.1 (google/t5-v1_1-base): vocab 32128, d_model 768, d_ff 2048, d_kv 64,
# 12 layers, 12 heads, "gated-gelu", tie_word_embeddings false (own lm_head).
# mT5 (google/mt5-*): as T5 v1.1 with vocab_size 250112; base (768, 2048, 12,
# 12), large (1024, 2816, 24, 16).
# Switch (google/switch-base-{8,16,32}): T5 v1.0 base blocks (d_model 768,
# d_ff 3072, d_kv 64, 12 + 12 layers, 12 heads, "relu", tied head) with
# num_sparse_encoder_layers = num_sparse_decoder_layers = 6 (every second
# block), expert_capacity 64, router z / aux loss coefficients 0.001. The size
# column counts ALL experts (total parameters, not the active ones).
# BART (facebook/bart-*, config.json): "gelu", max_position_embeddings 1024,
# scale_embedding false, pad 1, decoder start 2; base: d_model 768, 6 + 6
# layers, 12 heads, ffn 3072, vocab 50265; large: 1024, 12 + 12, 16 heads,
# ffn 4096, vocab 50265 (bart-large-cnn and bart-large-xsum: 50264).
# The size column of the BART rows is NOT the encoder-decoder's count: it is
# that of transformers' BartForCausalLM (the decoder stack, cross-attention
# weights included, tied head), i.e. the curves' authors loaded BART as a
# causal LM. The presets are therefore decoder_only=True (`BartCausalLM`);
# ``preset.replace(decoder_only=False)`` is the full encoder-decoder.
for _name, (_d, _ff, _layers, _heads) in (("t5-small", (512, 2048, 6, 8)),
                                          ("t5-base", (768, 3072, 12, 12))):
  presets[_name] = EncoderDecoderConfig(
      arch="t5", vocab_size=32128, d_model=_d, d_ff=_ff, n_layers=_layers, n_heads=_heads,
      head_dim=64, activation="relu", gated=False, tie_embeddings=True)
presets["google/t5-v1_1-base"] = EncoderDecoderConfig(
    arch="t5", vocab_size=32128, d_model=768, d_ff=2048, n_layers=12, n_heads=12, head_dim=64,
    activation="gelu_new", gated=True, tie_embeddings=False)
for _name, (_d, _ff, _layers, _heads) in (("base", (768, 2048, 12, 12)),
                                          ("large", (1024, 2816, 24, 16))):
  presets[f"google/mt5-{_name}"] = EncoderDecoderConfig(
      arch="mt5", vocab_size=250112, d_model=_d, d_ff=_ff, n_layers=_layers, n_heads=_heads,
      head_dim=64, activation="gelu_new", gated=True, tie_embeddings=False)
for _experts in (8, 16, 32):
  presets[f"google/switch-base-{_experts}"] = EncoderDecoderConfig(
      arch="switch", vocab_size=32128, d_model=768, d_ff=3072, n_layers=12, n_heads=12,
      head_dim=64, activation="relu", tie_embeddings=True, num_experts=_experts,
      expert_capacity=64, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6)
for _name, _vocab, (_d, _layers, _heads) in (
    ("bart-base", 50265, (768, 6, 12)), ("bart-large", 50265, (1024, 12, 16)),
    ("bart-large-cnn", 50264, (1024, 12, 16)), ("bart-large-xsum", 50264, (1024, 12, 16))):
  presets[f"facebook/{_name}"] = EncoderDecoderConfig(
      arch="bart", vocab_size=_vocab, d_model=_d, n_layers=_layers, n_heads=_heads,
      d_ff=4 * _d, max_len=1024, decoder_only=True)

# Tiny encoder-decoders for tests and smoke runs.
presets["tiny-t5"] = EncoderDecoderConfig(arch="t5", vocab_size=256, d_model=64, d_ff=128,
                                          n_layers=2, n_heads=4)
presets["tiny-bart"] = EncoderDecoderConfig(arch="bart", vocab_size=256, d_model=64, d_ff=128,
                                            n_layers=2, n_heads=4, max_len=128)

# ---------------------------------------------------------------------------
# Beyond the curve files: the small members of today's families, keyed by
# Hugging Face id. Each is the model's published config.json (the fields that
# shape the model, copied from the hub files) read by the same loader as a
# downloaded checkpoint (`hf.config_from_hf`), so a preset is exactly what
# `load_hf_checkpoint` makes of that model. tests/test_model_families.py checks
# num_params against transformers' own module built from the same dict and
# against the published totals.
_QWEN = dict(model_type="qwen2", vocab_size=151936, rms_norm_eps=1e-6, hidden_act="silu",
             rope_theta=1000000.0, use_sliding_window=False, tie_word_embeddings=True)
_SMOLLM2 = dict(model_type="llama", vocab_size=49152, max_position_embeddings=8192,
                rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True)
_PYTHIA = dict(model_type="gpt_neox", vocab_size=50304, max_position_embeddings=2048,
               rotary_pct=0.25, rotary_emb_base=10000, hidden_act="gelu", layer_norm_eps=1e-5,
               use_parallel_residual=True, tie_word_embeddings=False)
HF_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B": dict(_QWEN, hidden_size=896, intermediate_size=4864,
                              num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2, max_position_embeddings=32768),
    "Qwen/Qwen2.5-1.5B": dict(_QWEN, hidden_size=1536, intermediate_size=8960,
                              num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, max_position_embeddings=131072),
    "Qwen/Qwen3-0.6B": dict(_QWEN, model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                            head_dim=128, max_position_embeddings=40960),
    "Qwen/Qwen3-1.7B": dict(_QWEN, model_type="qwen3", hidden_size=2048, intermediate_size=6144,
                            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                            head_dim=128, max_position_embeddings=40960),
    "google/gemma-2-2b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
        layer_types=["sliding_attention", "full_attention"] * 13, tie_word_embeddings=True),
    "google/gemma-3-1b-pt": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 4
        + ["sliding_attention"] * 2, tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-135M": dict(_SMOLLM2, hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9,
                                       num_key_value_heads=3, rope_theta=100000.0),
    "HuggingFaceTB/SmolLM2-360M": dict(_SMOLLM2, hidden_size=960, intermediate_size=2560,
                                       num_hidden_layers=32, num_attention_heads=15,
                                       num_key_value_heads=5, rope_theta=100000.0),
    "HuggingFaceTB/SmolLM2-1.7B": dict(_SMOLLM2, hidden_size=2048, intermediate_size=8192,
                                       num_hidden_layers=24, num_attention_heads=32,
                                       num_key_value_heads=32, rope_theta=130000.0),
    "meta-llama/Llama-3.2-1B": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0,
                                               low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=8192),
        tie_word_embeddings=True),
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=32768, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False),
    "mistralai/Mistral-7B-v0.3": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=32768, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False),
    "EleutherAI/pythia-160m": dict(_PYTHIA, hidden_size=768, intermediate_size=3072,
                                   num_hidden_layers=12, num_attention_heads=12),
    "EleutherAI/pythia-410m": dict(_PYTHIA, hidden_size=1024, intermediate_size=4096,
                                   num_hidden_layers=24, num_attention_heads=16),
    "EleutherAI/pythia-1b": dict(_PYTHIA, hidden_size=2048, intermediate_size=8192,
                                 num_hidden_layers=16, num_attention_heads=8),
    "microsoft/Phi-3-mini-4k-instruct": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, hidden_act="silu", rope_theta=10000.0, rope_scaling=None,
        sliding_window=2047, tie_word_embeddings=False),
}


def _presets_from_hf_configs() -> None:
  from lensllm_jax.models.hf import config_from_hf  # local: hf registers the formats

  for model_id, fields in HF_CONFIGS.items():
    presets[model_id] = config_from_hf(fields, source=f"presets.HF_CONFIGS[{model_id!r}]")


_presets_from_hf_configs()
