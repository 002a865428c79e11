"""`EncoderDecoderConfig`: T5 / mT5 / T5 v1.1, Switch Transformers and BART.

One frozen dataclass describes the encoder-decoder families of the paper's
benchmark (their Flax modules are in `t5` and `bart`):

* ``arch="t5"`` (T5 v1.0 and v1.1) and ``arch="mt5"``: RMS LayerNorm without
  bias or mean subtraction, pre-norm residual blocks, no biases anywhere,
  unscaled attention scores plus a learned relative-position bias (buckets,
  bidirectional in the encoder, causal in the decoder; one table per stack,
  held by the first block and shared by all), no absolute positions. v1.0:
  ReLU MLP, output head tied to the shared embedding with the decoder output
  rescaled by d^-0.5 before it. v1.1 / mT5: gated-GELU MLP
  (gelu_new(x W0) * (x W1)) and an untied head without the rescale.
* ``arch="switch"`` (Switch Transformers): T5 v1.0 with every
  ``sparse_step``-th MLP replaced by a top-1 mixture of ``num_experts`` experts
  with a per-sequence ``expert_capacity`` (see `t5.SwitchSparseMLP`).
* ``arch="bart"``: learned absolute positions with an offset of 2, token
  embedding optionally scaled by sqrt(d) (``scale_embedding``), a LayerNorm on
  the embeddings (``layernorm_embedding``), post-LayerNorm blocks with biases
  everywhere, exact GELU, head tied to the shared embedding plus a
  ``final_logits_bias``. With ``decoder_only=True`` the model is
  transformers' ``BartForCausalLM``: the decoder stack alone, run as a causal
  LM (its cross-attention weights exist, as in the checkpoint, but are unused).

``is_encoder_decoder`` is True except for ``decoder_only`` BART, which is
applied like a `CausalLM`. Parameters are float32; ``dtype`` is the compute
dtype of the matmuls. Norms, softmax, the router and the logits are float32.
"""

from __future__ import annotations

import dataclasses

from lensllm_jax.models.config import check_positive_ints

