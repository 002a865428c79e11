"""Encoder-decoder families in the registry, shift-right and the seq2seq loss.

Registers the architectures "t5", "mt5", "switch" and "bart" of
`EncoderDecoderConfig` (build, init inputs, closed-form counts, FLOPs terms,
block names), so the entry points of `lensllm_jax.models` work on them:

    module = models.build(config)             # T5Model, BartModel or BartCausalLM
    params = models.init_params(config, key)
    dec_in = shift_right(targets, config)     # [start, y_0, ..., y_{T-2}]
    logits = module.apply({"params": params}, input_ids, attention_mask=src_mask,
                          decoder_input_ids=dec_in, decoder_attention_mask=tgt_mask)
    loss = seq2seq_loss(module, params, batch)   # mean NLL of the target tokens

An encoder-decoder batch is {"input_ids" [B, S], "attention_mask" [B, S],
"targets" [B, T], "target_mask" [B, T]}: the encoder reads the input, the
decoder reads the targets shifted right and logits[:, t] predicts targets[:, t];
only target tokens (target_mask = 1) count in the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lensllm_jax.models import registry
from lensllm_jax.models.bart import BartCausalLM, BartModel
from lensllm_jax.models.encdec_config import EncoderDecoderConfig
from lensllm_jax.models.losses import mean_token_nll, token_nll
from lensllm_jax.models.t5 import T5Model


def encdec_module(config: EncoderDecoderConfig):
  """The Flax module of an `EncoderDecoderConfig` (decoder-only BART: `BartCausalLM`)."""
  if config.arch == "bart":
    return BartCausalLM(config) if config.decoder_only else BartModel(config)
  return T5Model(config)


def shift_right(targets: jax.Array, config: EncoderDecoderConfig) -> jax.Array:
  """Decoder inputs of teacher forcing: [start, y_0, ..., y_{T-2}] per row.

  Ids < 0 (e.g. -100 ignore labels) become ``config.pad_token_id``, as in
  transformers' ``_shift_right`` / ``shift_tokens_right``.

  Args:
    targets: [B, T] int target ids.
    config: gives decoder_start_token_id and pad_token_id.

  Returns:
    [B, T] int32.
  """
  targets = jnp.asarray(targets)
  start = jnp.full_like(targets[:, :1], config.decoder_start_token_id)
  shifted = jnp.concatenate([start, targets[:, :-1]], axis=1)
  return jnp.where(shifted < 0, config.pad_token_id, shifted).astype(jnp.int32)


def _attention_params(c: EncoderDecoderConfig) -> tuple[int, int]:
  """(matmul weights, biases) of one attention layer."""
  inner = c.n_heads * c.head_dim
  bias = 3 * inner + c.d_model if c.arch == "bart" else 0
  return 4 * c.d_model * inner, bias


def _mlp_params(c: EncoderDecoderConfig, sparse: bool, *, active: bool,
                matmul_only: bool) -> int:
  """Weights of one MLP (BART: with biases unless matmul_only); a sparse one:
  router + 1 or E experts."""
  if c.arch == "bart":
    return 2 * c.d_model * c.d_ff + (0 if matmul_only else c.d_ff + c.d_model)
  dense = (3 if c.gated else 2) * c.d_model * c.d_ff
  if not sparse:
    return dense
  return c.d_model * c.num_experts + (1 if active else c.num_experts) * dense


def _stack_params(c: EncoderDecoderConfig, decoder: bool, *, active: bool,
                  matmul_only: bool) -> int:
  """Parameters of the encoder or decoder blocks (plus, unless matmul_only, norms,
  biases, the relative-position table and the final norm / embedding LayerNorm)."""
  attn_mm, attn_bias = _attention_params(c)
  bart = c.arch == "bart"
  layers = c.n_decoder_layers if decoder else c.n_layers
  attentions = 2 if decoder else 1
  norms = (attentions + 1) * (2 if bart else 1) * c.d_model
  total = 0
  for i in range(layers):
    mlp = _mlp_params(c, c.is_sparse(i, decoder), active=active, matmul_only=matmul_only)
    total += attentions * attn_mm + mlp
    if not matmul_only:
      total += attentions * attn_bias + norms
  if not matmul_only:
    if bart:
      total += (c.max_len + 2) * c.d_model + 2 * c.d_model  # positions, layernorm_embedding
    else:
      total += c.relative_buckets * c.n_heads + c.d_model  # bias table, final norm
  return total


def encdec_num_params(config: EncoderDecoderConfig, *, active: bool = False) -> int:
  """Closed-form parameter count of `encdec_module(config)` (`models.num_params`).

  T5 family: V d (shared) [+ V d untied head] + encoder + decoder with, per
  block, 4 d H Dh per attention (1 encoder, 2 decoder), (2 or 3 gated) d f per
  dense MLP, d E + E 2 d f per Switch MLP, d per RMS norm, and per stack a
  buckets x H relative table and a final norm.
  BART: V d + V (final_logits_bias) + per stack (max_len + 2) d positions,
  2d embedding LayerNorm and per block attentions 4 (d^2 + d), MLP
  2 d f + f + d, LayerNorms 2d each. Decoder-only BART: its decoder stack
  (cross-attention included) + V d, no bias: transformers' BartForCausalLM.

  Args:
    config: the configuration.
    active: count only the parameters one token uses (Switch: the router and
      one expert per sparse MLP instead of all E); equal to the total otherwise.
  """
  c = config
  total = c.vocab_size * c.d_model + _stack_params(c, True, active=active, matmul_only=False)
  if c.decoder_only:
    return int(total)
  total += _stack_params(c, False, active=active, matmul_only=False)
  if c.arch == "bart":
    total += c.vocab_size
  elif not c.tie_embeddings:
    total += c.vocab_size * c.d_model
  return int(total)


def _matmul_params(config: EncoderDecoderConfig) -> int:
  """N_mm per token position of `registry.flops_per_token` (active parameters).

  Encoder + decoder matmul weights (attention and MLP kernels, V x d head;
  Switch: the router and ONE expert per sparse MLP). Decoder-only BART: its
  decoder without the cross-attention it never runs.
  """
  c = config
  n_dec = _stack_params(c, True, active=True, matmul_only=True) + c.vocab_size * c.d_model
  if c.decoder_only:
    return n_dec - c.n_decoder_layers * _attention_params(c)[0]
  return n_dec + _stack_params(c, False, active=True, matmul_only=True)


def _attention_span(config: EncoderDecoderConfig, seq_len: int) -> int:
  """S of `registry.flops_per_token`: H Dh (L + 2 L') T (encoder self, decoder self
  and cross attention, input and target of T = seq_len tokens each); L' H Dh T
  for decoder-only BART."""
  c = config
  width = c.n_heads * c.head_dim * seq_len
  if c.decoder_only:
    return c.n_decoder_layers * width
  return width * (c.n_layers + 2 * c.n_decoder_layers)


def _block_names(config: EncoderDecoderConfig) -> tuple[str, ...]:
  c = config
  enc = [f"encoder_{'layers' if c.arch == 'bart' else 'block'}_{i}" for i in range(c.n_layers)]
  dec = [f"decoder_{'layers' if c.arch == 'bart' else 'block'}_{i}"
         for i in range(c.n_decoder_layers)]
  if c.arch == "bart":
    if c.decoder_only:
      return ("embed_tokens", "embed_positions", "layernorm_embedding",
              *(f"layers_{i}" for i in range(c.n_decoder_layers)))
    return ("shared", "encoder_embed_positions", "encoder_layernorm_embedding", *enc,
            "decoder_embed_positions", "decoder_layernorm_embedding", *dec, "final_logits_bias")
  head = () if c.tie_embeddings else ("lm_head",)
  return ("shared", *enc, "encoder_final_norm", *dec, "decoder_final_norm", *head)


def _dummy_inputs(config: EncoderDecoderConfig, length: int) -> tuple:
  ids = jnp.zeros((1, length), jnp.int32)
  return (ids,) if config.decoder_only else (ids, None, ids)


def switch_router_losses(router_logits, config: EncoderDecoderConfig) -> jax.Array:
  """Switch Transformers' auxiliary loss: z_coef (z_enc + z_dec) + aux_coef (lb_enc + lb_dec).

  Per stack, with the router logits of its sparse blocks concatenated along
  the token axis, z [B, N, E] (N = tokens x sparse blocks):
    z-loss       = mean_{b, n} logsumexp_e(z)^2,
    load balance = E^2 mean_{b, e} (frac of b's N tokens whose argmax is e)
                                   x (mean_n softmax(z)[b, n, e]).
  A stack whose sparse step is <= 1 contributes 0 (transformers' rule).

  Args:
    router_logits: (encoder, decoder) lists of [B, len, E] float32 arrays,
      as returned by `T5Model(..., return_router_logits=True)`.
    config: gives the coefficients and sparse steps.

  Returns:
    scalar float32.
  """
  z_total = jnp.float32(0.0)
  aux_total = jnp.float32(0.0)
  for decoder, logits in ((False, router_logits[0]), (True, router_logits[1])):
    if config.sparse_step(decoder) <= 1 or not logits:
      continue
    z = jnp.concatenate(logits, axis=1).astype(jnp.float32)
    z_total += jnp.mean(jax.nn.logsumexp(z, axis=-1) ** 2)
    probs = jax.nn.softmax(z, axis=-1)
    experts = z.shape[-1]
    fraction = jnp.mean(jax.nn.one_hot(jnp.argmax(z, axis=-1), experts), axis=1)
    aux_total += jnp.mean(fraction * jnp.mean(probs, axis=1)) * experts ** 2
  return config.router_z_loss_coef * z_total + config.router_aux_loss_coef * aux_total


def seq2seq_logits(module, params, batch: dict, *, deterministic: bool = True,
                   rngs: dict | None = None, return_router_logits: bool = False):
  """Teacher-forced logits [B, T, V] of an encoder-decoder on a seq2seq batch."""
  c = module.config
  kwargs = {"return_router_logits": True} if return_router_logits else {}
  return module.apply({"params": params}, batch["input_ids"],
                      attention_mask=batch.get("attention_mask"),
                      decoder_input_ids=shift_right(batch["targets"], c),
                      decoder_attention_mask=batch.get("target_mask"),
                      deterministic=deterministic, rngs=rngs, **kwargs)


def seq2seq_loss(module, params, batch: dict, *, per_token: bool = True,
                 router_losses: bool = False, deterministic: bool = True,
                 rngs: dict | None = None) -> jax.Array:
  """Sequence-to-sequence loss: NLL of the target tokens only.

  per_token=True: sum over target tokens / their number (transformers'
  CrossEntropyLoss with ignore_index); False: mean over sequences of each
  sequence's mean target NLL (`token_nll`). With ``router_losses`` (Switch,
  training) `switch_router_losses` is added.

  Args:
    module: `models.build(config)` with config.is_encoder_decoder.
    params: its parameters.
    batch: {"input_ids" [B, S], "attention_mask" [B, S] (optional),
      "targets" [B, T], "target_mask" [B, T] (optional, 1 = counted)}.
  """
  targets = batch["targets"]
  mask = batch.get("target_mask")
  mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask
  want_router = router_losses and module.config.arch == "switch"
  out = seq2seq_logits(module, params, batch, deterministic=deterministic, rngs=rngs,
                       return_router_logits=want_router)
  logits, routers = out if want_router else (out, None)
  safe = jnp.where(targets < 0, 0, targets)
  loss = (mean_token_nll(logits, safe, mask) if per_token
          else jnp.mean(token_nll(logits, safe, mask)))
  if want_router:
    loss = loss + switch_router_losses(routers, module.config)
  return loss


for _arch in ("t5", "mt5", "switch", "bart"):
  registry.register_architecture(registry.Architecture(
      name=_arch, build=encdec_module, dummy_inputs=_dummy_inputs, num_params=encdec_num_params,
      matmul_params=_matmul_params, attention_span=_attention_span,
      block_names=_block_names))
