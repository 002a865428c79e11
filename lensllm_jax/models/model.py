"""`CausalLM`: the Flax decoder-only language model (archs "gpt2", "opt", "phi", "gpt_neox"
and the Llama family: "llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3").

Top-level parameter blocks (stable names; the Hessian/NTK helpers partition
parameters by these top-level Flax submodules):

    arch="gpt2":  "wte" (token embedding, {"embedding": [V, d]}),
                  "wpe" (position embedding, {"embedding": [max_len, d]}),
                  "h_0" ... "h_{L-1}" (blocks, see `gpt2`), "ln_f" (final LayerNorm),
                  "lm_head" ({"kernel": [d, V]}) only if tie_embeddings=False.
    Llama family: "embed" ({"embedding": [V, d]}),
                  "layers_0" ... "layers_{L-1}" (blocks, see `llama`),
                  "norm" (final RMSNorm, {"scale": [d]}),
                  "lm_head" ({"kernel": [d, V]}) unless tie_embeddings=True.
    arch="opt":   "embed_tokens" ({"embedding": [V, e]}, e = word_embed_dim),
                  "embed_positions" ({"embedding": [max_len + 2, d]}),
                  "project_in" ({"kernel": [e, d]}) only if e != d,
                  "layers_0" ... "layers_{L-1}" (blocks, see `opt`),
                  "final_layer_norm" only if final_norm,
                  "project_out" ({"kernel": [d, e]}) only if e != d; tied head.
    arch="phi", "gpt_neox":
                  "embed_tokens" ({"embedding": [V, d]}),
                  "layers_0" ... "layers_{L-1}" (blocks, see `phi`),
                  "final_layernorm", "lm_head" ({"kernel": [d, V]}, phi: + "bias" [V]).

Example:

    config = presets["tiny-gpt2"]
    model = build(config)        # the registry entry point; CausalLM(config) here
    variables = model.init(jax.random.key(0), jnp.zeros((2, 16), jnp.int32))
    logits = model.apply(variables, ids, attention_mask=mask)   # [2, 16, V] float32
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.models import layers, losses, registry
from lensllm_jax.models.config import LLAMA_FAMILY, ModelConfig
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
  elif c.arch in LLAMA_FAMILY:
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
               positions: jax.Array | None = None, deterministic: bool = True,
               targets: jax.Array | None = None, loss_mask: jax.Array | None = None):
    """Computes the logits, or with ``targets`` the LM loss sums.

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
      targets, loss_mask: [B, T] ints and [B, T] floats, or None (the default).

    Returns:
      [B, T, V] float32 logits; with targets, `losses.token_nll_sums(logits, targets,
      loss_mask)` (two float32 scalars) computed by `losses.head_token_nll_sums`,
      which never writes the [B T, V] logits (the training and evaluation steps;
      reverse mode only: jvp and Hessian-vector products take the logits).
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
    elif c.arch in LLAMA_FAMILY:
      tokens = embed(c.vocab_size, c.d_model, "embed")
      x = tokens(input_ids)
      if c.embed_scale:
        x = x * jnp.float32(math.sqrt(c.d_model))
      x = layers.token_rows(drop(x, deterministic=deterministic))
      tables = rope_tables(c, positions)
      masks = {"full_attention": mask}
      if c.sliding_window is not None:
        masks["sliding_attention"] = layers.sliding_window_mask(mask, c.sliding_window)
      for i, kind in enumerate(c.layer_types):
        x = LlamaBlock(c, name=f"layers_{i}")(x, masks[kind], *tables[kind], deterministic)
      h = layers.RMSNorm(c.norm_eps, jnp.float32, c.norm_offset, name="norm")(x)
    elif c.arch == "opt":
      tokens = embed(c.vocab_size, c.word_embed_dim, "embed_tokens")
      x = tokens(input_ids)
      projected = c.word_embed_dim != c.d_model
      if projected:
        x = layers.dense(c.d_model, dtype, "project_in", use_bias=False)(x.astype(dtype))
      table = embed(c.max_len + OPT_POSITION_OFFSET, c.d_model, "embed_positions")
      x = drop(x.astype(jnp.float32) + table(positions + OPT_POSITION_OFFSET),
               deterministic=deterministic)
      x = layers.token_rows(x)
      for i in range(c.n_layers):
        x = OPTBlock(c, name=f"layers_{i}")(x, mask, deterministic)
      h = layers.layer_norm(c.norm_eps, "final_layer_norm")(x) if c.final_norm else x
      if projected:
        h = layers.dense(c.word_embed_dim, dtype, "project_out", use_bias=False)(h.astype(dtype))
    else:
      tokens = embed(c.vocab_size, c.d_model, "embed_tokens")
      x = layers.token_rows(drop(tokens(input_ids), deterministic=deterministic))
      cos, sin = layers.rotary_angles(positions, c.rotary_dim, c.rope_theta)
      for i in range(c.n_layers):
        x = PhiBlock(c, name=f"layers_{i}")(x, mask, cos, sin, deterministic)
      h = layers.layer_norm(c.norm_eps, "final_layernorm")(x)
    h = h.reshape(batch, length, -1)  # the stacks other than GPT-2 run on rows [B T, d]
    head = (None if c.tie_embeddings else
            layers.Unembed(c.vocab_size, dtype, use_bias=c.arch == "phi", name="lm_head"))
    if targets is not None:
      if head is not None:
        return head(h, targets, loss_mask, c.final_softcap)
      return losses.head_token_nll_sums(h, targets, loss_mask, embedding=tokens.embedding,
                                        softcap=c.final_softcap, dtype=dtype)
    logits = layers.tied_logits(h, tokens.embedding, dtype) if head is None else head(h)
    return layers.soft_cap(logits, c.final_softcap)


