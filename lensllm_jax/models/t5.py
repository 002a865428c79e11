"""T5 / mT5 / T5 v1.1 and Switch Transformers encoder-decoders (`T5Model`).

Shapes: B batch, S encoder length, T decoder length, d model width, H heads,
Dh head width, f MLP width, E experts, C expert capacity, V vocabulary.

Top-level parameter blocks (flat, so the Hessian/NTK helpers can partition
by them), input to output:

    "shared"                       {"embedding": [V, d]} (encoder and decoder input)
    "encoder_block_0" ... _{L-1}   self_attn/{q,k,v,o}/kernel, self_attn_norm/scale, mlp/..., mlp_norm/scale
                                   (block 0's self_attn also holds relative_attention_bias [buckets, H])
    "encoder_final_norm"           {"scale": [d]}
    "decoder_block_0" ... _{L'-1}  as the encoder's plus cross_attn/{q,k,v,o}/kernel, cross_attn_norm/scale
    "decoder_final_norm"           {"scale": [d]}
    "lm_head"                      {"kernel": [d, V]} only if the head is untied

A dense MLP is mlp/{wi, wo}/kernel (mlp/{wi_0, wi_1, wo} when gated); a
Switch sparse MLP is mlp/{router [d, E], wi [E, d, f], wo [E, f, d]}/kernel.

Attention scores are not scaled by 1/sqrt(Dh) (T5 folds it into the init);
the relative-position bias of the first block's self-attention is computed
once per stack and added in every block of that stack; cross-attention has no
position bias. Blocks are pre-norm: x + sublayer(rms_norm(x)), on the token
rows [B S or B T, d] of the residual stream (`layers.token_rows`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.models import layers
from lensllm_jax.models.encdec_config import EncoderDecoderConfig


def relative_position_bucket(relative_position: np.ndarray, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bucket of each relative position (key - query), int32, same shape.

  Half of the buckets (all of them if not bidirectional, where keys after the
  query share bucket 0) hold the distances 0 .. n/2 - 1 exactly; the rest
  cover n/2 .. max_distance logarithmically and everything beyond falls in the
  last bucket. Computed in float32 like the reference so bucket edges agree.
  """
  rel = np.asarray(relative_position, np.int64)
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
  large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


def _per_sequence(bias: jax.Array, batch: int) -> jax.Array:
  """bias [1, H, T, S] repeated over the batch, [B, H, T, S] (the exact product 1 x bias).

  Written as a product with ones so that its gradient, the sum of the score gradients
  over the batch, is a matrix product too: as the transpose of a broadcast, XLA fused
  the softmax backward of the scores into a reduction over the outer batch dimension
  (a third of tiny-t5's step, one thread).
  """
  ones = jnp.ones((batch, 1), bias.dtype)
  rows = jnp.dot(ones, bias.reshape(1, -1), precision=jax.lax.Precision.HIGHEST)
  return rows.reshape((batch,) + bias.shape[1:])


def _kernel(features: int, dtype, name: str, std: float):
  return layers.dense(features, dtype, name, std=std, use_bias=False)


