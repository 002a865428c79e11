"""BART: encoder-decoder (`BartModel`) and decoder-only (`BartCausalLM`).

Shapes: B batch, S encoder length, T decoder length, d model width, f MLP
width, V vocabulary, P = max_len + 2 position rows.

Embeddings: x = scale * E[ids] + P[pos + 2] (scale = sqrt(d) if
``scale_embedding`` else 1; the position table has 2 extra leading rows, the
offset of fairseq), then LayerNorm ("layernorm_embedding"). Blocks are
post-LayerNorm with biases everywhere: x = LN(x + attn(x)), [decoder:
x = LN(x + cross_attn(x, enc))], x = LN(x + fc2(gelu(fc1 x))), on the token rows [B S or B T, d] of the residual
stream (`layers.token_rows`). No final norm.
Logits = h E^T (+ final_logits_bias for the encoder-decoder).

Top-level parameter blocks of `BartModel`:

    "shared"                               {"embedding": [V, d]}
    "encoder_embed_positions"              {"embedding": [P, d]}
    "encoder_layernorm_embedding"          {"scale", "bias"}
    "encoder_layers_0" ... _{L-1}          self_attn/{q_proj,k_proj,v_proj,out_proj}/{kernel, bias},
                                           self_attn_layer_norm, fc1, fc2, final_layer_norm
    "decoder_embed_positions", "decoder_layernorm_embedding"
    "decoder_layers_0" ... _{L'-1}         as the encoder's plus encoder_attn/..., encoder_attn_layer_norm
    "final_logits_bias"                    [V] (a buffer in transformers, a parameter here)

`BartCausalLM` (transformers' BartForCausalLM, the module whose parameter
count the benchmark files report for the BART models) has "embed_tokens",
"embed_positions", "layernorm_embedding" and "layers_0" ... "layers_{L'-1}";
its blocks keep their cross-attention weights (they are in the checkpoint and
in that count) but never use them, so they get zero gradient.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lensllm_jax.models import layers
from lensllm_jax.models.encdec_config import EncoderDecoderConfig
from lensllm_jax.models.t5 import padding_masks

POSITION_OFFSET = 2
INIT_STD = 0.02


def _dense(features: int, dtype, name: str):
  return layers.dense(features, dtype, name, std=INIT_STD)


class BartAttention(nn.Module):
  """Multi-head attention with biased q/k/v/out projections, scores / sqrt(Dh).

  x [B T, d] and kv [B S, d] are rows, mask [B, 1, T, S]; returns rows [B T, d].
  """

  config: EncoderDecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array, mask: jax.Array,
               deterministic: bool) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    batch = mask.shape[0]
    q = layers.split_heads(_dense(c.d_model, dtype, "q_proj")(x), batch, c.n_heads)
    k = layers.split_heads(_dense(c.d_model, dtype, "k_proj")(kv), batch, c.n_heads)
    v = layers.split_heads(_dense(c.d_model, dtype, "v_proj")(kv), batch, c.n_heads)
    out = layers.dot_product_attention(q, k, v, mask, dropout=nn.Dropout(c.dropout_rate),
                                       deterministic=deterministic)
    return _dense(c.d_model, dtype, "out_proj")(layers.token_rows(out))


class BartLayer(nn.Module):
  """Post-LayerNorm block on rows x [B T, d] (enc_out [B S, d]); ``cross`` adds encoder
  attention (run only with enc_out)."""

  config: EncoderDecoderConfig
  cross: bool

  @nn.compact
  def __call__(self, x, mask, enc_out, cross_mask, deterministic):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    drop = nn.Dropout(c.dropout_rate)

    def residual(x, branch, norm):
      x = x + drop(branch, deterministic=deterministic).astype(jnp.float32)
      return layers.layer_norm(c.norm_eps, norm)(x)

    h = x.astype(dtype)
    x = residual(x, BartAttention(c, name="self_attn")(h, h, mask, deterministic),
                 "self_attn_layer_norm")
    if self.cross:
      cross_attn = BartAttention(c, name="encoder_attn")
      if enc_out is not None:
        x = residual(x, cross_attn(x.astype(dtype), enc_out.astype(dtype), cross_mask,
                                   deterministic), "encoder_attn_layer_norm")
      elif self.is_initializing():
        # Decoder-only BART: create the (unused) cross-attention weights of the checkpoint.
        h = x.astype(dtype)
        cross_attn(h, h, mask, True)
        layers.layer_norm(c.norm_eps, "encoder_attn_layer_norm")(x)
    act = layers.activation_fn(c.activation)
    h = act(_dense(c.d_ff, dtype, "fc1")(x.astype(dtype)))
    h = drop(h, deterministic=deterministic)
    return residual(x, _dense(c.d_model, dtype, "fc2")(h), "final_layer_norm")


def _embed(config: EncoderDecoderConfig, tokens: nn.Embed, positions: nn.Embed,
           norm: nn.Module, ids: jax.Array, pos: jax.Array) -> jax.Array:
  """The normed embeddings of ids [B, L] as rows [B L, d]."""
  scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
  return norm(layers.token_rows(tokens(ids) * scale + positions(pos + POSITION_OFFSET)))


def _positions(ids: jax.Array, positions: jax.Array | None, max_len: int) -> jax.Array:
  if ids.shape[1] > max_len:
    raise ValueError(f"input length {ids.shape[1]} exceeds EncoderDecoderConfig.max_len={max_len}")
  if positions is None:
    return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
  return positions


def _embeddings(config: EncoderDecoderConfig, name: str) -> nn.Embed:
  rows = config.vocab_size if name in ("shared", "embed_tokens") else config.max_len + 2
  return nn.Embed(rows, config.d_model, dtype=jnp.float32,
                  embedding_init=nn.initializers.normal(INIT_STD), name=name)


class BartModel(nn.Module):
  """BART encoder-decoder (BartForConditionalGeneration): logits [B, T, V] float32."""

  config: EncoderDecoderConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               decoder_input_ids: jax.Array | None = None,
               decoder_attention_mask: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    """Computes the logits (arguments as `T5Model.__call__`; positions are 0..len-1)."""
    c = self.config
    enc_mask, dec_mask, cross_mask = padding_masks(input_ids, attention_mask, decoder_input_ids,
                                                   decoder_attention_mask)
    drop = nn.Dropout(c.dropout_rate)
    shared = _embeddings(c, "shared")
    x = _embed(c, shared, _embeddings(c, "encoder_embed_positions"),
               layers.layer_norm(c.norm_eps, "encoder_layernorm_embedding"), input_ids,
               _positions(input_ids, None, c.max_len))
    x = drop(x, deterministic=deterministic)
    for i in range(c.n_layers):
      x = BartLayer(c, cross=False, name=f"encoder_layers_{i}")(x, enc_mask, None, None,
                                                                 deterministic)
    y = _embed(c, shared, _embeddings(c, "decoder_embed_positions"),
               layers.layer_norm(c.norm_eps, "decoder_layernorm_embedding"), decoder_input_ids,
               _positions(decoder_input_ids, None, c.max_len))
    y = drop(y, deterministic=deterministic)
    for i in range(c.n_decoder_layers):
      y = BartLayer(c, cross=True, name=f"decoder_layers_{i}")(y, dec_mask, x, cross_mask,
                                                               deterministic)
    logits = layers.tied_logits(y.reshape(decoder_input_ids.shape + (-1,)), shared.embedding,
                                jnp.dtype(c.dtype))
    bias = self.param("final_logits_bias", nn.initializers.zeros, (c.vocab_size,), jnp.float32)
    return logits + bias


class BartCausalLM(nn.Module):
  """BART's decoder alone as a causal LM (BartForCausalLM): ids [B, T] -> logits [B, T, V].

  Applied like `CausalLM`: ``apply(variables, input_ids, attention_mask=...,
  positions=...)``; the head is tied to "embed_tokens" and has no bias.
  """

  config: EncoderDecoderConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """Computes the logits.

    Args:
      input_ids: [B, T] ids, T <= max_len.
      attention_mask: [B, T] (1 = real token) or None.
      positions: [B, T] position ids (default 0..T-1; the offset 2 is added here).
      deterministic: False applies dropout.

    Returns:
      [B, T, V] float32 logits.
    """
    c = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    batch, length = input_ids.shape
    mask = layers.attention_mask_bias(attention_mask, batch, length)
    tokens = _embeddings(c, "embed_tokens")
    x = _embed(c, tokens, _embeddings(c, "embed_positions"),
               layers.layer_norm(c.norm_eps, "layernorm_embedding"), input_ids,
               _positions(input_ids, positions, c.max_len))
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    for i in range(c.n_decoder_layers):
      x = BartLayer(c, cross=True, name=f"layers_{i}")(x, mask, None, None, deterministic)
    return layers.tied_logits(x.reshape(batch, length, -1), tokens.embedding, jnp.dtype(c.dtype))
