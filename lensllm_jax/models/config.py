"""Model configuration of the decoder-only models (`ModelConfig`); presets are in `presets`.

One frozen dataclass describes both supported architectures:

* ``arch="gpt2"``: learned absolute positions, pre-LayerNorm blocks, fused
  QKV projection with biases, GELU MLP (tanh approximation, GPT-2's
  ``gelu_new``), tied input/output embeddings, final LayerNorm ``ln_f``.
* ``arch="llama"``: no position embedding table, rotary position embeddings
  (RoPE, Hugging Face's rotate-half convention), RMSNorm, SwiGLU MLP, no
  biases, optional grouped-query attention (``n_kv_heads < n_heads``), untied
  output head ``lm_head`` by default.
* ``arch="opt"``: learned absolute positions looked up at position + 2 (the
  table has ``max_len + 2`` rows), separate q/k/v/out projections with
  biases, ReLU MLP, pre-LayerNorm (``pre_norm=True``) or post-LayerNorm
  blocks, optional final LayerNorm (``final_norm``), token embeddings of width
  ``word_embed_dim`` projected in and out (``project_in``/``project_out``,
  no bias) when it differs from ``d_model``, tied output embedding.
* ``arch="phi"``: one input LayerNorm feeding attention and MLP in parallel
  (x + attn(ln(x)) + mlp(ln(x))), separate q/k/v/dense projections with
  biases, rotary embeddings on the first ``rotary_dim`` channels of each
  head (partial rotary), GELU (tanh) MLP, final LayerNorm, untied output
  head with a bias.
* ``arch="gpt_neox"`` (Pythia): Phi's parallel block with two LayerNorms
  (x + attn(ln1(x)) + mlp(ln2(x))), one fused ``query_key_value`` projection
  (per head: q | k | v), partial rotary (default a quarter of each head),
  exact GELU, untied head without bias.
* The Llama family, ``arch`` in `LLAMA_FAMILY` (``llama``, ``qwen2``,
  ``qwen3``, ``mistral``, ``phi3``, ``gemma2``, ``gemma3``): the Llama block
  with options, whose defaults the arch sets: ``qkv_bias`` (qwen2),
  ``qk_norm`` (qwen3, gemma3: RMSNorm of each q and k head before RoPE),
  ``fused_projections`` (phi3: ``qkv_proj`` [q | k | v] and ``gate_up_proj``
  [gate | up]), Gemma's ``norm_offset`` (RMSNorm scale 1 + w),
  ``sandwich_norms`` (norms after attention and MLP too), ``embed_scale``
  (embeddings times sqrt(d)), ``query_pre_attn_scalar``, ``attn_softcap``
  and ``final_softcap`` (c tanh(x / c) of the scores / logits);
  sliding-window attention (``sliding_window`` W with ``layer_types``: a
  query at index i sees keys j with i - W < j <= i on "sliding_attention"
  layers); RoPE scaling (``rope_type`` "linear", "llama3" or "longrope")
  and Gemma 3's local RoPE base (``rope_local_theta``) on sliding layers.

Parameters are always float32; ``dtype`` is the compute dtype of the matmuls
(float32 or bfloat16). Norms, softmax and logits are computed in float32.
"""

from __future__ import annotations

import dataclasses

LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3")
_ARCHS = ("gpt2", "opt", "phi", "gpt_neox") + LLAMA_FAMILY
ROTARY_ARCHS = ("phi", "gpt_neox") + LLAMA_FAMILY
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
_DTYPES = ("float32", "bfloat16")
_ACTIVATIONS = ("gelu_new", "gelu", "silu", "relu")


