"""Hugging Face checkpoints (config.json + safetensors) and tokenizer.json.

`load_hf_checkpoint(dir)` reads a checkpoint directory in the hub layout
(config.json plus model.safetensors, or sharded model-0000x-of-0000n.safetensors
with model.safetensors.index.json) and returns our `ModelConfig` and the
"params" pytree of `build(config)`, dispatching on config.json's
``model_type`` through `registry.HF_FORMATS`. Registered here: GPT2LMHeadModel /
GPT2Model (model_type "gpt2"), LlamaForCausalLM ("llama"), OPTForCausalLM
("opt") and PhiForCausalLM ("phi").

Weight layouts:
* GPT-2 stores Conv1D weights as [in, out], the same as a Flax Dense kernel:
  they are copied unchanged (c_attn's columns are q | k | v, as ours).
* Llama stores nn.Linear weights as [out, in]: they are transposed. The hub
  Llama checkpoints already use the rotate-half RoPE layout (the q/k rows
  were permuted when converted from Meta's interleaved format), which is the
  layout `layers.apply_rotary` implements, so q_proj/k_proj are not permuted.
* OPT and Phi store nn.Linear weights [out, in]: transposed likewise. Phi's
  partial rotary acts on the first rotary_dim channels of each head in the
  rotate-half layout, as `layers.apply_rotary` does with narrower cos/sin.

Loading does I/O only when called; nothing happens at import.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.models import registry
from lensllm_jax.models.config import ModelConfig
from lensllm_jax.models.registry import CheckpointError

# Non-parameter buffers some checkpoints carry (causal-mask tables, RoPE tables).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of a checkpoint as float32 numpy arrays.

  Args:
    path: a .safetensors file, or a directory holding model.safetensors or
      model.safetensors.index.json (sharded checkpoints).

  Returns:
    dict name -> float32 array (bfloat16/float16 checkpoints are upcast).
  """
  from safetensors import safe_open  # local import: I/O helper only

  path = pathlib.Path(path)
  if path.is_dir():
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if single.exists():
      files = [single]
    elif index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = [path / name for name in sorted(set(weight_map.values()))]
    else:
      raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are supported)")
  else:
    files = [path]
  tensors = {}
  for file in files:
    if not file.exists():
      raise FileNotFoundError(f"checkpoint shard {file} not found")
    # framework="flax" reads bfloat16 too (numpy cannot); kept on the host CPU.
    with jax.default_device(jax.devices("cpu")[0]), safe_open(str(file), framework="flax") as f:
      for name in f.keys():
        tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
  return tensors


def _tanh_gelu(name: str, source: str) -> str:
  if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
    return "gelu_new"
  if name == "gelu":
    return "gelu"
  raise CheckpointError(f"{source}: activation_function={name!r} is not supported "
                        "(gelu_new, gelu_pytorch_tanh, gelu)")


def config_from_hf(hf_config: dict, *, dtype: str = "float32",
                   source: str = "config.json"):
  """Translates a Hugging Face config.json dict into our config (dispatch on model_type).

  Args:
    hf_config: the parsed config.json.
    dtype: our compute dtype ("float32" or "bfloat16").
    source: file name used in error messages.

  Raises:
    CheckpointError: unknown model_type (the message lists the supported
      ones) or an unsupported option.
  """
  fmt = registry.hf_format(hf_config.get("model_type"), source)
  return fmt.config_from_hf(hf_config, dtype, source)


def _gpt2_config(hf_config: dict, dtype: str, source: str) -> ModelConfig:
  if not hf_config.get("scale_attn_weights", True):
    raise CheckpointError(f"{source}: scale_attn_weights=False is not supported")
  if hf_config.get("scale_attn_by_inverse_layer_idx", False):
    raise CheckpointError(f"{source}: scale_attn_by_inverse_layer_idx=True is not supported")
  d = hf_config["n_embd"]
  return ModelConfig(
      arch="gpt2", vocab_size=hf_config["vocab_size"], max_len=hf_config["n_positions"],
      d_model=d, n_layers=hf_config["n_layer"], n_heads=hf_config["n_head"],
      d_ff=hf_config.get("n_inner") or 4 * d, dtype=dtype,
      norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
      tie_embeddings=hf_config.get("tie_word_embeddings", True),
      activation=_tanh_gelu(hf_config.get("activation_function", "gelu_new"), source))


