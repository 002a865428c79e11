"""`CausalLM`: the Flax decoder-only language model (archs "gpt2", "llama", "opt", "phi").

Top-level parameter blocks (stable names; the Hessian/NTK helpers partition
parameters by these top-level Flax submodules):

    arch="gpt2":  "wte" (token embedding, {"embedding": [V, d]}),
                  "wpe" (position embedding, {"embedding": [max_len, d]}),
                  "h_0" ... "h_{L-1}" (blocks, see `gpt2`), "ln_f" (final LayerNorm),
                  "lm_head" ({"kernel": [d, V]}) only if tie_embeddings=False.
    arch="llama": "embed" ({"embedding": [V, d]}),
                  "layers_0" ... "layers_{L-1}" (blocks, see `llama`),
                  "norm" (final RMSNorm, {"scale": [d]}),
                  "lm_head" ({"kernel": [d, V]}) unless tie_embeddings=True.
    arch="opt":   "embed_tokens" ({"embedding": [V, e]}, e = word_embed_dim),
                  "embed_positions" ({"embedding": [max_len + 2, d]}),
                  "project_in" ({"kernel": [e, d]}) only if e != d,
                  "layers_0" ... "layers_{L-1}" (blocks, see `opt`),
                  "final_layer_norm" only if final_norm,
                  "project_out" ({"kernel": [d, e]}) only if e != d; tied head.
    arch="phi":   "embed_tokens" ({"embedding": [V, d]}),
                  "layers_0" ... "layers_{L-1}" (blocks, see `phi`),
                  "final_layernorm", "lm_head" ({"kernel": [d, V], "bias": [V]}).

Example:

    config = presets["tiny-gpt2"]
    model = build(config)        # the registry entry point; CausalLM(config) here
    variables = model.init(jax.random.key(0), jnp.zeros((2, 16), jnp.int32))
    logits = model.apply(variables, ids, attention_mask=mask)   # [2, 16, V] float32
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lensllm_jax.models import layers, registry
from lensllm_jax.models.config import ModelConfig
from lensllm_jax.models.gpt2 import GPT2Block
from lensllm_jax.models.llama import LlamaBlock
from lensllm_jax.models.opt import OPTBlock
from lensllm_jax.models.phi import PhiBlock

# OPT looks its learned positions up at position + 2 (fairseq's padding offset).
OPT_POSITION_OFFSET = 2


def _block_names(config: ModelConfig) -> tuple[str, ...]:
  """Names of the top-level parameter blocks of `CausalLM(config)`, input to output."""
  c = config
  blocks = [f"layers_{i}" for i in range(c.n_layers)]
  if c.arch == "gpt2":
    names = ["wte", "wpe"] + [f"h_{i}" for i in range(c.n_layers)] + ["ln_f"]
  elif c.arch == "llama":
    names = ["embed", *blocks, "norm"]
  elif c.arch == "opt":
    projected = c.word_embed_dim != c.d_model
    names = (["embed_tokens", "embed_positions"] + ["project_in"] * projected + blocks
             + ["final_layer_norm"] * c.final_norm + ["project_out"] * projected)
  else:
    names = ["embed_tokens", *blocks, "final_layernorm"]
  if not c.tie_embeddings:
    names.append("lm_head")
  return tuple(names)


class CausalLM(nn.Module):
  """Decoder-only language model: input ids [B, T] -> next-token logits [B, T, V].

  Logits at position t are a function of input_ids[:, :t+1] only (causal),
  restricted to positions where attention_mask is 1. Parameters are float32,
  matmuls run in ``config.dtype``, norms/softmax/logits in float32.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """Computes the logits.

    Args:
      input_ids: [B, T] int token ids, T <= config.max_len.
      attention_mask: [B, T], 1 for real tokens and 0 for padding (keys at
        padded positions are never attended to; outputs at padded positions
        are meaningless and should be masked out of losses). None = no padding.
      positions: [B, T] int position ids; default 0..T-1 in every row (as
        Hugging Face does without explicit position_ids), except for OPT,
        whose default is Hugging Face OPT's: cumsum(mask) * mask - 1 (the
        first real token of a left-padded row is position 0, padding -1).
        With left padding and the other archs, pass e.g. cumsum(mask) - 1
        clipped at 0.
      deterministic: if False, applies dropout (needs rngs={"dropout": key}).

    Returns:
      [B, T, V] float32 logits.
    """
    c = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    batch, length = input_ids.shape
    if length > c.max_len:
      raise ValueError(f"input length {length} exceeds ModelConfig.max_len={c.max_len}")
    if positions is None:
      positions = _default_positions(c, attention_mask, batch, length)
    mask = layers.attention_mask_bias(attention_mask, batch, length)
    dtype = jnp.dtype(c.dtype)
    drop = nn.Dropout(c.dropout_rate)
    init = nn.initializers.normal(layers.INIT_STD)

    def embed(rows, width, name):
      return nn.Embed(rows, width, dtype=jnp.float32, embedding_init=init, name=name)

    if c.arch == "gpt2":
      tokens = embed(c.vocab_size, c.d_model, "wte")
      x = drop(tokens(input_ids) + embed(c.max_len, c.d_model, "wpe")(positions),
               deterministic=deterministic)
      for i in range(c.n_layers):
        x = GPT2Block(c, name=f"h_{i}")(x, mask, deterministic)
      h = layers.layer_norm(c.norm_eps, "ln_f")(x)
    elif c.arch == "llama":
      tokens = embed(c.vocab_size, c.d_model, "embed")
      x = drop(tokens(input_ids), deterministic=deterministic)
      cos, sin = layers.rotary_angles(positions, c.rotary_dim, c.rope_theta)
      for i in range(c.n_layers):
        x = LlamaBlock(c, name=f"layers_{i}")(x, mask, cos, sin, deterministic)
      h = layers.RMSNorm(c.norm_eps, jnp.float32, name="norm")(x)
    elif c.arch == "opt":
      tokens = embed(c.vocab_size, c.word_embed_dim, "embed_tokens")
      x = tokens(input_ids)
      projected = c.word_embed_dim != c.d_model
      if projected:
        x = layers.dense(c.d_model, dtype, "project_in", use_bias=False)(x.astype(dtype))
      table = embed(c.max_len + OPT_POSITION_OFFSET, c.d_model, "embed_positions")
      x = drop(x.astype(jnp.float32) + table(positions + OPT_POSITION_OFFSET),
               deterministic=deterministic)
      for i in range(c.n_layers):
        x = OPTBlock(c, name=f"layers_{i}")(x, mask, deterministic)
      h = layers.layer_norm(c.norm_eps, "final_layer_norm")(x) if c.final_norm else x
      if projected:
        h = layers.dense(c.word_embed_dim, dtype, "project_out", use_bias=False)(h.astype(dtype))
    else:
      tokens = embed(c.vocab_size, c.d_model, "embed_tokens")
      x = drop(tokens(input_ids), deterministic=deterministic)
      cos, sin = layers.rotary_angles(positions, c.rotary_dim, c.rope_theta)
      for i in range(c.n_layers):
        x = PhiBlock(c, name=f"layers_{i}")(x, mask, cos, sin, deterministic)
      h = layers.layer_norm(c.norm_eps, "final_layernorm")(x)
    if c.tie_embeddings:
      return layers.tied_logits(h, tokens.embedding, dtype)
    return layers.Unembed(c.vocab_size, dtype, use_bias=c.arch == "phi", name="lm_head")(h)


