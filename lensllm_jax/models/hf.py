"""Hugging Face checkpoints (config.json + safetensors) and tokenizer.json.

`load_hf_checkpoint(dir)` reads a checkpoint directory in the hub layout
(config.json plus model.safetensors, or sharded model-0000x-of-0000n.safetensors
with model.safetensors.index.json) and returns our `ModelConfig` and the
"params" pytree of `build(config)`, dispatching on config.json's
``model_type`` through `registry.HF_FORMATS`. Registered here: GPT2LMHeadModel /
GPT2Model (model_type "gpt2"), OPTForCausalLM ("opt"), PhiForCausalLM ("phi"),
GPTNeoXForCausalLM ("gpt_neox", Pythia) and the Llama family: LlamaForCausalLM
("llama"; Llama 3.x RoPE scaling and tied heads: SmolLM, Llama 3.2),
MistralForCausalLM ("mistral"), Qwen2ForCausalLM ("qwen2", Qwen2 and 2.5),
Qwen3ForCausalLM ("qwen3"), Phi3ForCausalLM ("phi3"), Gemma2ForCausalLM
("gemma2") and Gemma3ForCausalLM ("gemma3_text", the text models).

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
* Fused matrices are kept fused, so that a weight matrix here is one of
  torch's: Phi-3's qkv_proj ([q | k | v] rows) and gate_up_proj ([gate | up]),
  GPT-NeoX's query_key_value (rows head by head, q_h | k_h | v_h).

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
from lensllm_jax.models.config import LLAMA_FAMILY, ModelConfig
from lensllm_jax.models.registry import CheckpointError

# Non-parameter buffers some checkpoints carry (causal-mask tables, RoPE tables).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq",
                     ".attention.bias", ".attention.masked_bias")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of a checkpoint as float32 numpy arrays.

  Args:
    path: a .safetensors file, or a directory holding model.safetensors or
      model.safetensors.index.json (sharded checkpoints).

  Returns:
    dict name -> float32 array (bfloat16/float16 checkpoints are upcast).
  """
  from safetensors import SafetensorError, safe_open  # local import: I/O helper only

  path = pathlib.Path(path)
  if path.is_dir():
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if single.exists():
      files = [single]
    elif index.exists():
      weight_map = read_json_object(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
      files = [path / name for name in sorted(set(weight_map.values()))]
    else:
      raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors checkpoints are supported)")
  else:
    files = [path]
  tensors = {}
  for file in files:
    if not file.is_file():
      raise CheckpointError(f"checkpoint shard {file} not found")
    # framework="flax" reads bfloat16 too (numpy cannot); kept on the host CPU.
    try:
      with (jax.default_device(jax.devices("cpu")[0]),
            safe_open(str(file), framework="flax") as f):
        for name in f.keys():
          tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{file}: not a readable safetensors file "
                            f"({' '.join(str(e).split())})") from None
  return tensors


def read_json_object(path: str | os.PathLike) -> dict:
  """A checkpoint's JSON object; `CheckpointError` naming the file and line otherwise."""
  path = pathlib.Path(path)
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
  except (OSError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: cannot be read ({e})") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


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


def _rope_parameters(hf_config: dict, layer_type: str | None = None) -> dict:
  """config.json's RoPE parameters as one dict: transformers 5's "rope_parameters"
  (per layer type for Gemma 3) over the older "rope_scaling" and top-level keys."""
  rope = hf_config.get("rope_parameters") or {}
  if layer_type is not None and isinstance(rope.get(layer_type), dict):
    rope = rope[layer_type]
  merged = dict(hf_config.get("rope_scaling") or {})
  merged.update(rope)
  if "rope_type" not in merged:
    merged["rope_type"] = merged.get("type", "default")
  for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
    if key not in merged and hf_config.get(key) is not None:
      merged[key] = hf_config[key]
  return merged


def _default_rope(hf_config: dict, source: str) -> dict:
  """RoPE base and partial_rotary_factor of a config whose rope_type must be default."""
  rope = _rope_parameters(hf_config)
  if rope["rope_type"] != "default":
    raise CheckpointError(f"{source}: rope_type={rope['rope_type']!r} is not supported "
                          "(only default)")
  return {"theta": float(rope.get("rope_theta", 10000.0)),
          "partial_rotary_factor": rope.get("partial_rotary_factor")}


def _rope_fields(rope: dict, max_len: int, source: str) -> dict:
  """Our rope_* config fields from `_rope_parameters` (default, linear, llama3, longrope)."""
  rope_type = {"su": "longrope"}.get(rope["rope_type"], rope["rope_type"])
  fields = {"rope_theta": float(rope.get("rope_theta", 10000.0)), "rope_type": rope_type}
  if rope_type == "linear":
    fields["rope_factor"] = float(rope["factor"])
  elif rope_type == "llama3":
    fields.update(rope_factor=float(rope["factor"]),
                  rope_low_freq_factor=float(rope["low_freq_factor"]),
                  rope_high_freq_factor=float(rope["high_freq_factor"]),
                  rope_original_max_len=int(rope["original_max_position_embeddings"]))
  elif rope_type == "longrope":
    if rope.get("attention_factor") is not None:
      raise CheckpointError(f"{source}: longrope attention_factor is not supported")
    orig = int(rope["original_max_position_embeddings"])
    fields.update(rope_original_max_len=orig,
                  rope_factor=float(rope.get("factor") or max_len / orig),
                  rope_short_factor=tuple(map(float, rope["short_factor"])),
                  rope_long_factor=tuple(map(float, rope["long_factor"])))
  elif rope_type != "default":
    raise CheckpointError(f"{source}: rope_type={rope_type!r} is not supported "
                          "(default, linear, llama3, longrope)")
  return fields


# model_type -> our arch (the Llama family; `_llama_family_config` reads them all).
_LLAMA_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2",
                      "qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma2",
                      "gemma3_text": "gemma3"}


