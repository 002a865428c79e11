"""NLPMetrics: heavy-tailed self-regularisation (HT-SR) metrics of weight matrices.

Following Martin & Mahoney (JMLR 2021, "Implicit self-regularization in deep
neural networks"; the WeightWatcher metrics), each 2-D weight matrix W
(oriented [N, M] with N >= M) is summarised by its empirical spectral
density (ESD), the eigenvalues of X = W^T W / N, and the exponent alpha of a
power law p(x) ~ x^(-alpha) fitted to the ESD's tail. Smaller alpha (heavier
tail) indicates stronger correlations learnt by the layer; the model-level
feature is the mean alpha over layers.

The power-law fit is Clauset, Shalizi & Newman (SIAM Review 2009), sec. 3:
for a given xmin, the continuous maximum-likelihood estimate over the n
points x_i >= xmin is

    alpha_hat = 1 + n / sum_i log(x_i / xmin),

and xmin is the candidate (a data value) whose fitted power law has the
smallest Kolmogorov-Smirnov distance to the tail,

    D = max_{x >= xmin} |S(x) - P(x)|,  P(x) = 1 - (x / xmin)^(1 - alpha_hat),

S the empirical CDF of the tail (two-sided, at both ends of each step, as
scipy.stats.kstest). All of it is numpy float64 (eigenvalues by
numpy.linalg.eigvalsh in float64): it runs once per checkpoint, not in a
training loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """Result of `fit_power_law`.

  Attributes:
    alpha: MLE exponent of p(x) ~ x^-alpha on the tail.
    xmin: lower end of the tail.
    ks_distance: KS distance D between the tail and the fitted law.
    n_tail: number of points >= xmin.
    n: number of (positive) points given.
  """

  alpha: float
  xmin: float
  ks_distance: float
  n_tail: int
  n: int


@dataclasses.dataclass(frozen=True)
class NLPMetrics:
  """Per-layer HT-SR metrics of a parameter pytree (see `nlp_metrics`).

  Attributes:
    alphas: layer name -> power-law alpha of its ESD.
    weighted_alphas: layer name -> alpha * log10(lambda_max) (WeightWatcher's alpha-hat).
    fits: layer name -> full `PowerLawFit`.
    mean_alpha: mean of `alphas` over layers (the model-level NLPMetrics feature).
    mean_weighted_alpha: mean of `weighted_alphas`.
    skipped: layer name -> why it was not analysed (too small).
  """

  alphas: dict[str, float]
  weighted_alphas: dict[str, float]
  fits: dict[str, PowerLawFit]
  mean_alpha: float
  mean_weighted_alpha: float
  skipped: dict[str, str]


def power_law_alpha(x: np.ndarray, xmin: float) -> float:
  """Continuous power-law MLE for a fixed xmin: 1 + n / sum_{x_i >= xmin} log(x_i / xmin).

  Args:
    x: [n] positive samples.
    xmin: > 0; at least two samples must be >= xmin, not all equal to it.
  """
  x = np.asarray(x, np.float64)
  if xmin <= 0:
    raise ValueError(f"xmin must be > 0, got {xmin}")
  tail = x[x >= xmin]
  total = np.sum(np.log(tail / xmin))
  if tail.size < 2 or total <= 0:
    raise ValueError(f"power_law_alpha: need >= 2 samples above xmin={xmin} (got {tail.size})")
  return float(1.0 + tail.size / total)


def ks_distance(tail: np.ndarray, xmin: float, alpha: float) -> float:
  """Two-sided KS distance between samples >= xmin and the power law (xmin, alpha).

  D = max_i max((i + 1) / n - P(x_(i)), P(x_(i)) - i / n),  P(x) = 1 - (x / xmin)^(1 - alpha).
  """
  tail = np.sort(np.asarray(tail, np.float64))
  m = tail.size
  cdf = 1.0 - (tail / xmin) ** (1.0 - alpha)
  ranks = np.arange(m)
  return float(max(np.max((ranks + 1) / m - cdf), np.max(cdf - ranks / m)))


def _ks_per_candidate(x_sorted: np.ndarray, starts: np.ndarray,
                      chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """alpha and KS distance for xmin = x_sorted[s], for each s in starts (vectorised)."""
  n = x_sorted.size
  logx = np.log(x_sorted)
  suffix = np.concatenate([np.cumsum(logx[::-1])[::-1], [0.0]])  # suffix[i] = sum_{j>=i} log x_j
  alphas = np.empty(starts.size)
  dists = np.empty(starts.size)
  j = np.arange(n)
  for lo in range(0, starts.size, chunk):
    s = starts[lo:lo + chunk]
    n_tail = (n - s).astype(np.float64)
    xmin = x_sorted[s]
    alpha = 1.0 + n_tail / (suffix[s] - n_tail * np.log(xmin))
    # rank[c, j] = position of x_sorted[j] within candidate c's tail (valid where >= 0).
    rank = j[None, :] - s[:, None]
    valid = rank >= 0
    ratio = x_sorted[None, :] / xmin[:, None]
    model_cdf = 1.0 - np.power(ratio, 1.0 - alpha[:, None])
    upper = (rank + 1) / n_tail[:, None] - model_cdf
    lower = model_cdf - rank / n_tail[:, None]
    gap = np.where(valid, np.maximum(upper, lower), -np.inf)
    alphas[lo:lo + chunk] = alpha
    dists[lo:lo + chunk] = gap.max(axis=1)
  return alphas, dists


def fit_power_law(x: np.ndarray, *, min_tail: int = 10, xmin: float | None = None) -> PowerLawFit:
  """Fits p(x) ~ x^-alpha to the tail of positive samples (Clauset-Shalizi-Newman).

  Every distinct sample value leaving at least `min_tail` points in the tail
  is a candidate xmin; the one with the smallest KS distance wins (ties: the
  smallest xmin). Non-positive samples are dropped (they cannot be in a
  power-law tail).

  Args:
    x: [n] samples (e.g. the eigenvalues of one layer).
    min_tail: smallest tail size allowed (small tails give noisy alphas).
    xmin: fix xmin instead of choosing it.

  Returns:
    `PowerLawFit`.
  """
  x = np.asarray(x, np.float64).ravel()
  if not np.all(np.isfinite(x)):
    raise ValueError("fit_power_law: samples contain NaN or inf")
  x = np.sort(x[x > 0])
  n = x.size
  if min_tail < 2:
    raise ValueError(f"fit_power_law: min_tail must be >= 2, got {min_tail}")
  if xmin is not None:
    tail = x[x >= xmin]
    alpha = power_law_alpha(tail, xmin)
    return PowerLawFit(alpha, float(xmin), ks_distance(tail, xmin, alpha), int(tail.size), int(n))
  if n < min_tail + 1:
    raise ValueError(f"fit_power_law: {n} positive samples, need more than min_tail={min_tail}")
  # Candidates: first index of each distinct value, leaving >= min_tail points (and a
  # largest value strictly above xmin, else the MLE is undefined).
  firsts = np.flatnonzero(np.concatenate([[True], x[1:] != x[:-1]]))
  starts = firsts[(n - firsts >= min_tail) & (x[firsts] < x[-1])]
  if starts.size == 0:
    raise ValueError("fit_power_law: no valid xmin candidate (all samples equal?)")
  alphas, dists = _ks_per_candidate(x, starts)
  best = int(np.argmin(dists))
  s = int(starts[best])
  return PowerLawFit(float(alphas[best]), float(x[s]), float(dists[best]), int(n - s), int(n))


def empirical_spectral_density(weight: np.ndarray) -> np.ndarray:
  """Eigenvalues of X = W^T W / N for W oriented [N, M], N >= M (float64).

  Args:
    weight: [a, b] matrix (transposed internally if a < b).

  Returns:
    [M] ascending eigenvalues, M = min(a, b); clipped at 0 (round-off).
  """
  w = np.asarray(weight, np.float64)
  if w.ndim != 2:
    raise ValueError(f"empirical_spectral_density needs a 2-D matrix, got shape {w.shape}")
  if w.shape[0] < w.shape[1]:
    w = w.T
  return np.clip(np.linalg.eigvalsh(w.T @ w / w.shape[0]), 0.0, None)


def weight_matrices(params, *, include_embeddings: bool = False) -> dict[str, np.ndarray]:
  """The 2-D weight matrices of a parameter pytree, keyed by their path.

  Takes leaves named "kernel" with two dimensions (Dense layers: each of a
  fused matrix such as GPT-2's c_attn [d, 3d] counts as one layer), each
  matrix of a 3-D "kernel" [E, in, out] (the stacked experts of a Switch
  MLP: one layer per expert, named ".../kernel[e]") and, if asked,
  "embedding" tables. Vectors (biases, norm scales) are skipped.

  Returns:
    dict "h_0/attn/c_attn/kernel" -> [in, out] float64 array, in pytree order.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    name = "/".join(str(k) for k in keys)
    last = str(keys[-1]) if keys else ""
    if np.ndim(leaf) == 2 and (last == "kernel" or (include_embeddings and last == "embedding")):
      out[name] = np.asarray(leaf, np.float64)
    elif np.ndim(leaf) == 3 and last == "kernel":
      for e, matrix in enumerate(np.asarray(leaf, np.float64)):
        out[f"{name}[{e}]"] = matrix
  return out


def nlp_metrics(params: Mapping | dict[str, np.ndarray], *, min_tail: int = 10,
                include_embeddings: bool = False) -> NLPMetrics:
  """HT-SR alphas of every weight matrix and their mean (the NLPMetrics selection feature).

  Args:
    params: a parameter pytree (e.g. `CausalLM` params), or a dict name -> 2-D array.
    min_tail: smallest tail size of each power-law fit; matrices whose smaller
      dimension is <= min_tail are skipped (reported in `skipped`).
    include_embeddings: also analyse "embedding" tables.

  Returns:
    `NLPMetrics` with per-layer alphas, weighted alphas, fits, and their means.
  """
  matrices = weight_matrices(params, include_embeddings=include_embeddings)
  if not matrices:
    raise ValueError("nlp_metrics: no 2-D 'kernel' (or 'embedding') leaves in params")
  alphas, weighted, fits, skipped = {}, {}, {}, {}
  for name, w in matrices.items():
    if min(w.shape) <= min_tail:
      skipped[name] = f"smaller dimension {min(w.shape)} <= min_tail={min_tail}"
      continue
    evals = empirical_spectral_density(w)
    fit = fit_power_law(evals, min_tail=min_tail)
    fits[name] = fit
    alphas[name] = fit.alpha
    weighted[name] = fit.alpha * float(np.log10(evals[-1]))
  if not alphas:
    raise ValueError(f"nlp_metrics: every matrix was skipped: {skipped}")
  return NLPMetrics(alphas=alphas, weighted_alphas=weighted, fits=fits,
                    mean_alpha=float(np.mean(list(alphas.values()))),
                    mean_weighted_alpha=float(np.mean(list(weighted.values()))),
                    skipped=skipped)
