"""Model configuration of the decoder-only models (`ModelConfig`); presets are in `presets`.

One frozen dataclass describes both supported architectures:

* ``arch="gpt2"``: learned absolute positions, pre-LayerNorm blocks, fused
  QKV projection with biases, GELU MLP (tanh approximation, GPT-2's
  ``gelu_new``), tied input/output embeddings, final LayerNorm ``ln_f``.
* ``arch="llama"``: no position embedding table, rotary position embeddings
  (RoPE, Hugging Face's rotate-half convention), RMSNorm, SwiGLU MLP, no
  biases, optional grouped-query attention (``n_kv_heads < n_heads``), untied
  output head ``lm_head`` by default.

Parameters are always float32; ``dtype`` is the compute dtype of the matmuls
(float32 or bfloat16). Norms, softmax and logits are computed in float32.
"""

from __future__ import annotations

import dataclasses

_ARCHS = ("gpt2", "llama")
_DTYPES = ("float32", "bfloat16")
_ACTIVATIONS = ("gelu_new", "gelu", "silu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a causal language model.

  Fields left as ``None`` are filled with the architecture's default in
  ``__post_init__`` (so ``config.d_ff`` etc. are always ints after creation).

  Attributes:
    arch: "gpt2" or "llama".
    vocab_size: number of token ids V.
    max_len: maximum sequence length (GPT-2: size of the position table;
      Llama: only checked against the input length).
    d_model: residual stream width d.
    n_layers: number of transformer blocks L.
    n_heads: number of query heads H.
    d_ff: hidden width of the MLP (default 4 d for gpt2; for llama
      8d/3 rounded up to a multiple of 32).
    dtype: compute dtype, "float32" or "bfloat16".
    n_kv_heads: key/value heads (llama only; default ``n_heads``; must divide
      ``n_heads``).
    head_dim: per-head width (default d / H).
    norm_eps: epsilon of LayerNorm / RMSNorm.
    rope_theta: RoPE base (llama only).
    tie_embeddings: output head shares the token embedding (default True for
      gpt2, False for llama).
    activation: "gelu_new" (tanh GELU, GPT-2), "gelu" (exact) or "silu"
      (default "gelu_new" for gpt2, "silu" for llama).
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
  tie_embeddings: bool | None = None
  activation: str | None = None
  dropout_rate: float = 0.0

  def __post_init__(self):
    if self.arch not in _ARCHS:
      raise ValueError(f"ModelConfig.arch must be one of {_ARCHS}, got {self.arch!r}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"ModelConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
    for name in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    gpt2 = self.arch == "gpt2"
    if self.d_ff is None:
      d_ff = 4 * self.d_model if gpt2 else 32 * -(-(8 * self.d_model // 3) // 32)
      object.__setattr__(self, "d_ff", d_ff)
    if self.n_kv_heads is None:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                         f"n_heads={self.n_heads}; set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.tie_embeddings is None:
      object.__setattr__(self, "tie_embeddings", gpt2)
    if self.activation is None:
      object.__setattr__(self, "activation", "gelu_new" if gpt2 else "silu")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"ModelConfig.activation must be one of {_ACTIVATIONS}, "
                       f"got {self.activation!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide "
                       f"n_heads={self.n_heads}")
    if gpt2:
      if self.n_kv_heads != self.n_heads:
        raise ValueError("ModelConfig.n_kv_heads != n_heads is only supported for arch='llama'")
      if self.head_dim * self.n_heads != self.d_model:
        raise ValueError("arch='gpt2' needs head_dim * n_heads == d_model")
    if self.arch == "llama" and self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings")
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
    n_kv_heads (n_heads), tie_embeddings and activation (arch). E.g.
    ``presets["tiny-gpt2"].replace(d_model=128)`` has d_ff 512 and head_dim 32.
    """
    for derived, sources in _DERIVED.items():
      if derived not in changes and any(
          k in changes and changes[k] != getattr(self, k) for k in sources):
        changes[derived] = None
    return dataclasses.replace(self, **changes)


_DERIVED = {"d_ff": ("d_model", "arch"), "head_dim": ("d_model", "n_heads"),
            "n_kv_heads": ("n_heads",), "tie_embeddings": ("arch",), "activation": ("arch",)}