class T5Attention(nn.Module):
  """Multi-head attention without biases or score scaling, optional relative bias.

  x [B T, d] and kv [B S, d] are rows, mask [B, 1, T, S]; returns rows [B T, d].
  With ``relative_bias`` the module owns the bucket table
  "relative_attention_bias" [buckets, H] and returns the bias it adds,
  [1, H, T, S], for the later blocks of the stack.
  """

  config: EncoderDecoderConfig
  relative_bias: bool = False
  bidirectional: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array, mask: jax.Array,
               position_bias: jax.Array | None, deterministic: bool):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    inner = c.n_heads * c.head_dim
    std = c.d_model ** -0.5
    q = _kernel(inner, dtype, "q", (c.d_model * c.head_dim) ** -0.5)(x)
    k = _kernel(inner, dtype, "k", std)(kv)
    v = _kernel(inner, dtype, "v", std)(kv)
    if self.relative_bias:
      table = self.param("relative_attention_bias",
                         nn.initializers.normal(std), (c.relative_buckets, c.n_heads), jnp.float32)
      length, keys = mask.shape[2:]
      buckets = relative_position_bucket(
          np.arange(keys)[None, :] - np.arange(length)[:, None], bidirectional=self.bidirectional,
          num_buckets=c.relative_buckets, max_distance=c.relative_max_distance)
      position_bias = jnp.transpose(table[buckets], (2, 0, 1))[None]
    batch = mask.shape[0]
    q, k, v = (layers.split_heads(t, batch, c.n_heads) for t in (q, k, v))
    out = layers.dot_product_attention(q, k, v, mask, dropout=nn.Dropout(c.dropout_rate),
                                       deterministic=deterministic, scale=1.0,
                                       bias=None if position_bias is None else _per_sequence(position_bias, batch))
    return _kernel(c.d_model, dtype, "o", inner ** -0.5)(layers.token_rows(out)), position_bias


class T5DenseMLP(nn.Module):
  """wo(act(wi x)), or wo(act(wi_0 x) * (wi_1 x)) when gated; no biases."""

  config: EncoderDecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    act = _activation(c.activation)
    std = c.d_model ** -0.5
    if c.gated:
      h = act(_kernel(c.d_ff, dtype, "wi_0", std)(x)) * _kernel(c.d_ff, dtype, "wi_1", std)(x)
    else:
      h = act(_kernel(c.d_ff, dtype, "wi", std)(x))
    h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    return _kernel(c.d_model, dtype, "wo", c.d_ff ** -0.5)(h)


