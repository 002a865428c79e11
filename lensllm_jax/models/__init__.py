"""Flax language models of every supported architecture and their utilities.

Public API (one entry point for every architecture; see `registry`):
  build(config)                   the flax.linen Module of a config; a decoder-only
                                  model maps ids [B, T] -> float32 logits [B, T, V]:
                                  build(config).apply({"params": p}, ids, attention_mask=m)
  load_hf_checkpoint(dir)         (config, params) from a Hugging Face checkpoint,
                                  dispatching on config.json's model_type
  config_from_dict(fields)        ModelConfig / EncoderDecoderConfig from its fields (a
                                  saved models/<model>.json), by fields["arch"]
  init_params, num_params, flops_per_token, block_names
                                  random params; closed-form count; FLOPs per token
                                  (6 N + attention); top-level parameter block names
  presets                         named configs: development sizes, the benchmark
                                  models and today's small models keyed by Hugging
                                  Face id ("gpt2", "Qwen/Qwen2.5-0.5B", ...)
  ModelConfig                     decoder-only config (config.is_encoder_decoder is False)
  CausalLM                        the decoder-only Flax module (archs gpt2, opt, phi, gpt_neox
                                  and the Llama family: llama, qwen2, qwen3, mistral, phi3,
                                  gemma2, gemma3)
  EncoderDecoderConfig            T5 / mT5 / Switch / BART config (archs t5, mt5, switch,
                                  bart; is_encoder_decoder except decoder-only BART)
  shift_right, seq2seq_logits, seq2seq_loss, switch_router_losses
                                  teacher forcing and the target-token loss of an
                                  encoder-decoder (build(config).apply({"params": p}, ids,
                                  attention_mask=m, decoder_input_ids=shift_right(y, config),
                                  decoder_attention_mask=ym) -> [B, T_dec, V] float32)
  count_params                    params in a pytree
  next_token_targets, token_log_probs, token_nll, sequence_log_likelihood, mean_token_nll,
  token_nll_sums                  the LM loss convention (see `losses`)
  config_from_hf, convert_gpt2_weights, convert_llama_weights, convert_opt_weights,
  convert_phi_weights, convert_gpt_neox_weights, convert_t5_weights, convert_bart_weights,
  read_safetensors, load_bart_causal_lm
  load_tokenizer                  Hugging Face config.json, tensors and tokenizer.json
  CheckpointError                 `errors.CheckpointError`: a checkpoint (config.json,
                                  weights, tokenizer) missing, corrupt or unsupported
  ARCHITECTURES, HF_FORMATS, register_architecture, register_hf_format
                                  the registries a new family adds itself to

Modules:
  registry       the one entry point: build, init, count, FLOPs, load (the registries
                 that model, encdec, hf and encdec_hf fill)
  config         ModelConfig of the decoder-only models
  layers         blocks shared by the decoder-only families
  gpt2           GPT-2 block
  llama          Llama block
  opt            OPT block
  phi            Phi block (phi-1.5, phi-2)
  model          CausalLM, the decoder-only module
  losses         token losses and log-likelihoods of a causal LM
  encdec_config  EncoderDecoderConfig (T5, mT5, T5 v1.1, Switch, BART)
  t5             T5 / mT5 / T5 v1.1 / Switch encoder-decoders
  bart           BART encoder-decoder and decoder-only
  encdec         encoder-decoder families in the registry, shift-right, seq2seq loss
  hf             Hugging Face checkpoints (config.json, safetensors, tokenizer.json)
  encdec_hf      Hugging Face checkpoints of the encoder-decoders
  presets        named configurations, keyed by Hugging Face id for hub models
"""

from lensllm_jax.models.config import ModelConfig
from lensllm_jax.models.encdec import (
    seq2seq_logits,
    seq2seq_loss,
    shift_right,
    switch_router_losses,
)
from lensllm_jax.models.encdec_config import EncoderDecoderConfig
from lensllm_jax.models.encdec_hf import (
    convert_bart_weights,
    convert_t5_weights,
    load_bart_causal_lm,
)
from lensllm_jax.models.hf import (
    CheckpointError,
    config_from_hf,
    convert_gpt2_weights,
    convert_gpt_neox_weights,
    convert_llama_weights,
    convert_opt_weights,
    convert_phi_weights,
    load_hf_checkpoint,
    load_tokenizer,
    read_safetensors,
)
from lensllm_jax.models.losses import (
    mean_token_nll,
    next_token_targets,
    sequence_log_likelihood,
    token_log_probs,
    token_nll,
    token_nll_sums,
)
from lensllm_jax.models.model import CausalLM, count_params
from lensllm_jax.models.presets import presets
from lensllm_jax.models.registry import (
    ARCHITECTURES,
    HF_FORMATS,
    block_names,
    build,
    config_from_dict,
    flops_per_token,
    init_params,
    num_params,
    register_architecture,
    register_hf_format,
)

__all__ = [
    "ARCHITECTURES",
    "HF_FORMATS",
    "CausalLM",
    "CheckpointError",
    "EncoderDecoderConfig",
    "ModelConfig",
    "block_names",
    "build",
    "config_from_dict",
    "config_from_hf",
    "convert_bart_weights",
    "convert_gpt2_weights",
    "convert_gpt_neox_weights",
    "convert_llama_weights",
    "convert_opt_weights",
    "convert_phi_weights",
    "convert_t5_weights",
    "count_params",
    "flops_per_token",
    "init_params",
    "load_bart_causal_lm",
    "load_hf_checkpoint",
    "load_tokenizer",
    "mean_token_nll",
    "token_nll_sums",
    "next_token_targets",
    "num_params",
    "presets",
    "read_safetensors",
    "register_architecture",
    "register_hf_format",
    "seq2seq_logits",
    "seq2seq_loss",
    "sequence_log_likelihood",
    "shift_right",
    "switch_router_losses",
    "token_log_probs",
    "token_nll",
]
