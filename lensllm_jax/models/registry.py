"""The one entry point for every architecture: build, init, count, FLOPs, load.

Two small registries, filled when `lensllm_jax.models` is imported:

* ``ARCHITECTURES``: ``config.arch`` -> `Architecture` (how to build the Flax
  module, make init inputs, count parameters, count FLOPs, name the top-level
  parameter blocks).
* ``HF_FORMATS``: Hugging Face ``model_type`` (config.json) -> `HFFormat`
  (config.json -> our config, safetensors tensors -> our params).

Dispatchers (re-exported as ``models.build`` etc.):

    build(config)                    -> flax.linen Module
    init_params(config, key)         -> "params" pytree
    num_params(config)               -> int (closed form)
    flops_per_token(config, T)       -> float
    block_names(config)              -> top-level parameter block names, input to output
    config_from_dict(fields)         -> ModelConfig or EncoderDecoderConfig (by fields["arch"])

A decoder-only model is applied as
``build(config).apply({"params": params}, input_ids, attention_mask=mask)``
and returns float32 logits [B, T, V]. Configs say whether they describe an
encoder-decoder through ``config.is_encoder_decoder`` (False for every
decoder-only `ModelConfig`); pipelines branch on it.

Where families register: the decoder-only ``arch`` names (``config._ARCHS``:
gpt2, opt, phi, gpt_neox and the Llama family) in one loop at the bottom of
``model.py`` (`CausalLM` picks the block by ``config.arch``); the
encoder-decoders (t5, mt5, switch, bart) at the bottom of ``encdec.py``; the
Hugging Face formats at the bottom of ``hf.py`` (decoder-only) and
``encdec_hf.py``. Adding a decoder-only family: its block module, its branch
in `CausalLM`, its ``arch`` in ``config.py``, its converter and
`register_hf_format` call in ``hf.py``; a new kind of model calls
`register_architecture` itself and is imported from
``lensllm_jax/models/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lensllm_jax import errors, xla_workarounds
from lensllm_jax.models.config import ModelConfig
from lensllm_jax.models.encdec_config import ENCDEC_ARCHS, EncoderDecoderConfig


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How to build and measure the models of one ``config.arch``.

  Attributes:
    name: the ``config.arch`` value.
    build: config -> flax.linen Module.
    dummy_inputs: (config, length) -> positional arguments of ``module.init``
      after the PRNG key (e.g. ``(ids [1, length],)`` for a decoder).
    num_params: config -> closed-form parameter count.
    matmul_params: config -> N_mm, the weight-matrix entries used in a matmul
      per token (attention and MLP kernels of all layers, projections and the
      output head; no embedding lookups, norms or biases).
    attention_span: (config, T) -> sum over the attention layers a token goes
      through of H Dh K, K the keys its query is scored against (T; min(T, W)
      on a sliding-window layer of window W): the QK^T and softmax-times-V
      products cost 2 H Dh K multiply-adds each; for a decoder L H Dh T.
    block_names: config -> names of the top-level parameter blocks, input to
      output (the Hessian/NTK helpers partition parameters by them).
  """
  name: str
  build: Callable[[Any], Any]
  dummy_inputs: Callable[[Any, int], tuple]
  num_params: Callable[[Any], int]
  matmul_params: Callable[[Any], int]
  attention_span: Callable[[Any, int], int]
  block_names: Callable[[Any], tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class HFFormat:
  """How to read one Hugging Face ``model_type``.

  Attributes:
    model_type: config.json's ``model_type``.
    config_from_hf: (hf_config dict, dtype, source) -> our config.
    convert: (tensors name -> float32 array, config, source) -> "params" pytree.
  """
  model_type: str
  config_from_hf: Callable[[dict, str, str], Any]
  convert: Callable[[dict[str, np.ndarray], Any, str], dict]


# A checkpoint is missing a tensor, has a wrongly shaped one, or is unsupported.
CheckpointError = errors.CheckpointError


ARCHITECTURES: dict[str, Architecture] = {}
HF_FORMATS: dict[str, HFFormat] = {}


def register_architecture(arch: Architecture) -> None:
  """Adds an architecture (`ARCHITECTURES[arch.name]`); names must be new."""
  if arch.name in ARCHITECTURES:
    raise ValueError(f"architecture {arch.name!r} is already registered")
  ARCHITECTURES[arch.name] = arch


def register_hf_format(fmt: HFFormat) -> None:
  """Adds a Hugging Face model_type (`HF_FORMATS[fmt.model_type]`); names must be new."""
  if fmt.model_type in HF_FORMATS:
    raise ValueError(f"Hugging Face model_type {fmt.model_type!r} is already registered")
  HF_FORMATS[fmt.model_type] = fmt


def architecture(config) -> Architecture:
  """The registered `Architecture` of ``config.arch`` (error lists the known ones)."""
  arch = getattr(config, "arch", None)
  if arch not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {arch!r}; registered: {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[arch]


def hf_format(model_type: str | None, source: str = "config.json") -> HFFormat:
  """The registered `HFFormat` of a model_type; `CheckpointError` naming it otherwise."""
  if model_type not in HF_FORMATS:
    raise CheckpointError(f"{source}: model_type={model_type!r} is not supported "
                          f"(supported: {', '.join(sorted(HF_FORMATS))})")
  return HF_FORMATS[model_type]


def config_from_dict(fields: dict, source: str = "config"):
  """The config whose dataclass fields are ``fields`` (e.g. a JSON written with
  ``dataclasses.asdict``, as experiments.finetune_sweep's models/<model>.json).

  ``fields["arch"]`` picks the class: `EncoderDecoderConfig` for t5, mt5, switch
  and bart, else `ModelConfig`. Unknown fields or invalid values raise
  ValueError naming ``source``.
  """
  if not isinstance(fields, dict):
    raise ValueError(f"{source}: need a JSON object of config fields, got {type(fields).__name__}")
  cls = EncoderDecoderConfig if fields.get("arch") in ENCDEC_ARCHS else ModelConfig
  try:
    return cls(**fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: not valid {cls.__name__} fields ({e})") from e


def build(config):
  """The Flax module of ``config`` (e.g. `CausalLM` for decoder-only configs)."""
  return architecture(config).build(config)


def init_params(config, key: jax.Array, length: int | None = None) -> dict:
  """Random initial parameters of `build(config)` (the "params" collection, float32).

  Args:
    config: the model configuration.
    key: PRNG key.
    length: sequence length of the dummy input (default min(8, max_len); the
      parameter shapes do not depend on it).
  """
  length = min(8, config.max_len) if length is None else length
  return _jitted_init(config, length)(key)


@functools.lru_cache(maxsize=16)
def _jitted_init(config, length: int) -> Callable:
  """The jitted init of a config, one per (config, length): a `jax.eval_shape` of
  `init_params` (the shapes) and the later call share one trace, repeated calls one
  compilation."""
  arch = architecture(config)
  # Jitted: XLA drops the unused forward pass and compiles one program. The dummy
  # inputs are made inside the trace (made outside under an eval_shape, they would be
  # tracers kept by the cache).
  return xla_workarounds.jit(
      lambda k: arch.build(config).init(k, *arch.dummy_inputs(config, length))["params"],
      program="init")


def num_params(config) -> int:
  """Closed-form parameter count of `build(config)` (tied matrices counted once)."""
  return int(architecture(config).num_params(config))


def block_names(config) -> tuple[str, ...]:
  """Names of the top-level parameter blocks of `build(config)`, input to output."""
  return tuple(architecture(config).block_names(config))


def flops_per_token(config, seq_len: int, *, training: bool = True) -> float:
  """Model FLOPs per token (the convention used for cost and MFU).

  forward = 2 N_mm + 4 S,  training = 3 x forward = 6 N_mm + 12 S,

  with N_mm the number of weight-matrix entries used in a matmul per token
  (attention and MLP kernels of all layers, embedding projections and the
  output head, tied or not; embedding lookups, norms and biases are not
  counted) and S = sum over attention layers of H Dh K_l, K_l the keys a
  query is scored against: T (the sequence length) on a full layer, so S =
  L H Dh T for a decoder, and min(T, W) on a sliding-window layer of window
  W. The attention term counts QK^T and softmax-times-V (2 K H Dh each)
  for every key position in reach, without halving for the causal mask (the
  PaLM appendix B convention; it is the 6 N convention of Kaplan et al. plus
  attention).

  Encoder-decoders: per target position of an example whose input and target
  both have T tokens; N_mm = encoder + decoder matmul weights (with the head)
  and S = H Dh (L + 2 L') T (encoder self-, decoder self- and cross-attention).
  Switch Transformers: N_mm counts the ACTIVE parameters (the router and one
  expert per sparse MLP), while the 6 N D compute of the selection tables
  (`budgeted.pair_flops`) uses the curve files' size column, which for Switch
  is the TOTAL count (all experts, `num_params`).

  Args:
    config: the model configuration.
    seq_len: T.
    training: forward+backward (3x) if True, forward only if False.
  """
  arch = architecture(config)
  forward = 2.0 * arch.matmul_params(config) + 4.0 * arch.attention_span(config, seq_len)
  return 3.0 * forward if training else forward