ENCDEC_ARCHS = ("t5", "mt5", "switch", "bart")
_DTYPES = ("float32", "bfloat16")
_ACTIVATIONS = ("relu", "gelu_new", "gelu")


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig:
  """Hyper-parameters of an encoder-decoder model (T5 family, Switch, BART).

  Fields left as ``None`` are filled with the architecture's default.

  Attributes:
    arch: "t5", "mt5", "switch" or "bart".
    vocab_size: V.
    d_model: d.
    n_layers: encoder blocks (and decoder blocks unless ``n_decoder_layers``).
    n_heads: attention heads H.
    d_ff: MLP hidden width.
    n_decoder_layers: decoder blocks (default ``n_layers``).
    head_dim: per-head width (T5's d_kv; default d / H; BART needs H Dh = d).
    activation: "relu", "gelu_new" or "gelu" (default relu for t5/switch,
      gelu_new for mt5, gelu for bart).
    gated: gated MLP act(x W0) * (x W1) (T5 v1.1, mT5; default True for mt5).
    tie_embeddings: output head = shared embedding (default False for mt5).
    scale_decoder_outputs: multiply the decoder output by d^-0.5 before the
      head (T5 v1.0 and Switch; default = tie_embeddings for t5/switch,
      False for mt5 and bart).
    norm_eps: LayerNorm / RMS norm epsilon (default 1e-6, BART 1e-5).
    relative_buckets, relative_max_distance: T5 relative-position buckets.
    max_len: BART's position table size (without the offset of 2); T5-style
      models have no absolute positions and do not check lengths.
    scale_embedding: BART multiplies token embeddings by sqrt(d).
    decoder_only: BART only: the decoder alone as a causal LM.
    num_experts, expert_capacity: Switch router size and per-sequence capacity.
    num_sparse_encoder_layers, num_sparse_decoder_layers: Switch: the MLP of
      block i is sparse iff i % step == 1 (or step == 1), with
      step = layers // num_sparse (layers if 0), as transformers builds it.
    router_z_loss_coef, router_aux_loss_coef: weights of the router z-loss and
      load-balancing loss added to the training loss (Switch).
    pad_token_id, decoder_start_token_id: the shift-right of the targets
      (T5: both 0; BART: pad 1, start 2).
    dtype: compute dtype, "float32" or "bfloat16".
    dropout_rate: dropout of the residual branches and attention (only with
      ``deterministic=False``).
  """

  arch: str = "t5"
  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  d_ff: int = 128
  n_decoder_layers: int | None = None
  head_dim: int | None = None
  activation: str | None = None
  gated: bool | None = None
  tie_embeddings: bool | None = None
  scale_decoder_outputs: bool | None = None
  norm_eps: float | None = None
  relative_buckets: int = 32
  relative_max_distance: int = 128
  max_len: int = 1024
  scale_embedding: bool = False
  decoder_only: bool = False
  num_experts: int = 8
  expert_capacity: int = 64
  num_sparse_encoder_layers: int = 0
  num_sparse_decoder_layers: int = 0
  router_z_loss_coef: float = 0.001
  router_aux_loss_coef: float = 0.001
  pad_token_id: int | None = None
  decoder_start_token_id: int | None = None
  dtype: str = "float32"
  dropout_rate: float = 0.0

  def __post_init__(self):
    if self.arch not in ENCDEC_ARCHS:
      raise ValueError(f"EncoderDecoderConfig.arch must be one of {ENCDEC_ARCHS}, "
                       f"got {self.arch!r}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"EncoderDecoderConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
    check_positive_ints(self, ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len",
                               "relative_buckets", "relative_max_distance", "num_experts",
                               "expert_capacity"))
    bart, mt5 = self.arch == "bart", self.arch == "mt5"
    defaults = {
        "n_decoder_layers": self.n_layers,
        "head_dim": self.d_model // self.n_heads,
        "activation": "gelu" if bart else ("gelu_new" if mt5 else "relu"),
        "gated": mt5,
        "tie_embeddings": not mt5,
        "norm_eps": 1e-5 if bart else 1e-6,
        "pad_token_id": 1 if bart else 0,
        "decoder_start_token_id": 2 if bart else 0,
    }
    for name, value in defaults.items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    if self.scale_decoder_outputs is None:
      object.__setattr__(self, "scale_decoder_outputs",
                         self.arch in ("t5", "switch") and self.tie_embeddings)
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"EncoderDecoderConfig.activation must be one of {_ACTIVATIONS}, "
                       f"got {self.activation!r}")
    check_positive_ints(self, ("n_decoder_layers",))
    if self.head_dim <= 0:
      raise ValueError(f"EncoderDecoderConfig.head_dim must be positive, got {self.head_dim}")
    if bart:
      if self.head_dim * self.n_heads != self.d_model:
        raise ValueError("arch='bart' needs head_dim * n_heads == d_model "
                         f"(got {self.head_dim} * {self.n_heads} != {self.d_model})")
      if self.gated or not self.tie_embeddings or self.scale_decoder_outputs:
        raise ValueError("arch='bart' has an ungated MLP and a tied, unscaled head")
    elif self.decoder_only:
      raise ValueError(f"decoder_only=True is only supported for arch='bart', not {self.arch!r}")
    if self.arch != "switch" and (self.num_sparse_encoder_layers or self.num_sparse_decoder_layers):
      raise ValueError("num_sparse_*_layers > 0 needs arch='switch'")
    for name in ("num_sparse_encoder_layers", "num_sparse_decoder_layers"):
      if getattr(self, name) < 0:
        raise ValueError(f"EncoderDecoderConfig.{name} must be >= 0")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"EncoderDecoderConfig.dropout_rate must be in [0, 1), "
                       f"got {self.dropout_rate}")

  @property
  def is_encoder_decoder(self) -> bool:
    """True: applied as (input_ids, decoder_input_ids); False for decoder-only BART."""
    return not self.decoder_only

  def sparse_step(self, decoder: bool) -> int:
    """transformers' encoder/decoder_sparse_step: layers // num_sparse (layers if none)."""
    layers = self.n_decoder_layers if decoder else self.n_layers
    sparse = self.num_sparse_decoder_layers if decoder else self.num_sparse_encoder_layers
    return layers // sparse if sparse > 0 else layers

  def is_sparse(self, layer: int, decoder: bool) -> bool:
    """Whether block `layer` of the encoder (or decoder) has a mixture-of-experts MLP.

    transformers' rule: i % step == 1 or step == 1 (so a model with no sparse
    layers requested still gets block 1 sparse when layers > 1, as there).
    """
    if self.arch != "switch":
      return False
    step = self.sparse_step(decoder)
    return layer % step == 1 or step == 1

  def replace(self, **changes) -> EncoderDecoderConfig:
    """A copy with ``changes`` applied (derived defaults are not re-derived)."""
    return dataclasses.replace(self, **changes)
