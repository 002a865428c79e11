"""Hugging Face checkpoints of T5 / mT5 / Switch Transformers / BART.

Registers the model_types "t5", "mt5", "switch_transformers" and "bart", so
`models.load_hf_checkpoint(dir)` returns (EncoderDecoderConfig, params of
`models.build(config)`).
nn.Linear weights [out, in] are transposed to kernels [in, out]; Switch
experts are stacked into [E, in, out] arrays; the router classifier [E, d]
becomes a [d, E] kernel.

The output head. Hub T5 v1.0 checkpoints tie it to the shared embedding and
rescale by d^-0.5; hub T5 v1.1 / mT5 checkpoints say tie_word_embeddings=false
and carry their own lm_head.weight (no rescale). transformers 5 always ties the
head for t5/mt5 and writes "scale_decoder_outputs" into config.json instead;
that key, when present, decides the rescale, and the head is untied exactly
when config.json says tie_word_embeddings=false (then lm_head.weight must be in
the checkpoint).

BART: by default a checkpoint whose "architectures" is BartForCausalLM (or
is_decoder without is_encoder_decoder) loads as the decoder-only
`BartCausalLM`, anything else as the encoder-decoder. `load_bart_causal_lm`
loads any BART checkpoint decoder-only (from a full one it takes the decoder
and the shared embedding), the module whose count the benchmark reports.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np

from lensllm_jax.models import registry
from lensllm_jax.models.encdec_config import EncoderDecoderConfig
from lensllm_jax.models.hf import TensorReader, check_structure, read_json_object, read_safetensors
from lensllm_jax.models.registry import CheckpointError

ENCDEC_MODEL_TYPES = ("t5", "mt5", "switch_transformers", "bart")


def encdec_config_from_hf(hf_config: dict, *, dtype: str = "float32",
                          decoder_only: bool | None = None,
                          source: str = "config.json") -> EncoderDecoderConfig:
  """Translates a T5 / mT5 / Switch / BART config.json dict into an `EncoderDecoderConfig`.

  Args:
    hf_config: the parsed config.json.
    dtype: our compute dtype.
    decoder_only: BART only: None = decoder-only iff architectures names
      BartForCausalLM (or is_decoder without is_encoder_decoder).
    source: file name used in error messages.
  """
  kind = hf_config.get("model_type")
  if kind not in ENCDEC_MODEL_TYPES:
    raise CheckpointError(f"{source}: model_type={kind!r} is not an encoder-decoder "
                          f"type ({', '.join(ENCDEC_MODEL_TYPES)})")
  if kind == "bart":
    return _bart_config(hf_config, dtype, decoder_only, source)
  if decoder_only:
    raise CheckpointError(f"{source}: decoder_only is only supported for BART")
  proj = hf_config.get("feed_forward_proj", "relu")
  parts = proj.split("-")
  gated = parts[0] == "gated"
  act = parts[-1]
  if kind == "switch_transformers":
    proj = hf_config.get("dense_act_fn", "relu")
    gated, act = False, proj
  activation = {"relu": "relu", "gelu": "gelu_new", "gelu_new": "gelu_new"}.get(act)
  if activation is None or len(parts) > 2 or (len(parts) == 2 and not gated):
    raise CheckpointError(f"{source}: feed_forward_proj/dense_act_fn={proj!r} is not supported "
                          "(relu, gated-gelu, gated-gelu_new)")
  tie = hf_config.get("tie_word_embeddings", True) is not False
  if kind == "mt5":
    scale = bool(hf_config.get("scale_decoder_outputs", False))
  else:
    scale = bool(hf_config.get("scale_decoder_outputs", tie))
  layers = hf_config["num_layers"]
  common = dict(
      vocab_size=hf_config["vocab_size"], d_model=hf_config["d_model"], n_layers=layers,
      n_decoder_layers=hf_config.get("num_decoder_layers") or layers,
      n_heads=hf_config["num_heads"], d_ff=hf_config["d_ff"], head_dim=hf_config["d_kv"],
      activation=activation, gated=gated, tie_embeddings=tie, scale_decoder_outputs=scale,
      norm_eps=hf_config.get("layer_norm_epsilon", 1e-6),
      relative_buckets=hf_config.get("relative_attention_num_buckets", 32),
      relative_max_distance=hf_config.get("relative_attention_max_distance", 128),
      pad_token_id=hf_config.get("pad_token_id", 0) or 0,
      decoder_start_token_id=_start_token(hf_config, 0), dtype=dtype)
  if kind == "switch_transformers":
    if hf_config.get("router_bias", False):
      raise CheckpointError(f"{source}: router_bias=True is not supported")
    return EncoderDecoderConfig(
        arch="switch", num_experts=hf_config.get("num_experts", 8),
        expert_capacity=hf_config.get("expert_capacity", 64),
        num_sparse_encoder_layers=hf_config.get("num_sparse_encoder_layers", 3),
        num_sparse_decoder_layers=hf_config.get("num_sparse_decoder_layers", 3),
        router_z_loss_coef=hf_config.get("router_z_loss_coef", 0.001),
        router_aux_loss_coef=hf_config.get("router_aux_loss_coef", 0.001), **common)
  return EncoderDecoderConfig(arch=kind, **common)


def _start_token(hf_config: dict, default: int) -> int:
  start = hf_config.get("decoder_start_token_id")
  return default if start is None else int(start)


def _bart_config(hf_config, dtype, decoder_only, source) -> EncoderDecoderConfig:
  if decoder_only is None:
    archs = hf_config.get("architectures") or []
    decoder_only = ("BartForCausalLM" in archs
                    or (hf_config.get("is_decoder", False)
                        and not hf_config.get("is_encoder_decoder", True)))
  d = hf_config["d_model"]
  if hf_config.get("encoder_attention_heads") != hf_config.get("decoder_attention_heads"):
    raise CheckpointError(f"{source}: encoder/decoder_attention_heads differ (not supported)")
  if hf_config.get("encoder_ffn_dim") != hf_config.get("decoder_ffn_dim"):
    raise CheckpointError(f"{source}: encoder/decoder_ffn_dim differ (not supported)")
  act = hf_config.get("activation_function", "gelu")
  activation = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu"}.get(act)
  if activation is None:
    raise CheckpointError(f"{source}: activation_function={act!r} is not supported")
  if hf_config.get("add_final_layer_norm") or hf_config.get("normalize_before"):
    raise CheckpointError(f"{source}: pre-LayerNorm (mBART-style) BART is not supported")
  pad = hf_config.get("pad_token_id", 1)
  return EncoderDecoderConfig(
      arch="bart", vocab_size=hf_config["vocab_size"], d_model=d,
      n_layers=hf_config["encoder_layers"], n_decoder_layers=hf_config["decoder_layers"],
      n_heads=hf_config["decoder_attention_heads"], d_ff=hf_config["decoder_ffn_dim"],
      activation=activation, max_len=hf_config.get("max_position_embeddings", 1024),
      scale_embedding=bool(hf_config.get("scale_embedding", False)),
      decoder_only=bool(decoder_only), norm_eps=1e-5, pad_token_id=1 if pad is None else pad,
      decoder_start_token_id=_start_token(hf_config, 2), dtype=dtype)


def convert_t5_weights(tensors: dict[str, np.ndarray], config: EncoderDecoderConfig, *,
                       source: str = "checkpoint") -> dict:
  """Maps transformers' T5 / mT5 / SwitchTransformers ForConditionalGeneration
  tensors ("encoder.block.0.layer.0.SelfAttention.q.weight", ...) to `T5Model` params.

  The tied copies "encoder.embed_tokens.weight" / "decoder.embed_tokens.weight"
  (and "lm_head.weight" when the head is tied) are ignored if present.
  """
  c = config
  if c.arch not in ("t5", "mt5", "switch"):
    raise ValueError(f"convert_t5_weights needs a T5-family config, got arch={c.arch!r}")
  r = TensorReader(tensors, source, ())
  d, f, inner = c.d_model, c.d_ff, c.n_heads * c.head_dim

  def linear(name, n_in, n_out):
    return {"kernel": r.take(f"{name}.weight", (n_out, n_in), transpose=True)}

  def attention(name, first):
    p = {k: linear(f"{name}.{k}", d, inner) for k in ("q", "k", "v")}
    p["o"] = linear(f"{name}.o", inner, d)
    if first:
      p["relative_attention_bias"] = r.take(f"{name}.relative_attention_bias.weight",
                                            (c.relative_buckets, c.n_heads))
    return p

  def mlp(name, sparse):
    if sparse:
      experts = [f"{name}.mlp.experts.expert_{e}" for e in range(c.num_experts)]
      router = r.take(f"{name}.mlp.router.classifier.weight", (c.num_experts, d), transpose=True)
      wi = jnp.stack([r.take(f"{e}.wi.weight", (f, d), transpose=True) for e in experts])
      wo = jnp.stack([r.take(f"{e}.wo.weight", (d, f), transpose=True) for e in experts])
      return {"router": {"kernel": router}, "wi": {"kernel": wi}, "wo": {"kernel": wo}}
    inner_name = f"{name}.mlp" if c.arch == "switch" else f"{name}.DenseReluDense"
    if c.gated:
      return {"wi_0": linear(f"{inner_name}.wi_0", d, f), "wi_1": linear(f"{inner_name}.wi_1", d, f),
              "wo": linear(f"{inner_name}.wo", f, d)}
    return {"wi": linear(f"{inner_name}.wi", d, f), "wo": linear(f"{inner_name}.wo", f, d)}

  def norm(name):
    return {"scale": r.take(f"{name}.weight", (d,))}

  params = {"shared": {"embedding": r.take("shared.weight", (c.vocab_size, d))}}
  for stack, layers in (("encoder", c.n_layers), ("decoder", c.n_decoder_layers)):
    decoder = stack == "decoder"
    for i in range(layers):
      p = f"{stack}.block.{i}.layer"
      ff = f"{p}.{2 if decoder else 1}"
      block = {"self_attn": attention(f"{p}.0.SelfAttention", i == 0),
               "self_attn_norm": norm(f"{p}.0.layer_norm"),
               "mlp": mlp(ff, c.is_sparse(i, decoder)), "mlp_norm": norm(f"{ff}.layer_norm")}
      if decoder:
        block["cross_attn"] = attention(f"{p}.1.EncDecAttention", False)
        block["cross_attn_norm"] = norm(f"{p}.1.layer_norm")
      params[f"{stack}_block_{i}"] = block
    params[f"{stack}_final_norm"] = norm(f"{stack}.final_layer_norm")
  ignore = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
  if c.tie_embeddings:
    ignore.append("lm_head.weight")
  else:
    params["lm_head"] = {"kernel": r.take("lm_head.weight", (c.vocab_size, d), transpose=True)}
  r.check_all_used(ignore=tuple(ignore))
  return check_structure(params, c, source)


def convert_bart_weights(tensors: dict[str, np.ndarray], config: EncoderDecoderConfig, *,
                         source: str = "checkpoint") -> dict:
  """Maps transformers' BART tensors ("model.encoder.layers.0.self_attn.q_proj.weight",
  ...) to `BartModel` params, or to `BartCausalLM` params when config.decoder_only
  (from a BartForCausalLM or a full BART checkpoint: its encoder is then skipped).
  """
  c = config
  if c.arch != "bart":
    raise ValueError(f"convert_bart_weights needs arch='bart', got {c.arch!r}")
  r = TensorReader(tensors, source, ("model.",))
  d, f = c.d_model, c.d_ff

  def linear(name, n_in, n_out):
    return {"kernel": r.take(f"{name}.weight", (n_out, n_in), transpose=True),
            "bias": r.take(f"{name}.bias", (n_out,))}

  def ln(name):
    return {"scale": r.take(f"{name}.weight", (d,)), "bias": r.take(f"{name}.bias", (d,))}

  def attention(name):
    return {k: linear(f"{name}.{k}", d, d) for k in ("q_proj", "k_proj", "v_proj", "out_proj")}

  def layer(name, cross):
    p = {"self_attn": attention(f"{name}.self_attn"),
         "self_attn_layer_norm": ln(f"{name}.self_attn_layer_norm"),
         "fc1": linear(f"{name}.fc1", d, f), "fc2": linear(f"{name}.fc2", f, d),
         "final_layer_norm": ln(f"{name}.final_layer_norm")}
    if cross:
      p["encoder_attn"] = attention(f"{name}.encoder_attn")
      p["encoder_attn_layer_norm"] = ln(f"{name}.encoder_attn_layer_norm")
    return p

  positions = (c.max_len + 2, d)
  ignore = {"lm_head.weight", "encoder.embed_tokens.weight"}
  if c.decoder_only:
    names = r.tensors
    token_name = "decoder.embed_tokens.weight" if "decoder.embed_tokens.weight" in names \
        else "shared.weight"
    params = {"embed_tokens": {"embedding": r.take(token_name, (c.vocab_size, d))},
              "embed_positions": {"embedding": r.take("decoder.embed_positions.weight",
                                                      positions)},
              "layernorm_embedding": ln("decoder.layernorm_embedding")}
    for i in range(c.n_decoder_layers):
      params[f"layers_{i}"] = layer(f"decoder.layers.{i}", True)
    # A full BART checkpoint: its encoder, shared embedding and logits bias are not used.
    ignore |= {n for n in names if n.startswith("encoder.")}
    ignore |= {"shared.weight", "decoder.embed_tokens.weight", "final_logits_bias"}
    r.check_all_used(ignore=tuple(ignore))
    return check_structure(params, c, source)
  params = {"shared": {"embedding": r.take("shared.weight", (c.vocab_size, d))}}
  for stack, layers in (("encoder", c.n_layers), ("decoder", c.n_decoder_layers)):
    params[f"{stack}_embed_positions"] = {"embedding": r.take(f"{stack}.embed_positions.weight",
                                                              positions)}
    params[f"{stack}_layernorm_embedding"] = ln(f"{stack}.layernorm_embedding")
    for i in range(layers):
      params[f"{stack}_layers_{i}"] = layer(f"{stack}.layers.{i}", stack == "decoder")
  if "final_logits_bias" in r.tensors:
    params["final_logits_bias"] = r.take("final_logits_bias", (1, c.vocab_size))[0]
  else:  # transformers re-creates it as zeros when absent
    params["final_logits_bias"] = jnp.zeros((c.vocab_size,), jnp.float32)
  ignore.add("decoder.embed_tokens.weight")
  r.check_all_used(ignore=tuple(ignore))
  return check_structure(params, c, source)


def load_bart_causal_lm(path, *, dtype: str = "float32") -> tuple[EncoderDecoderConfig, dict]:
  """Loads any BART checkpoint directory as transformers' BartForCausalLM.

  The benchmark's BART parameter counts are those of this module (the
  decoder with its cross-attention weights, tied head, no logits bias).

  Returns:
    (config with decoder_only=True, params of `models.build(config)`).
  """
  path = pathlib.Path(path)
  config_file = path / "config.json"
  if not config_file.is_file():
    raise CheckpointError(f"{config_file} not found (expected a Hugging Face checkpoint "
                          "directory with config.json and model.safetensors)")
  config = encdec_config_from_hf(read_json_object(config_file), dtype=dtype,
                                 decoder_only=True, source=str(config_file))
  return config, convert_bart_weights(read_safetensors(path), config, source=str(path))


def _config_from_hf(hf_config: dict, dtype: str, source: str) -> EncoderDecoderConfig:
  return encdec_config_from_hf(hf_config, dtype=dtype, source=source)


def _convert(tensors: dict[str, np.ndarray], config: EncoderDecoderConfig, source: str) -> dict:
  if config.arch == "bart":
    return convert_bart_weights(tensors, config, source=source)
  return convert_t5_weights(tensors, config, source=source)


for _model_type in ENCDEC_MODEL_TYPES:
  registry.register_hf_format(registry.HFFormat(_model_type, _config_from_hf, _convert))
