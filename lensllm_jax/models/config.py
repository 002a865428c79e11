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

Parameters are always float32; ``dtype`` is the compute dtype of the matmuls
(float32 or bfloat16). Norms, softmax and logits are computed in float32.
"""

from __future__ import annotations

import dataclasses

_ARCHS = ("gpt2", "llama", "opt", "phi")
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
    arch: "gpt2", "llama", "opt" or "phi".
    vocab_size: number of token ids V.
    max_len: maximum sequence length (GPT-2: size of the position table;
      OPT: the table has max_len + 2 rows; Llama, Phi: only checked against
      the input length).
    d_model: residual stream width d.
    n_layers: number of transformer blocks L.
    n_heads: number of query heads H.
    d_ff: hidden width of the MLP (default 4 d; for llama 8d/3 rounded up
      to a multiple of 32).
    dtype: compute dtype, "float32" or "bfloat16".
    n_kv_heads: key/value heads (llama and phi; default ``n_heads``; must
      divide ``n_heads``).
    head_dim: per-head width (default d / H).
    norm_eps: epsilon of LayerNorm / RMSNorm.
    rope_theta: RoPE base (llama and phi).
    rotary_dim: channels of each head that are rotated (default: head_dim
      for llama, head_dim / 2 for phi (Phi's partial_rotary_factor 0.5),
      0 for gpt2 and opt); even, at most head_dim.
    word_embed_dim: width of the token embedding (opt only; default
      d_model; OPT-350m's word_embed_proj_dim 512 with d_model 1024).
    pre_norm: LayerNorm before each sub-block (True) or after the residual
      sum (False; opt only, OPT-350m's do_layer_norm_before=False).
    final_norm: a final LayerNorm before the output head (default True,
      except opt with pre_norm=False; OPT's _remove_final_layer_norm).
    tie_embeddings: output head shares the token embedding (default True for
      gpt2 and opt, False for llama and phi).
    activation: "gelu_new" (tanh GELU, GPT-2), "gelu" (exact), "silu" or
      "relu" (default "gelu_new" for gpt2 and phi, "silu" for llama, "relu"
      for opt).
    dropout_rate: dropout on embeddings, attention probabilities and residual
      branches (active only with ``deterministic=False``; default 0).
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

  def __post_init__(self):
    if self.arch not in _ARCHS:
      raise ValueError(f"ModelConfig.arch must be one of {_ARCHS}, got {self.arch!r}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"ModelConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
    check_positive_ints(self, ("vocab_size", "max_len", "d_model", "n_layers", "n_heads"))
    arch = self.arch
    if self.d_ff is None:
      d_ff = 32 * -(-(8 * self.d_model // 3) // 32) if arch == "llama" else 4 * self.d_model
      object.__setattr__(self, "d_ff", d_ff)
    if self.n_kv_heads is None:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                         f"n_heads={self.n_heads}; set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.rotary_dim is None:
      rotary = {"llama": self.head_dim, "phi": self.head_dim // 2}.get(arch, 0)
      object.__setattr__(self, "rotary_dim", rotary)
    if self.word_embed_dim is None:
      object.__setattr__(self, "word_embed_dim", self.d_model)
    if self.final_norm is None:
      object.__setattr__(self, "final_norm", self.pre_norm)
    if self.tie_embeddings is None:
      object.__setattr__(self, "tie_embeddings", arch in ("gpt2", "opt"))
    if self.activation is None:
      activation = {"llama": "silu", "opt": "relu"}.get(arch, "gelu_new")
      object.__setattr__(self, "activation", activation)
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"ModelConfig.activation must be one of {_ACTIVATIONS}, "
                       f"got {self.activation!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide "
                       f"n_heads={self.n_heads}")
    if arch in ("gpt2", "opt"):
      if self.n_kv_heads != self.n_heads:
        raise ValueError(f"ModelConfig.n_kv_heads != n_heads is not supported for arch={arch!r}")
      if self.head_dim * self.n_heads != self.d_model:
        raise ValueError(f"arch={arch!r} needs head_dim * n_heads == d_model")
    rotary_archs = ("llama", "phi")
    if arch in rotary_archs and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
      raise ValueError(f"ModelConfig.rotary_dim={self.rotary_dim} must be even and in "
                       f"(0, head_dim={self.head_dim}]")
    if arch not in rotary_archs and self.rotary_dim:
      raise ValueError(f"ModelConfig.rotary_dim is only used by {rotary_archs}, got "
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
            "n_kv_heads": ("n_heads",), "tie_embeddings": ("arch",), "activation": ("arch",),
            "rotary_dim": ("arch", "d_model", "n_heads", "head_dim"),
            "word_embed_dim": ("d_model",), "final_norm": ("arch", "pre_norm")}