def _default_rope(hf_config: dict, source: str) -> dict:
  """config.json's RoPE parameters (transformers 5 "rope_parameters", or the older
  top-level keys); only the default rope_type is supported."""
  rope = hf_config.get("rope_parameters") or {}
  scaling = hf_config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise CheckpointError(f"{source}: rope_type={rope_type!r} is not supported (only default)")
  theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
  factor = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
  return {"theta": float(theta), "partial_rotary_factor": factor}


def _llama_config(hf_config: dict, dtype: str, source: str) -> ModelConfig:
  rope = _default_rope(hf_config, source)
  for flag in ("attention_bias", "mlp_bias"):
    if hf_config.get(flag, False):
      raise CheckpointError(f"{source}: {flag}=True is not supported")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={hf_config['hidden_act']!r} is not supported")
  heads = hf_config["num_attention_heads"]
  return ModelConfig(
      arch="llama", vocab_size=hf_config["vocab_size"],
      max_len=hf_config.get("max_position_embeddings", 2048),
      d_model=hf_config["hidden_size"], n_layers=hf_config["num_hidden_layers"],
      n_heads=heads, d_ff=hf_config["intermediate_size"], dtype=dtype,
      n_kv_heads=hf_config.get("num_key_value_heads") or heads,
      head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
      norm_eps=hf_config.get("rms_norm_eps", 1e-6),
      rope_theta=rope["theta"],
      tie_embeddings=hf_config.get("tie_word_embeddings", False), activation="silu")


def _opt_config(hf_config: dict, dtype: str, source: str) -> ModelConfig:
  for flag in ("enable_bias", "layer_norm_elementwise_affine", "tie_word_embeddings"):
    if not hf_config.get(flag, True):
      raise CheckpointError(f"{source}: {flag}=False is not supported")
  act = hf_config.get("activation_function", "relu")
  if act != "relu":
    raise CheckpointError(f"{source}: activation_function={act!r} is not supported (relu)")
  d = hf_config["hidden_size"]
  pre_norm = bool(hf_config.get("do_layer_norm_before", True))
  return ModelConfig(
      arch="opt", vocab_size=hf_config["vocab_size"],
      max_len=hf_config.get("max_position_embeddings", 2048), d_model=d,
      n_layers=hf_config["num_hidden_layers"], n_heads=hf_config["num_attention_heads"],
      d_ff=hf_config.get("ffn_dim") or 4 * d, dtype=dtype, norm_eps=1e-5,  # torch's default
      word_embed_dim=hf_config.get("word_embed_proj_dim") or d, pre_norm=pre_norm,
      final_norm=pre_norm and not hf_config.get("_remove_final_layer_norm", False),
      tie_embeddings=True, activation="relu")


def _phi_config(hf_config: dict, dtype: str, source: str) -> ModelConfig:
  rope = _default_rope(hf_config, source)
  if hf_config.get("qk_layernorm", False):
    raise CheckpointError(f"{source}: qk_layernorm=True is not supported")
  if hf_config.get("tie_word_embeddings", False):
    raise CheckpointError(f"{source}: tie_word_embeddings=True is not supported for phi")
  heads, d = hf_config["num_attention_heads"], hf_config["hidden_size"]
  head_dim = hf_config.get("head_dim") or d // heads
  factor = rope["partial_rotary_factor"] or 0.5  # PhiConfig's default
  return ModelConfig(
      arch="phi", vocab_size=hf_config["vocab_size"],
      max_len=hf_config.get("max_position_embeddings", 2048), d_model=d,
      n_layers=hf_config["num_hidden_layers"], n_heads=heads,
      n_kv_heads=hf_config.get("num_key_value_heads") or heads, head_dim=head_dim,
      d_ff=hf_config["intermediate_size"], dtype=dtype,
      norm_eps=hf_config.get("layer_norm_eps", 1e-5),
      rope_theta=rope["theta"], rotary_dim=int(head_dim * factor), tie_embeddings=False,
      activation=_tanh_gelu(hf_config.get("hidden_act", "gelu_new"), source))


