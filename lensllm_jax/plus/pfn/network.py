"""The PFN networks: `CurvePFN` (one curve's points in context) and `ContextPFN` (plus the
other models' curves of the file), their configs and input encodings.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lensllm_jax.plus.pfn.bars import BarDistribution

X_SCALE = np.log(8192.0)  # log(1638400 / 200): the grid's positive part maps to [0, 1]


ZERO_SHOT_X = -0.25


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Transformer size and the output bars."""
  d_model: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  bars: BarDistribution = BarDistribution()


class Layer(nn.Module):
  """Pre-LN block: every token attends to the first ctx_len tokens (masked), then an MLP.

  With `set_tokens` [N, S, d] (the context PFN's other curves), every token also
  attends to them, added through a learned gate tanh(g), g initialised at
  `set_gate_init` (small: a layer starts close to the single-curve layer; not
  0, where neither the gate nor the set attention would get a gradient). The
  set parameters are named; the single-curve ones keep their automatic names.
  """
  d_model: int
  num_heads: int
  mlp_dim: int
  set_gate_init: float = 0.0

  @nn.compact
  def __call__(self, h, ctx_len, ctx_mask, set_tokens=None, set_mask=None):
    # h [N, T, d]; the first ctx_len tokens are the context; everyone attends to it.
    x = nn.LayerNorm()(h)
    att = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.d_model)(
      x, x[:, :ctx_len], mask=ctx_mask[:, None, None, :])
    h = h + att
    if set_tokens is not None:
      x = nn.LayerNorm(name="set_norm")(h)
      att = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.d_model,
                                            name="set_attention")(
        x, set_tokens, mask=set_mask[:, None, None, :])
      # a row with no other curve attends to nothing
      att = jnp.where(set_mask.any(-1)[:, None, None], att, 0.0)
      gate = self.param("set_gate", nn.initializers.constant(self.set_gate_init), ())
      h = h + jnp.tanh(gate) * att
    x = nn.LayerNorm()(h)
    return h + nn.Dense(self.d_model)(nn.gelu(nn.Dense(self.mlp_dim)(x)))


class CurvePFN(nn.Module):
  """(context [N, Tc, 3], context mask [N, Tc], query x [N, Tq]) -> logits [N, Tq, B].

  Optional set_tokens [N, S, d] / set_mask [N, S]: extra tokens every layer
  attends to through a gated attention (`Layer`, gate initialised at
  set_gate_init); the context PFN uses them.
  """
  config: ModelConfig
  set_gate_init: float = 0.0

  @nn.compact
  def __call__(self, ctx, ctx_mask, query_x, set_tokens=None, set_mask=None):
    c = self.config
    ctx_tok = nn.Dense(c.d_model)(nn.gelu(nn.Dense(c.d_model)(ctx)))
    q_tok = nn.Dense(c.d_model)(nn.gelu(nn.Dense(c.d_model)(query_x[..., None])))
    q_tok = q_tok + self.param("query_type", nn.initializers.normal(0.02), (c.d_model,))
    h = jnp.concatenate([ctx_tok, q_tok], axis=1)
    tc = ctx.shape[1]
    for i in range(c.num_layers):
      h = Layer(c.d_model, c.num_heads, c.mlp_dim, self.set_gate_init, name=f"_Layer_{i}")(
        h, tc, ctx_mask, set_tokens, set_mask)
    return nn.Dense(c.bars.num_bins)(nn.LayerNorm()(h[:, tc:]))


def encode_x(data_size) -> np.ndarray:
  """x = log(D / 200) / log(8192); D = 0 -> ZERO_SHOT_X."""
  d = np.asarray(data_size, np.float64)
  return np.where(d > 0, np.log(np.maximum(d, 1e-300) / 200.0) / X_SCALE, ZERO_SHOT_X)


def encode_context(data_sizes, log_loss, mask):
  """Context tokens of C curves and their normalisation.

  Args:
    data_sizes: [P] or [C, P]; log_loss, mask: [C, P] (mask: visible points).

  Returns:
    (tokens [C, P, 3] float32, mask [C, P], y_last [C]): tokens (x, y - y_last,
    is-zero-shot); y_last = log L at the largest visible D > 0.
  """
  y = np.asarray(log_loss, np.float64)
  mask = np.asarray(mask, bool)
  d = np.broadcast_to(np.asarray(data_sizes, np.float64), y.shape)
  pos = mask & (d > 0)
  if not pos.any(1).all():
    bad = np.flatnonzero(~pos.any(1)).tolist()
    raise ValueError(f"CurvePFN: curves {bad} have no visible D > 0 point")
  last = d.shape[1] - 1 - np.argmax(pos[:, ::-1], axis=1)
  y_last = y[np.arange(y.shape[0]), last]
  rel = np.where(mask, y - y_last[:, None], 0.0)
  tok = np.stack([encode_x(d), rel, (d == 0).astype(np.float64)], -1)
  tok = np.where(mask[..., None], tok, 0.0)
  return tok.astype(np.float32), mask, y_last