def _layer_types(hf_config: dict, n_layers: int) -> tuple[tuple[str, ...] | None, int | None]:
  """(layer_types, sliding_window) of a Llama-family config.json.

  Mistral and Phi-3 slide on every layer when sliding_window is set; Qwen2/3
  only with use_sliding_window, on layers >= max_window_layers (or as
  layer_types says); Gemma as layer_types says (transformers 5 writes them).
  """
  window = hf_config.get("sliding_window")
  model_type = hf_config["model_type"]
  if model_type in ("qwen2", "qwen3") and not hf_config.get("use_sliding_window", False):
    window = None
  if window is None:
    return None, None
  types = hf_config.get("layer_types")
  if types is None and model_type in ("qwen2", "qwen3"):
    first = hf_config.get("max_window_layers", n_layers)
    types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
  return (tuple(types) if types is not None else None), int(window)


def _llama_family_config(hf_config: dict, dtype: str, source: str) -> ModelConfig:
  """Llama, Mistral, Qwen2 / 2.5, Qwen3, Phi-3, Gemma 2 and Gemma 3 (text) config.json."""
  model_type = hf_config["model_type"]
  arch = _LLAMA_MODEL_TYPES[model_type]
  gemma = arch in ("gemma2", "gemma3")
  act = (hf_config.get("hidden_activation") or hf_config.get("hidden_act")
         or ("gelu_pytorch_tanh" if gemma else "silu"))
  activation = {"silu": "silu", "gelu_pytorch_tanh": "gelu_new", "gelu_new": "gelu_new"}.get(act)
  if activation is None or (activation == "silu") == gemma:
    raise CheckpointError(f"{source}: hidden activation {act!r} is not supported for "
                          f"model_type {model_type!r}")
  bias_flags = ("attention_bias", "mlp_bias") if arch != "qwen2" else ("mlp_bias",)
  for flag in bias_flags:
    if hf_config.get(flag, False):
      raise CheckpointError(f"{source}: {flag}=True is not supported")
  if hf_config.get("use_bidirectional_attention"):
    raise CheckpointError(f"{source}: use_bidirectional_attention=True is not supported")
  heads, d = hf_config["num_attention_heads"], hf_config["hidden_size"]
  n_layers = hf_config["num_hidden_layers"]
  head_dim = hf_config.get("head_dim") or d // heads
  max_len = hf_config.get("max_position_embeddings", 2048)
  layer_types, window = _layer_types(hf_config, n_layers)
  full_rope = _rope_parameters(hf_config, "full_attention" if arch == "gemma3" else None)
  if arch == "gemma3" and "rope_theta" not in full_rope:
    full_rope["rope_theta"] = 1_000_000.0  # Gemma3TextConfig's global default
  factor = full_rope.get("partial_rotary_factor") or 1.0
  options = {}
  if arch == "gemma3":
    local = _rope_parameters(hf_config, "sliding_attention")
    if "sliding_attention" not in (hf_config.get("rope_parameters") or {}):
      local = {"rope_type": "default", "rope_theta": hf_config.get("rope_local_base_freq", 1e4)}
    if local["rope_type"] != "default":
      raise CheckpointError(f"{source}: sliding-layer rope_type={local['rope_type']!r} is not "
                            "supported (only default)")
    options["rope_local_theta"] = float(local.get("rope_theta", 10000.0))
  if gemma:
    options.update(query_pre_attn_scalar=float(hf_config.get("query_pre_attn_scalar", head_dim)),
                   attn_softcap=hf_config.get("attn_logit_softcapping"),
                   final_softcap=hf_config.get("final_logit_softcapping"))
  return ModelConfig(
      arch=arch, vocab_size=hf_config["vocab_size"], max_len=max_len, d_model=d,
      n_layers=n_layers, n_heads=heads, d_ff=hf_config["intermediate_size"], dtype=dtype,
      n_kv_heads=hf_config.get("num_key_value_heads") or heads, head_dim=head_dim,
      norm_eps=hf_config.get("rms_norm_eps", 1e-6), rotary_dim=int(head_dim * factor),
      tie_embeddings=hf_config.get("tie_word_embeddings", gemma), activation=activation,
      sliding_window=window, layer_types=layer_types,
      **_rope_fields(full_rope, max_len, source), **options)


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