def _default_positions(c: ModelConfig, attention_mask: jax.Array | None, batch: int,
                       length: int) -> jax.Array:
  """Position ids when none are given: 0..T-1, or Hugging Face OPT's mask-derived ones."""
  if c.arch == "opt" and attention_mask is not None:
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask - 1
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def _matmul_params(c: ModelConfig) -> int:
  """Entries of the weight matrices used in a matmul per token (incl. the output head).

  L (d (H + 2K) Dh + H Dh d + m d d_ff) + [2 e d if e != d] + V e, with m = 3
  for llama's SwiGLU and 2 otherwise, e = word_embed_dim (= d except OPT-350m).
  """
  q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  mlp_mats = 3 if c.arch == "llama" else 2
  per_layer = c.d_model * (q_dim + 2 * kv_dim) + q_dim * c.d_model + mlp_mats * c.d_model * c.d_ff
  e = c.word_embed_dim
  projections = 2 * e * c.d_model if e != c.d_model else 0
  return c.n_layers * per_layer + projections + c.vocab_size * e


def _num_params(config: ModelConfig) -> int:
  """Closed-form parameter count of `CausalLM(config)` (a tied head counted once).

  N = N_mm (`_matmul_params`) + V e (token embedding, if untied) + position table
  (gpt2: max_len d; opt: (max_len + 2) d) + per layer biases ((H + 2K) Dh + d + d_ff
  + d; none for llama) and norms (LayerNorm 2d each: gpt2, opt 2 per layer, phi 1;
  RMSNorm d each: llama 2 per layer) + final norm (gpt2, phi, opt if final_norm: 2d;
  llama: d) + the output bias V (phi).
  """
  c = config
  d = c.d_model
  total = _matmul_params(c)
  if not c.tie_embeddings:
    total += c.vocab_size * c.word_embed_dim  # separate token embedding
  total += {"gpt2": c.max_len * d, "opt": (c.max_len + OPT_POSITION_OFFSET) * d}.get(c.arch, 0)
  if c.arch != "llama":
    total += c.n_layers * ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim + d + c.d_ff + d)
  norms_per_layer, final = {"gpt2": (4 * d, 2 * d), "llama": (2 * d, d), "phi": (2 * d, 2 * d),
                            "opt": (4 * d, 2 * d * c.final_norm)}[c.arch]
  total += c.n_layers * norms_per_layer + final
  if c.arch == "phi":
    total += c.vocab_size  # lm_head bias
  return int(total)


def _attention_width(c: ModelConfig) -> int:
  return c.n_layers * c.n_heads * c.head_dim


def _dummy_inputs(c: ModelConfig, length: int) -> tuple:
  return (jnp.zeros((1, length), jnp.int32),)


for _arch in ("gpt2", "llama", "opt", "phi"):
  registry.register_architecture(registry.Architecture(
      name=_arch, build=CausalLM, dummy_inputs=_dummy_inputs, num_params=_num_params,
      matmul_params=_matmul_params, attention_width=_attention_width,
      block_names=_block_names))