def rope_tables(c: ModelConfig, positions: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
  """cos/sin tables [B, T, rotary_dim] of a Llama-family model per layer type.

  Full-attention layers: RoPE with base rope_theta and the config's
  rope_type; sliding layers: the same, or plain RoPE with base
  rope_local_theta when that is set (Gemma 3). LongRoPE picks the long
  factors when the largest position + 1 exceeds rope_original_max_len (as
  transformers does per forward call).
  """
  dim = c.rotary_dim
  inv_freq = layers.rope_inv_freq(dim, c.rope_theta)
  scale = 1.0
  if c.rope_type == "linear":
    inv_freq = inv_freq / np.float32(c.rope_factor)
  elif c.rope_type == "llama3":
    inv_freq = layers.llama3_inv_freq(inv_freq, c.rope_factor, c.rope_low_freq_factor,
                                      c.rope_high_freq_factor, c.rope_original_max_len)
  elif c.rope_type == "longrope":
    orig = c.rope_original_max_len
    long = jnp.max(positions) + 1 > orig
    factors = jnp.where(long, jnp.asarray(c.rope_long_factor, jnp.float32),
                        jnp.asarray(c.rope_short_factor, jnp.float32))
    inv_freq = jnp.asarray(inv_freq) / factors
    if c.rope_factor > 1.0:
      scale = math.sqrt(1 + math.log(c.rope_factor) / math.log(orig))
  full = layers.rotary_angles(positions, dim, c.rope_theta, inv_freq, scale)
  if c.rope_local_theta is None:
    return {"full_attention": full, "sliding_attention": full}
  return {"full_attention": full,
          "sliding_attention": layers.rotary_angles(positions, dim, c.rope_local_theta)}


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
  for the Llama family's gated MLP and 2 otherwise, e = word_embed_dim (= d
  except OPT-350m). Fused projections (phi3, gpt_neox) hold the same entries.
  """
  q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  mlp_mats = 3 if c.arch in LLAMA_FAMILY else 2
  per_layer = c.d_model * (q_dim + 2 * kv_dim) + q_dim * c.d_model + mlp_mats * c.d_model * c.d_ff
  e = c.word_embed_dim
  projections = 2 * e * c.d_model if e != c.d_model else 0
  return c.n_layers * per_layer + projections + c.vocab_size * e


def _num_params(config: ModelConfig) -> int:
  """Closed-form parameter count of `CausalLM(config)` (a tied head counted once).

  N = N_mm (`_matmul_params`) + V e (token embedding, if untied) + position table
  (gpt2: max_len d; opt: (max_len + 2) d) + per layer biases ((H + 2K) Dh + d + d_ff
  + d; Llama family: (H + 2K) Dh with qkv_bias, else none) and norms (LayerNorm 2d
  each: gpt2, opt, gpt_neox 2 per layer, phi 1; RMSNorm d each: Llama family 2 per
  layer, 4 with sandwich_norms, + 2 Dh with qk_norm) + final norm (gpt2, phi,
  gpt_neox, opt if final_norm: 2d; Llama family: d) + the output bias V (phi).
  """
  c = config
  d = c.d_model
  total = _matmul_params(c)
  if not c.tie_embeddings:
    total += c.vocab_size * c.word_embed_dim  # separate token embedding
  total += {"gpt2": c.max_len * d, "opt": (c.max_len + OPT_POSITION_OFFSET) * d}.get(c.arch, 0)
  qkv_biases = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
  if c.arch in LLAMA_FAMILY:
    per_layer = qkv_biases * c.qkv_bias + (4 if c.sandwich_norms else 2) * d
    per_layer += 2 * c.head_dim * c.qk_norm
    total += c.n_layers * per_layer + d
    return int(total)
  total += c.n_layers * (qkv_biases + d + c.d_ff + d)
  norms_per_layer, final = {"gpt2": (4 * d, 2 * d), "phi": (2 * d, 2 * d),
                            "gpt_neox": (4 * d, 2 * d),
                            "opt": (4 * d, 2 * d * c.final_norm)}[c.arch]
  total += c.n_layers * norms_per_layer + final
  if c.arch == "phi":
    total += c.vocab_size  # lm_head bias
  return int(total)


def _attention_span(c: ModelConfig, seq_len: int) -> int:
  """sum over layers of H Dh K_l: K_l = T keys per query, min(T, W) on sliding layers."""
  types = c.layer_types or ("full_attention",) * c.n_layers
  keys = [min(seq_len, c.sliding_window) if t == "sliding_attention" else seq_len
          for t in types]
  return c.n_heads * c.head_dim * sum(keys)


def _dummy_inputs(c: ModelConfig, length: int) -> tuple:
  return (jnp.zeros((1, length), jnp.int32),)


for _arch in ("gpt2", "opt", "phi", "gpt_neox") + LLAMA_FAMILY:
  registry.register_architecture(registry.Architecture(
      name=_arch, build=CausalLM, dummy_inputs=_dummy_inputs, num_params=_num_params,
      matmul_params=_matmul_params, attention_span=_attention_span,
      block_names=_block_names))