def check_positive_ints(config, names) -> None:
  """Raises ValueError naming ``<class>.<field>`` for the first of ``names`` that is
  not an int > 0 (the model configs' shared size check)."""
  for name in names:
    value = getattr(config, name)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a causal language model.

  Fields left as ``None`` are filled with the architecture's default in
  ``__post_init__`` (so ``config.d_ff`` etc. are always ints after creation).

  Attributes:
    arch: "gpt2", "opt", "phi", "gpt_neox" or one of `LLAMA_FAMILY`.
    vocab_size: number of token ids V.
    max_len: maximum sequence length (GPT-2: size of the position table;
      OPT: the table has max_len + 2 rows; Llama, Phi: only checked against
      the input length).
    d_model: residual stream width d.
    n_layers: number of transformer blocks L.
    n_heads: number of query heads H.
    d_ff: hidden width of the MLP (default 4 d; for the Llama family 8d/3
      rounded up to a multiple of 32).
    dtype: compute dtype, "float32" or "bfloat16".
    n_kv_heads: key/value heads (rotary archs; default ``n_heads``; must
      divide ``n_heads``).
    head_dim: per-head width (default d / H).
    norm_eps: epsilon of LayerNorm / RMSNorm.
    rope_theta: RoPE base (rotary archs).
    rotary_dim: channels of each head that are rotated (default: head_dim
      for the Llama family, head_dim / 2 for phi (Phi's
      partial_rotary_factor 0.5), head_dim / 4 for gpt_neox (Pythia's
      rotary_pct), 0 for gpt2 and opt); even, at most head_dim.
    word_embed_dim: width of the token embedding (opt only; default
      d_model; OPT-350m's word_embed_proj_dim 512 with d_model 1024).
    pre_norm: LayerNorm before each sub-block (True) or after the residual
      sum (False; opt only, OPT-350m's do_layer_norm_before=False).
    final_norm: a final LayerNorm before the output head (default True,
      except opt with pre_norm=False; OPT's _remove_final_layer_norm).
    tie_embeddings: output head shares the token embedding (default True for
      gpt2, opt, gemma2 and gemma3, False otherwise).
    activation: "gelu_new" (tanh GELU, GPT-2), "gelu" (exact), "silu" or
      "relu" (default "gelu_new" for gpt2, phi and Gemma, "silu" for the rest
      of the Llama family, "relu" for opt, "gelu" for gpt_neox).
    dropout_rate: dropout on embeddings, attention probabilities and residual
      branches (active only with ``deterministic=False``; default 0).

  Llama-family options (``arch`` in `LLAMA_FAMILY`; None = the arch's default):
    qkv_bias: biases on the q, k, v projections (default: qwen2).
    qk_norm: RMSNorm over each head of q and k before RoPE, params
      ``q_norm`` / ``k_norm`` [Dh] (default: qwen3, gemma3).
    fused_projections: one ``qkv_proj`` [d, (H + 2K) Dh] and one
      ``gate_up_proj`` [d, 2 d_ff] instead of q/k/v and gate/up (phi3).
    norm_offset: RMSNorm computes x_hat (norm_offset + w); 1.0 for Gemma
      (weights stored as w, initialised to 0), else 0.0.
    sandwich_norms: Gemma's four norms per block: x + post_attn(attn(in(x))),
      then x + post_ff(mlp(pre_ff(x))) (default: gemma2, gemma3).
    embed_scale: token embeddings times sqrt(d) (default: gemma2, gemma3).
    query_pre_attn_scalar: attention scores scaled by its -1/2 power
      (default head_dim, i.e. 1 / sqrt(Dh)).
    attn_softcap, final_softcap: c tanh(s / c) of the scaled attention scores
      / of the output logits (Gemma 2; None = off).
    sliding_window: W, keys a sliding layer's query sees (itself and W - 1
      before it, by index); None = no sliding layer.
    layer_types: "full_attention" / "sliding_attention" per layer (default:
      all sliding if sliding_window is set, gemma2 alternating from
      sliding, gemma3 five sliding then one full).
    rope_type: "default", "linear" (positions / rope_factor), "llama3"
      (Llama 3.1's frequency-dependent division by rope_factor) or
      "longrope" (Phi-3: frequencies divided by rope_short_factor, or
      rope_long_factor once a position reaches rope_original_max_len, and
      cos/sin times sqrt(1 + ln(max_len / orig) / ln(orig))).
    rope_factor, rope_low_freq_factor, rope_high_freq_factor,
    rope_original_max_len, rope_short_factor, rope_long_factor: their
      parameters (Hugging Face's names without the rope_ prefix).
    rope_local_theta: RoPE base of the sliding layers with default RoPE
      (Gemma 3's rope_local_base_freq); None = rope_theta and rope_type.
  """

  arch: str = "gpt2"
  vocab_size: int = 256
  max_len: int = 128
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  d_ff: int | None = None
  dtype: str = "float32"
  n_kv_heads: int | None = None
  head_dim: int | None = None
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rotary_dim: int | None = None
  word_embed_dim: int | None = None
  pre_norm: bool = True
  final_norm: bool | None = None
  tie_embeddings: bool | None = None
  activation: str | None = None
  dropout_rate: float = 0.0
  qkv_bias: bool | None = None
  qk_norm: bool | None = None
  fused_projections: bool | None = None
  norm_offset: float | None = None
  sandwich_norms: bool | None = None
  embed_scale: bool | None = None
  query_pre_attn_scalar: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int | None = None
  rope_short_factor: tuple[float, ...] | None = None
  rope_long_factor: tuple[float, ...] | None = None
  rope_local_theta: float | None = None

  def __post_init__(self):
    if self.arch not in _ARCHS:
      raise ValueError(f"ModelConfig.arch must be one of {_ARCHS}, got {self.arch!r}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"ModelConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
    check_positive_ints(self, ("vocab_size", "max_len", "d_model", "n_layers", "n_heads"))
    arch = self.arch
    llama = arch in LLAMA_FAMILY
    if self.d_ff is None:
      d_ff = 32 * -(-(8 * self.d_model // 3) // 32) if llama else 4 * self.d_model
      object.__setattr__(self, "d_ff", d_ff)
    if self.n_kv_heads is None:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                         f"n_heads={self.n_heads}; set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.rotary_dim is None:
      rotary = {"phi": self.head_dim // 2, "gpt_neox": self.head_dim // 4}.get(
          arch, self.head_dim if llama else 0)
      object.__setattr__(self, "rotary_dim", rotary)
    if self.word_embed_dim is None:
      object.__setattr__(self, "word_embed_dim", self.d_model)
    if self.final_norm is None:
      object.__setattr__(self, "final_norm", self.pre_norm)
    if self.tie_embeddings is None:
      object.__setattr__(self, "tie_embeddings", arch in ("gpt2", "opt", "gemma2", "gemma3"))
    if self.activation is None:
      gemma = arch in ("gemma2", "gemma3")
      activation = ("gelu_new" if gemma else "silu") if llama else {
          "opt": "relu", "gpt_neox": "gelu"}.get(arch, "gelu_new")
      object.__setattr__(self, "activation", activation)
    self._set_llama_options()
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"ModelConfig.activation must be one of {_ACTIVATIONS}, "
                       f"got {self.activation!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide "
                       f"n_heads={self.n_heads}")
    if arch in ("gpt2", "opt", "gpt_neox"):
      if self.n_kv_heads != self.n_heads:
        raise ValueError(f"ModelConfig.n_kv_heads != n_heads is not supported for arch={arch!r}")
      if self.head_dim * self.n_heads != self.d_model:
        raise ValueError(f"arch={arch!r} needs head_dim * n_heads == d_model")
    if arch in ROTARY_ARCHS and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
      raise ValueError(f"ModelConfig.rotary_dim={self.rotary_dim} must be even and in "
                       f"(0, head_dim={self.head_dim}]")
    if arch not in ROTARY_ARCHS and self.rotary_dim:
      raise ValueError(f"ModelConfig.rotary_dim is only used by {ROTARY_ARCHS}, got "
                       f"{self.rotary_dim} for arch={arch!r}")
    if arch != "opt":
      for name, value, default in (("word_embed_dim", self.word_embed_dim, self.d_model),
                                   ("pre_norm", self.pre_norm, True),
                                   ("final_norm", self.final_norm, True)):
        if value != default:
          raise ValueError(f"ModelConfig.{name}={value!r} is only supported for arch='opt'")
    if self.word_embed_dim <= 0:
      raise ValueError(f"ModelConfig.word_embed_dim must be positive, got {self.word_embed_dim}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"ModelConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")

  def _set_llama_options(self) -> None:
    """Fills and checks the Llama-family options (None everywhere else)."""
    arch = self.arch
    options = ("qkv_bias", "qk_norm", "fused_projections", "norm_offset", "sandwich_norms",
               "embed_scale", "query_pre_attn_scalar", "attn_softcap", "final_softcap",
               "sliding_window", "layer_types", "rope_original_max_len", "rope_short_factor",
               "rope_long_factor", "rope_local_theta")
    if arch not in LLAMA_FAMILY:
      for name in options:
        if getattr(self, name) not in (None, False):
          raise ValueError(f"ModelConfig.{name} is only supported for the Llama family "
                           f"{LLAMA_FAMILY}, got {getattr(self, name)!r} for arch={arch!r}")
      if self.rope_type != "default":
        raise ValueError(f"ModelConfig.rope_type={self.rope_type!r} needs a Llama-family arch")
      return
    gemma = arch in ("gemma2", "gemma3")
    defaults = {"qkv_bias": arch == "qwen2", "qk_norm": arch in ("qwen3", "gemma3"),
                "fused_projections": arch == "phi3", "norm_offset": 1.0 if gemma else 0.0,
                "sandwich_norms": gemma, "embed_scale": gemma,
                "query_pre_attn_scalar": float(self.head_dim)}
    for name, value in defaults.items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    for name in ("rope_short_factor", "rope_long_factor"):
      if getattr(self, name) is not None:  # JSON gives lists; the config stays hashable
        object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
    window = self.sliding_window
    if window is not None and (not isinstance(window, int) or window <= 0):
      raise ValueError(f"ModelConfig.sliding_window must be a positive int or None, got {window!r}")
    types = self.layer_types
    if types is None:
      if window is None:
        types = ("full_attention",) * self.n_layers
      else:
        period = {"gemma2": 2, "gemma3": 6}.get(arch)
        types = tuple("full_attention" if period and (i + 1) % period == 0 else "sliding_attention"
                      for i in range(self.n_layers))
    types = tuple(types)
    object.__setattr__(self, "layer_types", types)
    if len(types) != self.n_layers or any(t not in LAYER_TYPES for t in types):
      raise ValueError(f"ModelConfig.layer_types must be {self.n_layers} of {LAYER_TYPES}, "
                       f"got {types!r}")
    if window is None and "sliding_attention" in types:
      raise ValueError("ModelConfig.layer_types has sliding layers but sliding_window is None")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"ModelConfig.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
    if self.rope_type in ("llama3", "longrope") and self.rope_original_max_len is None:
      raise ValueError(f"ModelConfig.rope_type={self.rope_type!r} needs rope_original_max_len")
    if self.rope_type == "longrope":
      for name in ("rope_short_factor", "rope_long_factor"):
        value = getattr(self, name)
        if value is None or len(value) != self.rotary_dim // 2:
          raise ValueError(f"ModelConfig.{name} needs rotary_dim / 2 = {self.rotary_dim // 2} "
                           f"factors, got {value!r}")
    for name in ("attn_softcap", "final_softcap", "query_pre_attn_scalar", "rope_local_theta"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"ModelConfig.{name} must be positive or None, got {value!r}")

  @property
  def is_encoder_decoder(self) -> bool:
    """False: a `ModelConfig` always describes a decoder-only model."""
    return False

  def replace(self, **changes) -> ModelConfig:
    """Returns a copy with ``changes`` applied.

    Derived fields not given in ``changes`` are re-derived when a field they
    depend on changes: d_ff (d_model, arch), head_dim (d_model, n_heads),
    n_kv_heads (n_heads), tie_embeddings and activation (arch), rotary_dim
    (arch, d_model, n_heads, head_dim), word_embed_dim (d_model), final_norm
    (arch, pre_norm). E.g.
    ``presets["tiny-gpt2"].replace(d_model=128)`` has d_ff 512 and head_dim 32.
    """
    for derived, sources in _DERIVED.items():
      if derived not in changes and any(
          k in changes and changes[k] != getattr(self, k) for k in sources):
        changes[derived] = None
    return dataclasses.replace(self, **changes)


_DERIVED = {"d_ff": ("d_model", "arch"), "head_dim": ("d_model", "n_heads"),
            "query_pre_attn_scalar": ("arch", "d_model", "n_heads", "head_dim"),
            "layer_types": ("arch", "n_layers", "sliding_window"),
            "n_kv_heads": ("n_heads",), "tie_embeddings": ("arch",), "activation": ("arch",),
            **{name: ("arch",) for name in ("qkv_bias", "qk_norm", "fused_projections",
                                            "norm_offset", "sandwich_norms", "embed_scale")},
            "rotary_dim": ("arch", "d_model", "n_heads", "head_dim"),
            "word_embed_dim": ("d_model",), "final_norm": ("arch", "pre_norm")}