class TensorReader:
  """Takes named tensors, checks their shapes, remembers which were used.

  `take(name, shape, transpose=False)` returns the tensor as a float32 jax
  array or raises `CheckpointError` naming a missing or mis-shaped tensor;
  `check_all_used()` rejects tensors nobody took. ``prefixes`` are stripped
  from the checkpoint names first (e.g. "model." of a *ForCausalLM).
  """

  def __init__(self, tensors: dict[str, np.ndarray], source: str, prefixes: tuple[str, ...]):
    self.source = source
    self.tensors = {}
    for name, value in tensors.items():
      for prefix in prefixes:
        if name.startswith(prefix):
          name = name[len(prefix):]
          break
      self.tensors[name] = value
    self.used: set[str] = set()

  def take(self, name: str, shape: tuple[int, ...], transpose: bool = False) -> jax.Array:
    if name not in self.tensors:
      raise CheckpointError(f"{self.source}: missing tensor {name!r} (expected shape {shape})")
    value = self.tensors[name]
    if tuple(value.shape) != tuple(shape):
      raise CheckpointError(f"{self.source}: tensor {name!r} has shape {tuple(value.shape)}, "
                            f"expected {tuple(shape)}")
    self.used.add(name)
    value = np.asarray(value, np.float32)
    return jnp.asarray(value.T if transpose else value)

  def check_all_used(self, ignore: tuple[str, ...] = ()):
    extra = sorted(n for n in self.tensors
                   if n not in self.used and not n.endswith(_IGNORED_SUFFIXES) and n not in ignore)
    if extra:
      raise CheckpointError(f"{self.source}: unexpected tensors {extra[:10]}"
                            f"{' ...' if len(extra) > 10 else ''} (wrong architecture/config?)")


def check_structure(params: dict, config, source: str) -> dict:
  """Checks a converted pytree against `registry.build(config)`'s shapes; returns it."""
  arch = registry.architecture(config)
  inputs = arch.dummy_inputs(config, 1)
  expected = jax.eval_shape(
      lambda: arch.build(config).init(jax.random.key(0), *inputs))["params"]
  exp_leaves = jax.tree_util.tree_leaves_with_path(expected)
  got = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, leaf in exp_leaves:
    if path not in got or got[path].shape != leaf.shape:
      raise CheckpointError(f"{source}: converted parameter {jax.tree_util.keystr(path)} "
                            f"is missing or has the wrong shape")
  if len(got) != len(exp_leaves):
    raise CheckpointError(f"{source}: converted pytree has extra parameters")
  return params


def convert_gpt2_weights(tensors: dict[str, np.ndarray], config: ModelConfig, *,
                         source: str = "checkpoint") -> dict:
  """Maps Hugging Face GPT-2 tensors ("h.0.attn.c_attn.weight", ...) to our params.

  The "transformer." prefix of GPT2LMHeadModel is accepted; "lm_head.weight"
  is ignored when the embeddings are tied.

  Args:
    tensors: name -> array (e.g. from `read_safetensors`).
    config: a gpt2 `ModelConfig` matching the tensors.
    source: name used in error messages.

  Returns:
    The "params" pytree of `CausalLM(config)` (float32).
  """
  c = config
  if c.arch != "gpt2":
    raise ValueError(f"convert_gpt2_weights needs arch='gpt2', got {c.arch!r}")
  r = TensorReader(tensors, source, ("transformer.",))
  d, f = c.d_model, c.d_ff

  def ln(name):
    return {"scale": r.take(f"{name}.weight", (d,)), "bias": r.take(f"{name}.bias", (d,))}

  def dense(name, n_in, n_out):
    return {"kernel": r.take(f"{name}.weight", (n_in, n_out)),
            "bias": r.take(f"{name}.bias", (n_out,))}

  params = {"wte": {"embedding": r.take("wte.weight", (c.vocab_size, d))},
            "wpe": {"embedding": r.take("wpe.weight", (c.max_len, d))}}
  for i in range(c.n_layers):
    p = f"h.{i}"
    params[f"h_{i}"] = {
        "ln_1": ln(f"{p}.ln_1"),
        "attn": {"c_attn": dense(f"{p}.attn.c_attn", d, 3 * d),
                 "c_proj": dense(f"{p}.attn.c_proj", d, d)},
        "ln_2": ln(f"{p}.ln_2"),
        "mlp": {"c_fc": dense(f"{p}.mlp.c_fc", d, f), "c_proj": dense(f"{p}.mlp.c_proj", f, d)},
    }
  params["ln_f"] = ln("ln_f")
  if not c.tie_embeddings:
    params["lm_head"] = {"kernel": r.take("lm_head.weight", (c.vocab_size, d), transpose=True)}
  r.check_all_used(ignore=("lm_head.weight",) if c.tie_embeddings else ())
  return check_structure(params, c, source)


