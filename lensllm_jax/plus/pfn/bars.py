"""The bar distribution: the PFNs' output, a piecewise-uniform density over log L."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PredictiveSummary:
  """Summaries of a predictive distribution of log L, float64 arrays of one shape
  ([C, Q] from `BarDistribution.summaries`; [M] in a PFN's `SelectionResult.extras`).

  Attributes:
    mean_log: E log L.
    mean: E L.
    sd_log: sd of log L.
    quantiles_log: level q -> the q-quantile of log L, for the levels asked for.
  """
  mean_log: np.ndarray
  mean: np.ndarray
  sd_log: np.ndarray
  quantiles_log: Mapping[float, np.ndarray] = dataclasses.field(default_factory=dict)

  def column(self, j: int) -> PredictiveSummary:
    """The summaries [C] of query j of [C, Q] summaries."""
    return PredictiveSummary(self.mean_log[:, j], self.mean[:, j], self.sd_log[:, j],
                             {q: v[:, j] for q, v in self.quantiles_log.items()})


@dataclasses.dataclass(frozen=True)
class BarDistribution:
  """Piecewise-constant density on [z_min, z_max] with `num_bins` equal bins.

  For bin probabilities p [..., B] (softmax of the logits): density p_b / w in
  bin b, w the bin width. Summaries are float64 numpy.
  """
  z_min: float = -3.5
  z_max: float = 1.0
  num_bins: int = 256

  @property
  def edges(self) -> np.ndarray:
    return np.linspace(self.z_min, self.z_max, self.num_bins + 1)

  @property
  def width(self) -> float:
    return (self.z_max - self.z_min) / self.num_bins

  def nll(self, logits, z):
    """-log density of z under the bars (jax, [...]); z is clipped into the support."""
    idx = jnp.clip(jnp.floor((z - self.z_min) / self.width), 0, self.num_bins - 1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, idx[..., None], axis=-1)[..., 0] + np.log(self.width)

  def probs(self, logits) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)

  def mean(self, logits) -> np.ndarray:
    """E[z] [...]."""
    e = self.edges
    return self.probs(logits) @ (0.5 * (e[1:] + e[:-1]))

  def mean_exp(self, logits) -> np.ndarray:
    """E[exp(z)] [...] (exact for the bar density: mean of e^z over each bin)."""
    e = self.edges
    return self.probs(logits) @ ((np.exp(e[1:]) - np.exp(e[:-1])) / self.width)

  def quantile(self, logits, q: float) -> np.ndarray:
    """The q-quantile of z [...] (linear inside a bin)."""
    p = self.probs(logits)
    cdf = np.cumsum(p, -1)
    b = np.minimum((cdf < q).sum(-1), self.num_bins - 1)
    below = np.take_along_axis(cdf, b[..., None], -1)[..., 0] - np.take_along_axis(
      p, b[..., None], -1)[..., 0]
    pb = np.maximum(np.take_along_axis(p, b[..., None], -1)[..., 0], 1e-300)
    frac = np.clip((q - below) / pb, 0.0, 1.0)
    return self.z_min + (b + frac) * self.width

  def summaries(self, logits, y_last, quantiles: Sequence[float] = ()) -> PredictiveSummary:
    """Predictive summaries [C, Q] of log L = y_last + z from logits [C, Q, B], y_last [C]:
    E log L, E L, sd of log L and the q-quantile of log L for each requested q."""
    y_last = np.asarray(y_last, np.float64)[:, None]
    return PredictiveSummary(self.mean(logits) + y_last,
                             self.mean_exp(logits) * np.exp(y_last), self.std(logits),
                             {q: self.quantile(logits, q) + y_last for q in quantiles})

  def std(self, logits) -> np.ndarray:
    """sd of z [...] (bar density: bin variance w^2 / 12 included)."""
    e = self.edges
    c = 0.5 * (e[1:] + e[:-1])
    p = self.probs(logits)
    m = p @ c
    return np.sqrt(np.maximum(p @ (c * c) - m * m, 0.0) + self.width ** 2 / 12.0)