def switch_routing(router_logits: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Top-1 routing with a per-sequence expert capacity (transformers' eval rule).

  Each token picks e* = argmax softmax(router_logits) (first maximum on ties);
  within each sequence, tokens claim their expert in order of position and a
  token whose expert already holds ``capacity`` earlier tokens is dropped
  (its MLP output is 0, so the residual passes it through unchanged).

  Args:
    router_logits: [B, T, E] float32.
    capacity: C, tokens per expert per sequence.

  Returns:
    keep [B, T, E] (one-hot of e*, zero for dropped tokens) and
    gate [B, T] = max_e softmax(router_logits) (the selected expert's weight).
  """
  probs = jax.nn.softmax(router_logits, axis=-1)
  chosen = jax.nn.one_hot(jnp.argmax(probs, axis=-1), router_logits.shape[-1], dtype=jnp.int32)
  priority = jnp.cumsum(chosen, axis=1)
  keep = chosen * (priority <= capacity)
  return keep, jnp.max(probs, axis=-1)


class _Kernel(nn.Module):
  """A bare float32 "kernel" parameter (a stack of E expert matrices when 3-D)."""

  shape: tuple[int, ...]
  std: float

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("kernel", nn.initializers.normal(self.std), self.shape, jnp.float32)


class SwitchSparseMLP(nn.Module):
  """Switch Transformers' top-1 mixture of experts (each expert a ReLU T5 MLP).

  out[b, t] = gate[b, t] * expert_{e*}(x[b, t]) for kept tokens, 0 for dropped
  ones (see `switch_routing`). Tokens are dispatched to [E, B, C', d] slots
  (C' = min(C, T), a token's slot is its rank among the tokens of its
  sequence routed to the same expert), so the cost is that of E B C' tokens.
  Returns (out [B, T, d], router_logits [B, T, E] float32).
  """

  config: EncoderDecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> tuple[jax.Array, jax.Array]:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    batch, length, d = x.shape
    router = _Kernel((d, c.num_experts), 1.0, name="router")()
    wi = _Kernel((c.num_experts, d, c.d_ff), d ** -0.5, name="wi")()
    wo = _Kernel((c.num_experts, c.d_ff, d), d ** -0.5, name="wo")()
    router_logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), router)
    keep, gate = switch_routing(router_logits, c.expert_capacity)
    slots = min(c.expert_capacity, length)
    slot = jnp.cumsum(keep, axis=1) - 1
    # dispatch[b, t, e, s] = 1 iff token t of sequence b sits in slot s of expert e.
    dispatch = (keep[..., None] * jax.nn.one_hot(slot, slots, dtype=jnp.int32)).astype(dtype)
    expert_in = jnp.einsum("btes,btd->ebsd", dispatch, x.astype(dtype))
    h = _activation(c.activation)(jnp.einsum("ebsd,edf->ebsf", expert_in, wi.astype(dtype)))
    h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    expert_out = jnp.einsum("ebsf,efd->ebsd", h, wo.astype(dtype))
    out = jnp.einsum("btes,ebsd->btd", dispatch, expert_out, preferred_element_type=jnp.float32)
    return out * gate[..., None], router_logits


def _activation(name: str):
  return jax.nn.relu if name == "relu" else layers.activation_fn(name)


class T5Block(nn.Module):
  """Pre-norm block: self-attention, [cross-attention], MLP (dense or sparse).

  x [B T, d] and enc_out [B S, d] are rows (float32), mask [B, 1, T, T],
  cross_mask [B, 1, T, S]. Returns (x, position_bias, router_logits or None).
  """

  config: EncoderDecoderConfig
  decoder: bool
  first: bool
  sparse: bool

  @nn.compact
  def __call__(self, x, mask, position_bias, enc_out, cross_mask, deterministic):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    drop = nn.Dropout(c.dropout_rate)

    def norm(name):
      return layers.RMSNorm(c.norm_eps, dtype, name=name)

    h = norm("self_attn_norm")(x)
    attn, position_bias = T5Attention(c, relative_bias=self.first, bidirectional=not self.decoder,
                                      name="self_attn")(h, h, mask, position_bias, deterministic)
    x = x + drop(attn, deterministic=deterministic).astype(jnp.float32)
    if self.decoder:
      h = norm("cross_attn_norm")(x)
      attn, _ = T5Attention(c, name="cross_attn")(h, enc_out.astype(dtype), cross_mask, None,
                                                 deterministic)
      x = x + drop(attn, deterministic=deterministic).astype(jnp.float32)
    h = norm("mlp_norm")(x)
    router_logits = None
    if self.sparse:
      out, router_logits = SwitchSparseMLP(c, name="mlp")(h.reshape(mask.shape[0], -1, h.shape[-1]),
                                                          deterministic)
      out = layers.token_rows(out)
    else:
      out = T5DenseMLP(c, name="mlp")(h, deterministic)
    x = x + drop(out, deterministic=deterministic).astype(jnp.float32)
    return x, position_bias, router_logits


def padding_masks(input_ids: jax.Array, attention_mask: jax.Array | None,
                  decoder_input_ids: jax.Array | None, decoder_attention_mask: jax.Array | None):
  """Boolean attention masks of an encoder-decoder (True = may attend), after
  checking the ids' shapes (input_ids [B, S], decoder_input_ids [B, T]).

  Returns:
    encoder [B, 1, S, S] (keys that are real tokens), decoder [B, 1, T, T]
    (causal and real keys), cross [B, 1, T, S] (real encoder keys).
  """
  _check_ids(input_ids, decoder_input_ids)
  batch, src_len = input_ids.shape
  tgt_len = decoder_input_ids.shape[1]
  if attention_mask is None:
    src = jnp.ones((batch, src_len), bool)
  else:
    if attention_mask.shape != (batch, src_len):
      raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected "
                       f"{(batch, src_len)} to match input_ids")
    src = attention_mask.astype(bool)
  enc = jnp.broadcast_to(src[:, None, None, :], (batch, 1, src_len, src_len))
  cross = jnp.broadcast_to(src[:, None, None, :], (batch, 1, tgt_len, src_len))
  dec = layers.attention_mask_bias(decoder_attention_mask, batch, tgt_len)
  return enc, dec, cross


def _check_ids(input_ids: jax.Array, decoder_input_ids: jax.Array | None):
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  if decoder_input_ids is None:
    raise ValueError("an encoder-decoder needs decoder_input_ids [batch, target length] "
                     "(e.g. models.shift_right(targets, config))")
  if decoder_input_ids.ndim != 2 or decoder_input_ids.shape[0] != input_ids.shape[0]:
    raise ValueError(f"decoder_input_ids must be [batch={input_ids.shape[0]}, length], "
                     f"got shape {decoder_input_ids.shape}")


class T5Model(nn.Module):
  """T5 / mT5 / T5 v1.1 / Switch encoder-decoder: logits [B, T, V] float32.

  logits[b, t] predicts the target token after decoder_input_ids[b, :t+1],
  given the whole (unpadded part of) input_ids[b].
  """

  config: EncoderDecoderConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               decoder_input_ids: jax.Array | None = None,
               decoder_attention_mask: jax.Array | None = None, *,
               deterministic: bool = True, return_router_logits: bool = False):
    """Computes the logits.

    Args:
      input_ids: [B, S] encoder token ids.
      attention_mask: [B, S], 1 for real tokens, 0 for padding (None = all real).
      decoder_input_ids: [B, T] decoder inputs (targets shifted right, see
        `shift_right`).
      decoder_attention_mask: [B, T] (None = all real).
      deterministic: False applies dropout (rngs={"dropout": key}).
      return_router_logits: also return the Switch router logits.

    Returns:
      [B, T, V] float32 logits; with ``return_router_logits`` a pair
      (logits, (encoder, decoder)) where each is a list over the sparse blocks
      of [B, S or T, E] float32 router logits.
    """
    c = self.config
    enc_mask, dec_mask, cross_mask = padding_masks(input_ids, attention_mask, decoder_input_ids,
                                                   decoder_attention_mask)
    drop = nn.Dropout(c.dropout_rate)
    shared = nn.Embed(c.vocab_size, c.d_model, dtype=jnp.float32,
                      embedding_init=nn.initializers.normal(1.0), name="shared")
    routers = ([], [])
    x = layers.token_rows(drop(shared(input_ids), deterministic=deterministic))
    bias = None
    for i in range(c.n_layers):
      x, bias, logits = T5Block(c, decoder=False, first=i == 0, sparse=c.is_sparse(i, False),
                                name=f"encoder_block_{i}")(x, enc_mask, bias, None, None,
                                                           deterministic)
      if logits is not None:
        routers[0].append(logits)
    enc_out = drop(layers.RMSNorm(c.norm_eps, jnp.float32, name="encoder_final_norm")(x),
                   deterministic=deterministic)
    y = layers.token_rows(drop(shared(decoder_input_ids), deterministic=deterministic))
    bias = None
    for i in range(c.n_decoder_layers):
      y, bias, logits = T5Block(c, decoder=True, first=i == 0, sparse=c.is_sparse(i, True),
                                name=f"decoder_block_{i}")(y, dec_mask, bias, enc_out,
                                                           cross_mask, deterministic)
      if logits is not None:
        routers[1].append(logits)
    h = drop(layers.RMSNorm(c.norm_eps, jnp.float32, name="decoder_final_norm")(y),
             deterministic=deterministic).reshape(decoder_input_ids.shape + (-1,))
    if c.scale_decoder_outputs:
      h = h * c.d_model ** -0.5
    dtype = jnp.dtype(c.dtype)
    if c.tie_embeddings:
      logits = layers.tied_logits(h, shared.embedding, dtype)
    else:
      logits = layers.Unembed(c.vocab_size, dtype, init_std=1.0, name="lm_head")(h)
    return (logits, routers) if return_router_logits else logits