def _gpt_neox_config(hf_config: dict, dtype: str, source: str) -> ModelConfig:
  if "rotary_emb_base" in hf_config and "rope_theta" not in hf_config:  # Pythia's name
    hf_config = dict(hf_config, rope_theta=hf_config["rotary_emb_base"])
  rope = _default_rope(hf_config, source)
  if not hf_config.get("use_parallel_residual", True):
    raise CheckpointError(f"{source}: use_parallel_residual=False is not supported")
  if not hf_config.get("attention_bias", True):
    raise CheckpointError(f"{source}: attention_bias=False is not supported")
  if hf_config.get("tie_word_embeddings", False):
    raise CheckpointError(f"{source}: tie_word_embeddings=True is not supported for gpt_neox")
  act = hf_config.get("hidden_act", "gelu")
  activation = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
                "gelu_fast": "gelu_new", "relu": "relu", "silu": "silu"}.get(act)
  if activation is None:
    raise CheckpointError(f"{source}: hidden_act={act!r} is not supported")
  heads, d = hf_config["num_attention_heads"], hf_config["hidden_size"]
  factor = rope["partial_rotary_factor"] or hf_config.get("rotary_pct", 0.25)
  return ModelConfig(
      arch="gpt_neox", vocab_size=hf_config["vocab_size"],
      max_len=hf_config.get("max_position_embeddings", 2048), d_model=d,
      n_layers=hf_config["num_hidden_layers"], n_heads=heads,
      d_ff=hf_config["intermediate_size"], dtype=dtype,
      norm_eps=hf_config.get("layer_norm_eps", 1e-5), rope_theta=rope["theta"],
      rotary_dim=int(d // heads * factor), tie_embeddings=False, activation=activation)


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
  """Maps Hugging Face tensors of the Llama family (LlamaForCausalLM, MistralForCausalLM,
  Qwen2/Qwen3ForCausalLM, Phi3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM:
  "model.layers.0.self_attn.q_proj.weight", ...) to our params; nn.Linear weights
  [out, in] are transposed to kernels [in, out]. Which tensors are expected follows
  the config's options (q/k/v biases, q/k norms, fused qkv_proj / gate_up_proj,
  sandwich norms, tied head: "lm_head.weight" is then ignored). Gemma's norm
  weights are stored as w of 1 + w, as ours (`layers.RMSNorm` offset).

  Args:
    tensors: name -> array (e.g. from `read_safetensors`).
    config: a Llama-family `ModelConfig` matching the tensors.
    source: name used in error messages.

  Returns:
    The "params" pytree of `CausalLM(config)` (float32).
  """
  c = config
  if c.arch not in LLAMA_FAMILY:
    raise ValueError(f"convert_llama_weights needs a Llama-family arch {LLAMA_FAMILY}, "
                     f"got {c.arch!r}")
  r = TensorReader(tensors, source, ("model.",))
  d, f = c.d_model, c.d_ff
  q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim

  def linear(name, n_in, n_out, bias=False):
    return _linear(r, name, n_in, n_out, bias=bias)

  def norm(name, width=d):
    return {"scale": r.take(f"{name}.weight", (width,))}

  params = {"embed": {"embedding": r.take("embed_tokens.weight", (c.vocab_size, d))}}
  for i in range(c.n_layers):
    p = f"layers.{i}"
    if c.fused_projections:
      attn = {"qkv_proj": linear(f"{p}.self_attn.qkv_proj", d, q_dim + 2 * kv_dim, c.qkv_bias)}
      mlp = {"gate_up_proj": linear(f"{p}.mlp.gate_up_proj", d, 2 * f)}
    else:
      attn = {name: linear(f"{p}.self_attn.{name}", d, width, c.qkv_bias)
              for name, width in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim))}
      mlp = {"gate_proj": linear(f"{p}.mlp.gate_proj", d, f),
             "up_proj": linear(f"{p}.mlp.up_proj", d, f)}
    attn["o_proj"] = linear(f"{p}.self_attn.o_proj", q_dim, d)
    if c.qk_norm:
      attn["q_norm"] = norm(f"{p}.self_attn.q_norm", c.head_dim)
      attn["k_norm"] = norm(f"{p}.self_attn.k_norm", c.head_dim)
    mlp["down_proj"] = linear(f"{p}.mlp.down_proj", f, d)
    norms = ["input_layernorm", "post_attention_layernorm"]
    if c.sandwich_norms:
      norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    params[f"layers_{i}"] = {"self_attn": attn, "mlp": mlp,
                             **{name: norm(f"{p}.{name}") for name in norms}}
  params["norm"] = norm("norm")
  if not c.tie_embeddings:
    params["lm_head"] = {"kernel": r.take("lm_head.weight", (c.vocab_size, d), transpose=True)}
  r.check_all_used(ignore=("lm_head.weight",) if c.tie_embeddings else ())
  return check_structure(params, c, source)


