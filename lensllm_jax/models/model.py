"""`CausalLM`: the Flax decoder-only language model (registered archs "gpt2", "llama").

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
from lensllm_jax.models.gpt2 import INIT_STD, GPT2Block
from lensllm_jax.models.llama import LlamaBlock


def _block_names(config: ModelConfig) -> tuple[str, ...]:
  """Names of the top-level parameter blocks of `CausalLM(config)`, input to output."""
  if config.arch == "gpt2":
    names = ["wte", "wpe"] + [f"h_{i}" for i in range(config.n_layers)] + ["ln_f"]
  else:
    names = ["embed"] + [f"layers_{i}" for i in range(config.n_layers)] + ["norm"]
  if not config.tie_embeddings:
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
        Hugging Face does without explicit position_ids). With left padding,
        pass e.g. cumsum(mask) - 1 clipped at 0.
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
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    mask = layers.attention_mask_bias(attention_mask, batch, length)
    dtype = jnp.dtype(c.dtype)
    drop = nn.Dropout(c.dropout_rate)
    init = nn.initializers.normal(INIT_STD)
    if c.arch == "gpt2":
      wte = nn.Embed(c.vocab_size, c.d_model, dtype=jnp.float32, embedding_init=init, name="wte")
      wpe = nn.Embed(c.max_len, c.d_model, dtype=jnp.float32, embedding_init=init, name="wpe")
      x = drop(wte(input_ids) + wpe(positions), deterministic=deterministic)
      for i in range(c.n_layers):
        x = GPT2Block(c, name=f"h_{i}")(x, mask, deterministic)
      h = layers.layer_norm(c.norm_eps, "ln_f")(x)
      embed = wte
    else:
      embed = nn.Embed(c.vocab_size, c.d_model, dtype=jnp.float32, embedding_init=init,
                       name="embed")
      x = drop(embed(input_ids), deterministic=deterministic)
      cos, sin = layers.rotary_angles(positions, c.head_dim, c.rope_theta)
      for i in range(c.n_layers):
        x = LlamaBlock(c, name=f"layers_{i}")(x, mask, cos, sin, deterministic)
      h = layers.RMSNorm(c.norm_eps, jnp.float32, name="norm")(x)
    if c.tie_embeddings:
      return layers.tied_logits(h, embed.embedding, dtype)
    return layers.Unembed(c.vocab_size, dtype, name="lm_head")(h)


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def _matmul_params(c: ModelConfig) -> int:
  """Entries of the weight matrices used in a matmul per token (incl. the output head)."""
  q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  if c.arch == "gpt2":
    per_layer = c.d_model * 3 * q_dim + q_dim * c.d_model + 2 * c.d_model * c.d_ff
  else:
    per_layer = (c.d_model * (q_dim + 2 * kv_dim) + q_dim * c.d_model
                 + 3 * c.d_model * c.d_ff)
  return c.n_layers * per_layer + c.vocab_size * c.d_model


def _num_params(config: ModelConfig) -> int:
  """Closed-form parameter count of `CausalLM(config)`.

  gpt2:  V d + max_len d + L (4d + 3d^2 + 3d + d^2 + d + 2 d d_ff + d_ff + d) + 2d
         (+ V d if untied);
  llama: V d + L (2d + d (H + 2K) Dh + H Dh d + 3 d d_ff) + d (+ V d if untied).
  """
  c = config
  d = c.d_model
  total = _matmul_params(c)
  if not c.tie_embeddings:
    total += c.vocab_size * d  # separate token embedding (a tied head is counted once)
  if c.arch == "gpt2":
    total += c.max_len * d + c.n_layers * (4 * d + 3 * d + d + c.d_ff + d) + 2 * d
  else:
    total += c.n_layers * 2 * d + d
  return int(total)


def _attention_width(c: ModelConfig) -> int:
  return c.n_layers * c.n_heads * c.head_dim


def _dummy_inputs(c: ModelConfig, length: int) -> tuple:
  return (jnp.zeros((1, length), jnp.int32),)


for _arch in ("gpt2", "llama"):
  registry.register_architecture(registry.Architecture(
      name=_arch, build=CausalLM, dummy_inputs=_dummy_inputs, num_params=_num_params,
      matmul_params=_matmul_params, attention_width=_attention_width,
      block_names=_block_names))