@dataclasses.dataclass(frozen=True)
class ContextModelConfig:
  """The trunk (a `ModelConfig`) and the other-curve encoder's depth."""
  trunk: ModelConfig = ModelConfig()
  encoder_layers: int = 2
  set_gate_init: float = 0.1


def encode_file(data_sizes, log_loss, mask, model_mask, log10_size):
  """Network inputs of files of curves.

  Args:
    data_sizes: [P]; log_loss, mask: [F, M, P]; model_mask, log10_size: [F, M].

  Returns:
    (ctx [F, M, P, 3] float32, ctx_mask [F, M, P], model_mask [F, M],
    pair [F, M, M, 2] float32 (target t, other j: clipped y_last_j - y_last_t,
    (log10 N_j - log10 N_t) / 2), y_last [F, M]).
  """
  y = np.asarray(log_loss, np.float64)
  f, m, p = y.shape
  mm = np.asarray(model_mask, bool)
  # Padded models get a dummy visible point so that the encoding is defined.
  vis = np.where(mm[..., None], np.asarray(mask, bool), np.arange(p) == p - 1)
  ctx, cm, y_last = encode_context(data_sizes, np.where(vis, y, 0.0).reshape(-1, p),
                                             vis.reshape(-1, p))
  y_last = np.where(mm, y_last.reshape(f, m), 0.0)
  cm = cm.reshape(f, m, p) & mm[..., None]
  ctx = np.where(cm[..., None], ctx.reshape(f, m, p, 3), 0.0).astype(np.float32)
  level = np.clip(y_last[:, None, :] - y_last[:, :, None], -3.0, 3.0)
  ls = np.asarray(log10_size, np.float64)
  pair = np.stack([level, (ls[:, None, :] - ls[:, :, None]) / 2.0], -1).astype(np.float32)
  return ctx, cm, mm, pair, y_last


class ContextPFN(nn.Module):
  """(ctx [F, M, P, 3], ctx_mask [F, M, P], model_mask [F, M], pair [F, M, M, 2],
  query_x [F, M, Q]) -> logits [F, M, Q, B] of every model given the others."""
  config: ContextModelConfig

  @nn.compact
  def __call__(self, ctx, ctx_mask, model_mask, pair, query_x):
    c = self.config.trunk
    f, m, p, _ = ctx.shape
    # Summary of every curve (encoder over its own visible points, masked mean).
    tok = nn.Dense(c.d_model, name="encoder_out")(
      nn.gelu(nn.Dense(c.d_model, name="encoder_in")(ctx.reshape(f * m, p, 3))))
    cm = ctx_mask.reshape(f * m, p)
    for i in range(self.config.encoder_layers):
      tok = Layer(c.d_model, c.num_heads, c.mlp_dim, name=f"encoder_{i}")(tok, p, cm)
    w = cm[..., None].astype(tok.dtype)
    summary = (tok * w).sum(1) / jnp.maximum(w.sum(1), 1.0)          # [F*M, d]
    summary = summary.reshape(f, 1, m, c.d_model)
    # One token per (target t, other j).
    feats = jnp.concatenate([jnp.broadcast_to(summary, (f, m, m, c.d_model)), pair], -1)
    set_tok = nn.Dense(c.d_model, name="pair_out")(
      nn.gelu(nn.Dense(c.d_model, name="pair_in")(feats)))
    set_mask = model_mask[:, None, :] & model_mask[:, :, None] & ~jnp.eye(m, dtype=bool)
    logits = CurvePFN(c, self.config.set_gate_init, name="trunk")(
      ctx.reshape(f * m, p, 3), cm, query_x.reshape(f * m, -1),
      set_tok.reshape(f * m, m, c.d_model), set_mask.reshape(f * m, m))
    return logits.reshape(f, m, query_x.shape[-1], -1)