def convert_llama_weights(tensors: dict[str, np.ndarray], config: ModelConfig, *,
                          source: str = "checkpoint") -> dict:
  """Maps Hugging Face LlamaForCausalLM tensors ("model.layers.0.self_attn.q_proj.weight",
  ...) to our params; nn.Linear weights [out, in] are transposed to kernels [in, out].

  Args:
    tensors: name -> array (e.g. from `read_safetensors`).
    config: a llama `ModelConfig` matching the tensors.
    source: name used in error messages.

  Returns:
    The "params" pytree of `CausalLM(config)` (float32).
  """
  c = config
  if c.arch != "llama":
    raise ValueError(f"convert_llama_weights needs arch='llama', got {c.arch!r}")
  r = TensorReader(tensors, source, ("model.",))
  d, f = c.d_model, c.d_ff
  q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim

  def linear(name, n_in, n_out):
    return _linear(r, name, n_in, n_out, bias=False)

  params = {"embed": {"embedding": r.take("embed_tokens.weight", (c.vocab_size, d))}}
  for i in range(c.n_layers):
    p = f"layers.{i}"
    params[f"layers_{i}"] = {
        "input_layernorm": {"scale": r.take(f"{p}.input_layernorm.weight", (d,))},
        "self_attn": {"q_proj": linear(f"{p}.self_attn.q_proj", d, q_dim),
                      "k_proj": linear(f"{p}.self_attn.k_proj", d, kv_dim),
                      "v_proj": linear(f"{p}.self_attn.v_proj", d, kv_dim),
                      "o_proj": linear(f"{p}.self_attn.o_proj", q_dim, d)},
        "post_attention_layernorm": {
            "scale": r.take(f"{p}.post_attention_layernorm.weight", (d,))},
        "mlp": {"gate_proj": linear(f"{p}.mlp.gate_proj", d, f),
                "up_proj": linear(f"{p}.mlp.up_proj", d, f),
                "down_proj": linear(f"{p}.mlp.down_proj", f, d)},
    }
  params["norm"] = {"scale": r.take("norm.weight", (d,))}
  if not c.tie_embeddings:
    params["lm_head"] = {"kernel": r.take("lm_head.weight", (c.vocab_size, d), transpose=True)}
  r.check_all_used(ignore=("lm_head.weight",) if c.tie_embeddings else ())
  return check_structure(params, c, source)


def _layer_norm(r: TensorReader, name: str, d: int) -> dict:
  return {"scale": r.take(f"{name}.weight", (d,)), "bias": r.take(f"{name}.bias", (d,))}


def _linear(r: TensorReader, name: str, n_in: int, n_out: int, bias: bool = True) -> dict:
  """torch nn.Linear (weight [out, in]) -> Flax Dense {"kernel" [in, out], "bias" [out]}."""
  out = {"kernel": r.take(f"{name}.weight", (n_out, n_in), transpose=True)}
  if bias:
    out["bias"] = r.take(f"{name}.bias", (n_out,))
  return out


