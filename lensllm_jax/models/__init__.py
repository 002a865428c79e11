"""Flax causal language models (GPT-2 and Llama style) and their utilities.

Public API:
  ModelConfig, presets            configuration dataclass and named presets
  CausalLM                        flax.linen Module: ids [B, T] -> logits [B, T, V] float32
  init_params, block_names        random params; names of top-level parameter blocks
  count_params, num_params        params in a pytree; closed form from a config
  flops_per_token                 6 N + attention FLOPs convention (for cost / MFU)
  next_token_targets, token_log_probs, token_nll, sequence_log_likelihood, mean_token_nll
  load_hf_checkpoint, config_from_hf, convert_gpt2_weights, convert_llama_weights,
  load_tokenizer                  Hugging Face checkpoints and tokenizer.json
"""

from lensllm_jax.models.config import ModelConfig, presets
from lensllm_jax.models.hf import (
    CheckpointError,
    config_from_hf,
    convert_gpt2_weights,
    convert_llama_weights,
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
)
from lensllm_jax.models.model import (
    CausalLM,
    block_names,
    count_params,
    flops_per_token,
    init_params,
    num_params,
)

__all__ = [
    "CausalLM",
    "CheckpointError",
    "ModelConfig",
    "block_names",
    "config_from_hf",
    "convert_gpt2_weights",
    "convert_llama_weights",
    "count_params",
    "flops_per_token",
    "init_params",
    "load_hf_checkpoint",
    "load_tokenizer",
    "mean_token_nll",
    "next_token_targets",
    "num_params",
    "presets",
    "read_safetensors",
    "sequence_log_likelihood",
    "token_log_probs",
    "token_nll",
]
