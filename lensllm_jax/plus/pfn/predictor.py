"""Trained PFNs as predictors of log L(D) at any D: `CurvePFNPredictor`, `ContextPFNPredictor`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from lensllm_jax.plus.pfn.bars import BarDistribution
from lensllm_jax.plus.pfn.network import (
  ContextModelConfig,
  ContextPFN,
  CurvePFN,
  ModelConfig,
  encode_context,
  encode_file,
  encode_x,
)
from lensllm_jax.plus.pfn.prior import PUBLIC_GRID, HierarchyConfig, PriorConfig


class CurvePFNPredictor:
  """A trained PFN: predictive distributions of log L at query sizes."""
  model_config_cls = ModelConfig
  prior_cls = PriorConfig

  def __init__(self, model_config: ModelConfig, params, prior: PriorConfig = PriorConfig()):
    self.model_config = model_config
    self.params = params
    self.prior = prior
    self._model = CurvePFN(model_config)
    self._apply = jax.jit(self._model.apply)

  @property
  def bars(self) -> BarDistribution:
    return self.model_config.bars

  def logits(self, data_sizes, log_loss, mask, query_sizes):
    """(logits [C, Q, B], y_last [C]) of z = log L(query) - y_last for C curves.

    Args:
      data_sizes: [P] (or [C, P]) sizes of the columns; log_loss, mask [C, P].
      query_sizes: [Q] query data sizes (> 0).
    """
    ctx, cm, y_last = encode_context(data_sizes, log_loss, mask)
    q = np.asarray(query_sizes, np.float64).reshape(-1)
    if np.any(q <= 0):
      raise ValueError(f"CurvePFN: query sizes must be > 0, got {q.tolist()}")
    qx = np.broadcast_to(encode_x(q), (ctx.shape[0], q.size)).astype(np.float32)
    # Pad the context to a fixed length (one compile for every budget).
    width = max(PUBLIC_GRID.size, ctx.shape[1])
    pad = width - ctx.shape[1]
    ctx = np.concatenate([ctx, np.zeros((ctx.shape[0], pad, 3), np.float32)], 1)
    cm = np.concatenate([cm, np.zeros((cm.shape[0], pad), bool)], 1)
    return np.asarray(self._apply(self.params, ctx, cm, qx), np.float64), y_last

  def predict(self, data_sizes, log_loss, mask, query_sizes, quantiles: Sequence[float] = ()):
    """Predictive summaries at query sizes for C curves (float64).

    Returns:
      `bars.PredictiveSummary` [C, Q]: E log L, E L, sd of log L and the
      quantiles of log L at the requested levels.
    """
    logits, y_last = self.logits(data_sizes, log_loss, mask, query_sizes)
    return self.bars.summaries(logits, y_last, quantiles)


class ContextPFNPredictor:
  """A trained context PFN: each model's predictive distribution given all others."""
  model_config_cls = ContextModelConfig
  prior_cls = HierarchyConfig

  def __init__(self, model_config: ContextModelConfig, params, prior=HierarchyConfig()):
    self.model_config = model_config
    self.params = params
    self.prior = prior
    self._apply = jax.jit(ContextPFN(model_config).apply)

  @property
  def bars(self) -> BarDistribution:
    return self.model_config.trunk.bars

  def file_logits(self, data_sizes, log_loss, mask, model_mask, log10_size, query_sizes):
    """(logits [F, M, Q, B], y_last [F, M]) of z = log L(query) - y_last for F
    padded files of M model slots, each model given the others of its file.

    Args:
      data_sizes: [P] column sizes (ascending, from 0); log_loss, mask: [F, M, P].
      model_mask: [F, M] (False: padding); log10_size: [F, M] log10 parameter counts.
      query_sizes: [Q] query data sizes (> 0).
    """
    y = np.asarray(log_loss, np.float64)
    if y.ndim != 3:
      raise ValueError(f"ContextPFN: log_loss must be [F, M, P], got shape {y.shape}")
    q = np.asarray(query_sizes, np.float64).reshape(-1)
    if np.any(q <= 0):
      raise ValueError(f"ContextPFN: query sizes must be > 0, got {q.tolist()}")
    ls = np.asarray(log10_size, np.float64)
    mm = np.asarray(model_mask, bool)
    if ls.shape != y.shape[:2] or not np.all(np.isfinite(ls[mm])):
      raise ValueError(f"ContextPFN: log10_size must be finite of shape {y.shape[:2]}, got {ls}")
    # Pad the points to the public grid's length (one compile per [F, M]).
    d = np.asarray(data_sizes, np.float64)
    pad = max(PUBLIC_GRID.size - d.size, 0)
    d = np.concatenate([d, d[-1] + 1.0 + np.arange(pad)])
    zeros = np.zeros(y.shape[:2] + (pad,))
    y = np.concatenate([y, zeros], -1)
    m = np.concatenate([np.asarray(mask, bool), zeros.astype(bool)], -1)
    ctx, cm, mm, pair, y_last = encode_file(d, y, m, mm, ls)
    qx = np.broadcast_to(encode_x(q), y.shape[:2] + (q.size,)).astype(np.float32)
    return np.asarray(self._apply(self.params, ctx, cm, mm, pair, qx), np.float64), y_last

  def predict(self, data_sizes, log_loss, mask, log10_size, query_sizes,
              quantiles: Sequence[float] = ()):
    """Predictive summaries (`BarDistribution.summaries`, a `bars.PredictiveSummary` [M, Q])
    of the M models of one file (log_loss, mask [M, P], log10_size [M])."""
    y = np.asarray(log_loss, np.float64)
    if y.ndim != 2:
      raise ValueError(f"ContextPFN: log_loss must be [M, P], got shape {y.shape}")
    logits, y_last = self.file_logits(data_sizes, y[None], np.asarray(mask)[None],
                                      np.ones((1, y.shape[0]), bool),
                                      np.asarray(log10_size)[None], query_sizes)
    return self.bars.summaries(logits[0], y_last[0], quantiles)