def convert_opt_weights(tensors: dict[str, np.ndarray], config: ModelConfig, *,
                        source: str = "checkpoint") -> dict:
  """Maps Hugging Face OPTForCausalLM / OPTModel tensors
  ("model.decoder.layers.0.self_attn.q_proj.weight", ...) to our params.

  The "model.decoder." / "decoder." prefixes are accepted; "lm_head.weight"
  (tied to the token embedding) is ignored.

  Returns:
    The "params" pytree of `CausalLM(config)` (float32).
  """
  c = config
  if c.arch != "opt":
    raise ValueError(f"convert_opt_weights needs arch='opt', got {c.arch!r}")
  r = TensorReader(tensors, source, ("model.decoder.", "decoder."))
  d, f, e = c.d_model, c.d_ff, c.word_embed_dim
  params = {"embed_tokens": {"embedding": r.take("embed_tokens.weight", (c.vocab_size, e))},
            "embed_positions": {"embedding": r.take("embed_positions.weight", (c.max_len + 2, d))}}
  if e != d:
    params["project_in"] = _linear(r, "project_in", e, d, bias=False)
    params["project_out"] = _linear(r, "project_out", d, e, bias=False)
  for i in range(c.n_layers):
    p = f"layers.{i}"
    params[f"layers_{i}"] = {
        "self_attn": {name: _linear(r, f"{p}.self_attn.{name}", d, d)
                      for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "self_attn_layer_norm": _layer_norm(r, f"{p}.self_attn_layer_norm", d),
        "fc1": _linear(r, f"{p}.fc1", d, f),
        "fc2": _linear(r, f"{p}.fc2", f, d),
        "final_layer_norm": _layer_norm(r, f"{p}.final_layer_norm", d),
    }
  if c.final_norm:
    params["final_layer_norm"] = _layer_norm(r, "final_layer_norm", d)
  r.check_all_used(ignore=("lm_head.weight",))
  return check_structure(params, c, source)


def convert_phi_weights(tensors: dict[str, np.ndarray], config: ModelConfig, *,
                        source: str = "checkpoint") -> dict:
  """Maps Hugging Face PhiForCausalLM tensors ("model.layers.0.self_attn.q_proj.weight",
  ..., "lm_head.weight", "lm_head.bias") to our params.

  Returns:
    The "params" pytree of `CausalLM(config)` (float32).
  """
  c = config
  if c.arch != "phi":
    raise ValueError(f"convert_phi_weights needs arch='phi', got {c.arch!r}")
  r = TensorReader(tensors, source, ("model.",))
  d, f = c.d_model, c.d_ff
  q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  params = {"embed_tokens": {"embedding": r.take("embed_tokens.weight", (c.vocab_size, d))}}
  for i in range(c.n_layers):
    p = f"layers.{i}"
    params[f"layers_{i}"] = {
        "input_layernorm": _layer_norm(r, f"{p}.input_layernorm", d),
        "self_attn": {"q_proj": _linear(r, f"{p}.self_attn.q_proj", d, q_dim),
                      "k_proj": _linear(r, f"{p}.self_attn.k_proj", d, kv_dim),
                      "v_proj": _linear(r, f"{p}.self_attn.v_proj", d, kv_dim),
                      "dense": _linear(r, f"{p}.self_attn.dense", q_dim, d)},
        "mlp": {"fc1": _linear(r, f"{p}.mlp.fc1", d, f), "fc2": _linear(r, f"{p}.mlp.fc2", f, d)},
    }
  params["final_layernorm"] = _layer_norm(r, "final_layernorm", d)
  params["lm_head"] = _linear(r, "lm_head", d, c.vocab_size)
  r.check_all_used()
  return check_structure(params, c, source)


def load_hf_checkpoint(path: str | os.PathLike, *, dtype: str = "float32") -> tuple[Any, dict]:
  """Loads a Hugging Face checkpoint directory into (config, params).

  Dispatches on config.json's ``model_type`` through `registry.HF_FORMATS`
  (gpt2, llama, ... : the message of an unknown one lists them).

  Args:
    path: directory with config.json and model.safetensors (or a sharded
      safetensors index), as written by `save_pretrained` / the hub.
    dtype: compute dtype of the returned config; params are float32.

  Returns:
    (config, params) with params the "params" collection of `build(config)`:
    `build(config).apply({"params": params}, ids, attention_mask=mask)`.
  """
  path = pathlib.Path(path)
  config_file = path / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{config_file} not found (expected a Hugging Face checkpoint "
                            "directory with config.json and model.safetensors)")
  hf_config = json.loads(config_file.read_text())
  fmt = registry.hf_format(hf_config.get("model_type"), str(config_file))
  config = fmt.config_from_hf(hf_config, dtype, str(config_file))
  return config, fmt.convert(read_safetensors(path), config, str(path))


def load_tokenizer(path: str | os.PathLike):
  """Loads a `tokenizers.Tokenizer` from tokenizer.json (or a directory holding one).

  Returns:
    tokenizers.Tokenizer: `.encode(text).ids`, `.encode_batch(texts)`,
    `.decode(ids)`, `.token_to_id(token)`.
  """
  from tokenizers import Tokenizer  # local import: I/O helper only

  path = pathlib.Path(path)
  file = path / "tokenizer.json" if path.is_dir() else path
  if not file.exists():
    raise FileNotFoundError(f"{file} not found (expected a tokenizers tokenizer.json)")
  return Tokenizer.from_file(str(file))


registry.register_hf_format(registry.HFFormat(
    "gpt2", _gpt2_config, lambda t, c, s: convert_gpt2_weights(t, c, source=s)))
registry.register_hf_format(registry.HFFormat(
    "llama", _llama_config, lambda t, c, s: convert_llama_weights(t, c, source=s)))
registry.register_hf_format(registry.HFFormat(
    "opt", _opt_config, lambda t, c, s: convert_opt_weights(t, c, source=s)))
registry.register_hf_format(registry.HFFormat(
    "phi", _phi_config, lambda t, c, s: convert_phi_weights(t, c, source=s)))