def convert_gpt_neox_weights(tensors: dict[str, np.ndarray], config: ModelConfig, *,
                             source: str = "checkpoint") -> dict:
  """Maps Hugging Face GPTNeoXForCausalLM tensors ("gpt_neox.layers.0.attention.
  query_key_value.weight", ..., "embed_out.weight") to our params (`phi`'s layout
  with two norms and the fused per-head query_key_value kept as it is).

  Returns:
    The "params" pytree of `CausalLM(config)` (float32).
  """
  c = config
  if c.arch != "gpt_neox":
    raise ValueError(f"convert_gpt_neox_weights needs arch='gpt_neox', got {c.arch!r}")
  r = TensorReader(tensors, source, ("gpt_neox.",))
  d, f = c.d_model, c.d_ff
  params = {"embed_tokens": {"embedding": r.take("embed_in.weight", (c.vocab_size, d))}}
  for i in range(c.n_layers):
    p = f"layers.{i}"
    params[f"layers_{i}"] = {
        "input_layernorm": _layer_norm(r, f"{p}.input_layernorm", d),
        "post_attention_layernorm": _layer_norm(r, f"{p}.post_attention_layernorm", d),
        "self_attn": {"query_key_value": _linear(r, f"{p}.attention.query_key_value", d, 3 * d),
                      "dense": _linear(r, f"{p}.attention.dense", d, d)},
        "mlp": {"fc1": _linear(r, f"{p}.mlp.dense_h_to_4h", d, f),
                "fc2": _linear(r, f"{p}.mlp.dense_4h_to_h", f, d)},
    }
  params["final_layernorm"] = _layer_norm(r, "final_layer_norm", d)
  # The hub's name; transformers 5's module calls it lm_head (its parameter names).
  head = "lm_head.weight" if "embed_out.weight" not in r.tensors else "embed_out.weight"
  params["lm_head"] = {"kernel": r.take(head, (c.vocab_size, d), transpose=True)}
  r.check_all_used()
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
  if not config_file.is_file():
    raise CheckpointError(f"{config_file} not found (expected a Hugging Face checkpoint "
                          "directory with config.json and model.safetensors)")
  hf_config = read_json_object(config_file)
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
  if not file.is_file():
    raise CheckpointError(f"{file} not found (expected a tokenizers tokenizer.json)")
  try:
    return Tokenizer.from_file(str(file))
  except Exception as e:  # tokenizers raises a bare Exception on a malformed file
    raise CheckpointError(f"{file}: not a readable tokenizer.json "
                          f"({' '.join(str(e).split())[:200]})") from None


registry.register_hf_format(registry.HFFormat(
    "gpt2", _gpt2_config, lambda t, c, s: convert_gpt2_weights(t, c, source=s)))
for _model_type in _LLAMA_MODEL_TYPES:
  registry.register_hf_format(registry.HFFormat(
      _model_type, _llama_family_config, lambda t, c, s: convert_llama_weights(t, c, source=s)))
registry.register_hf_format(registry.HFFormat(
    "gpt_neox", _gpt_neox_config, lambda t, c, s: convert_gpt_neox_weights(t, c, source=s)))
registry.register_hf_format(registry.HFFormat(
    "opt", _opt_config, lambda t, c, s: convert_opt_weights(t, c, source=s)))
registry.register_hf_format(registry.HFFormat(
    "phi", _phi_config, lambda t, c, s: convert_phi_weights(t, c, source=s)))
