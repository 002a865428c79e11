"""A prior-fitted network (PFN) for fine-tuning curves: Bayesian extrapolation of log L(D).

The idea is that of LC-PFN (Adriaensen et al., NeurIPS 2023), written here for
this project's laws: a small transformer is trained ONLY on synthetic curves
drawn from a prior over fine-tuning laws; given the visible points of one curve
and a query size D it outputs a predictive distribution of log L(D), which
approximates the Bayesian posterior predictive under that prior.

Prior (`sample_prior_curves`, `PriorConfig`). Every curve lives on the public
grid D in {0, 200, 400, ..., 1638400} (15 points; the study grid 0..25600 is
its prefix). log L is scale-free for all the laws below (multiplying B and E by
c shifts log L by log c), and the network only sees log L relative to the last
visible point, so the overall level is irrelevant and set to 1. Families (one
per curve, weights `family_weights`):

  lensllm    L = B / (F + D^beta) + E                  (= the rectified law)
  dynamic    L = B / (F(D) + D^beta) + E,  F(D) = F0 (rho + (1 - rho) e^(-D / D_c))
             (the NTK-dynamics law of `dynamic_law.py`: F decays as the
              fine-tuning set grows)
  vanilla    L = (B / D^beta + E)^alpha                (D > 0; L(0) see the gap)
  bnsl       L = E + b (D + 1)^(-c0) (1 + ((D + 1) / d1)^(1 / f))^(-c1 f)
             (a broken power law with one break, Caballero et al. 2023: a slow
              pre-power phase of slope c0, then slope c0 + c1 -- the two-phase
              picture of AtS)

Ranges (all log-uniform "logU" unless said; chosen from what the parameters
mean and broad published ranges, never fitted to a curve file):
  * data exponents beta, c0 + c1: logU(0.05, 1.5) -- the data-scaling
    exponents reported for pre-training (0.05-0.3) and fine-tuning (up to ~1)
    with margin; c0 ~ U(0, 0.1) (a near-flat pre-power phase).
  * transition size D_t = F^(1 / beta), d1, D_c: logU(1, 1e8) -- from "before
    the first point" to "beyond D*" (the grid spans 200..1.6e6).
  * floor fraction E / L(0): U(0, 0.9) (bnsl: half the curves have E = 0, a
    pure power law at large D as AtS assumes); vanilla alpha: logU(0.5, 2).
  * dynamic: rho ~ U(0, 1) (how much of F survives), D_c as D_t.
  * zero-shot gap: the loss at D = 0 is that of the law times e^g with,
    per curve, g = 0 (prob 0.3), g ~ logU(0.01, 2) (prob 0.6: the drop of a
    format/task adaptation in the first few hundred samples, up to a factor
    e^2) or g ~ -logU(0.01, 0.3) (prob 0.1). Vanilla is undefined at 0: its
    L(0) is L(200) e^|g| with g always drawn from the positive part.
  * noise: log L += N(0, sigma^2), sigma ~ logU(1e-3, 0.05) per curve (test
    losses of a few hundred samples; the study's early-stopped runs); with
    prob 0.1 one point gets an extra N(0, (5 sigma)^2) outlier.
  * curves whose log L spans more than `max_log_range` (3.5 nats) over D > 0
    are redrawn (the bar distribution below has a finite support).

Network (`CurvePFN`). Context tokens are the visible points (x, y, is-zero-shot)
with x = log(D / 200) / log(8192) (0..1 on the grid; the zero-shot point has
x = -0.25 and the flag) and y = log L - log L(D_last), D_last the largest
visible D > 0. Query tokens carry x only. Each pre-LN layer lets every token
attend to the context tokens (queries never see each other or themselves), then
an MLP. The head gives logits over `num_bins` bins of z = log L(D) - log L(D_last)
on [z_min, z_max] (`BarDistribution`, the Riemann distribution of LC-PFN:
piecewise-constant density), trained by the negative log-likelihood of the
true z of every hidden point (`train`, optax AdamW, one seed).

Uses float32 (a network); the bar-distribution summaries are float64 numpy.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lensllm_jax import errors, selection
from lensllm_jax.progress import progress

__all__ = [
  "FAMILIES",
  "PUBLIC_GRID",
  "BarDistribution",
  "CurvePFN",
  "CurvePFNPredictor",
  "ModelConfig",
  "PriorConfig",
  "TrainConfig",
  "curve_pfn_selection",
  "load_predictor",
  "make_batch",
  "sample_prior_curves",
  "save_predictor",
  "train",
]

PUBLIC_GRID = np.array([0.0] + [200.0 * 2 ** k for k in range(14)])
FAMILIES = ("lensllm", "dynamic", "vanilla", "bnsl")
X_SCALE = np.log(8192.0)  # log(1638400 / 200): the grid's positive part maps to [0, 1]
ZERO_SHOT_X = -0.25
METHOD_NAME = "CurvePFN"


# ---------------------------------------------------------------- prior ---


@dataclasses.dataclass(frozen=True)
class PriorConfig:
  """The prior over curves (see the module docstring for the meaning of each range)."""
  family_weights: tuple[float, ...] = (0.35, 0.15, 0.2, 0.3)  # FAMILIES order
  beta: tuple[float, float] = (0.05, 1.5)
  transition: tuple[float, float] = (1.0, 1e8)
  floor_fraction: tuple[float, float] = (0.0, 0.9)
  alpha: tuple[float, float] = (0.5, 2.0)
  c0: tuple[float, float] = (0.0, 0.1)
  sharpness: tuple[float, float] = (0.1, 2.0)
  gap_probs: tuple[float, float, float] = (0.3, 0.6, 0.1)  # none, positive, negative
  gap_positive: tuple[float, float] = (0.01, 2.0)
  gap_negative: tuple[float, float] = (0.01, 0.3)
  noise_sd: tuple[float, float] = (1e-3, 0.05)
  outlier_prob: float = 0.1
  outlier_scale: float = 5.0
  max_log_range: float = 3.5

  def __post_init__(self):
    if len(self.family_weights) != len(FAMILIES) or min(self.family_weights) < 0:
      raise ValueError(f"PriorConfig.family_weights: need {len(FAMILIES)} weights >= 0 "
                       f"({FAMILIES}), got {self.family_weights}")


def _logu(rng, lo, hi, n):
  return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def independent_draws(rng: np.random.Generator, n: int):
  """The parameter source of the single-curve prior: every parameter of every curve
  drawn independently, uniform (or log-uniform when `log`) on [lo, hi]; [n, 1]."""
  def draw(name: str, lo: float, hi: float, log: bool = False) -> np.ndarray:
    del name
    return (_logu(rng, lo, hi, n) if log else rng.uniform(lo, hi, n))[:, None]
  return draw


def family_log_loss(family: str, draw: Callable, d: np.ndarray, p: PriorConfig) -> np.ndarray:
  """[n, P] log L of n curves of one family on data sizes d [P] (before gap and noise).

  `draw(name, lo, hi, log)` gives the [n, 1] values of the named parameter in
  [lo, hi] (`independent_draws`, or a hierarchical source in `context_pfn.py`);
  names: beta, transition, floor, rho, decay_size, alpha, c0, sharpness, has_floor.
  """
  dd = d[None, :]
  if family in ("lensllm", "dynamic"):
    beta = draw("beta", *p.beta, log=True)
    log_f = beta * np.log(draw("transition", *p.transition, log=True))   # F = D_t^beta
    e = draw("floor", *p.floor_fraction)
    if family == "dynamic":
      rho = draw("rho", 0.0, 1.0)
      dc = draw("decay_size", *p.transition, log=True)
      log_f = log_f + np.log(rho + (1.0 - rho) * np.exp(-dd / dc))
    # L(0) = 1: B / F(0) + E = 1 (F(0) = F0 in both), so B = (1 - E) F0.
    log_b = np.log1p(-e) + log_f[:, :1]
    log_dpow = beta * np.log(np.maximum(dd, 1e-10))
    return np.logaddexp(log_b - np.logaddexp(log_f, log_dpow), np.log(np.maximum(e, 1e-300)))
  if family == "vanilla":
    beta = draw("beta", *p.beta, log=True)
    alpha = draw("alpha", *p.alpha, log=True)
    e = draw("floor", *p.floor_fraction)
    # normalised so that B 200^-beta + E = 1 (L(200) = 1)
    log_b = np.log1p(-e) + beta * np.log(200.0)
    pos = np.maximum(dd, 1.0)
    out = alpha * np.logaddexp(log_b - beta * np.log(pos), np.log(np.maximum(e, 1e-300)))
    return np.where(dd > 0, out, np.nan)  # L(0) is set by the gap
  if family == "bnsl":
    c0 = draw("c0", *p.c0)
    c1 = np.maximum(draw("beta", *p.beta, log=True) - c0, 0.01)
    d1 = draw("transition", *p.transition, log=True)
    f = draw("sharpness", *p.sharpness, log=True)
    x = np.log(dd + 1.0)
    power = -c0 * x - c1 * f * np.logaddexp(0.0, (x - np.log(d1)) / f)
    has_floor = draw("has_floor", 0.0, 1.0) < 0.5
    e = np.where(has_floor, draw("floor", *p.floor_fraction), 0.0)
    # b (D+1)^... at D = 0 is b (1 + d1^(-1/f))^(-c1 f) ~ b; level: b + E = 1
    return np.logaddexp(np.log1p(-e) + power, np.log(np.maximum(e, 1e-300)))
  raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def sample_prior_curves(rng: np.random.Generator, num_curves: int, prior: PriorConfig = PriorConfig(),
                        data_sizes: np.ndarray = PUBLIC_GRID, families: Sequence[str] | None = None,
                        with_gap: bool = True, with_noise: bool = True):
  """Draws curves from the prior (float64 numpy).

  Args:
    rng: numpy Generator (the seed makes the draw reproducible).
    num_curves: number of curves C.
    prior: the ranges.
    data_sizes: [P] grid, ascending, starting at D = 0.
    families: restrict to these families (equal weights); default the mixture.
    with_gap, with_noise: include the zero-shot gap / observation noise.

  Returns:
    (noisy log L [C, P], noise-free log L [C, P], family index [C]).
  """
  d = np.asarray(data_sizes, np.float64)
  if d[0] != 0 or np.any(np.diff(d) <= 0):
    raise ValueError(f"sample_prior_curves: data_sizes must start at 0 and increase, got {d}")
  names = list(FAMILIES if families is None else families)
  w = (np.array([prior.family_weights[FAMILIES.index(f)] for f in names]) if families is None
       else np.ones(len(names)))
  out_clean = np.empty((0, d.size))
  out_fam = np.empty(0, int)
  while out_clean.shape[0] < num_curves:
    n = 2 * (num_curves - out_clean.shape[0]) + 8
    fam = rng.choice(len(names), size=n, p=w / w.sum())
    y = np.empty((n, d.size))
    for i, f in enumerate(names):
      sel = fam == i
      if sel.any():
        y[sel] = family_log_loss(f, independent_draws(rng, int(sel.sum())), d, prior)
    # zero-shot gap
    kind = rng.choice(3, size=n, p=np.asarray(prior.gap_probs) / np.sum(prior.gap_probs))
    gap = np.where(kind == 1, _logu(rng, *prior.gap_positive, n),
                   np.where(kind == 2, -_logu(rng, *prior.gap_negative, n), 0.0))
    if not with_gap:
      gap = np.zeros(n)
    is_vanilla = np.array([names[i] == "vanilla" for i in fam])
    van_gap = _logu(rng, *prior.gap_positive, n)
    y0 = np.where(is_vanilla, y[:, 1] + (np.abs(gap) if with_gap else van_gap), y[:, 0] + gap)
    y[:, 0] = y0
    pos = y[:, d > 0]
    ok = np.all(np.isfinite(y), 1) & (pos.max(1) - pos.min(1) <= prior.max_log_range)
    out_clean = np.concatenate([out_clean, y[ok]])
    out_fam = np.concatenate([out_fam, np.array([FAMILIES.index(names[i]) for i in fam[ok]],
                                                int)])
  clean, fam = out_clean[:num_curves], out_fam[:num_curves]
  if not with_noise:
    return clean.copy(), clean, fam
  sd = _logu(rng, *prior.noise_sd, num_curves)[:, None]
  return clean + observation_noise(rng, sd, clean.shape, prior), clean, fam


def observation_noise(rng: np.random.Generator, sd: np.ndarray, shape, prior: PriorConfig):
  """[C, P] noise of log L: N(0, sd^2) per point (sd [C, 1]), and with prob
  `outlier_prob` one point per curve gets an extra N(0, (outlier_scale sd)^2)."""
  num_curves, num_points = shape
  noise = sd * rng.standard_normal(shape)
  outlier = rng.uniform(size=num_curves) < prior.outlier_prob
  where = rng.integers(0, num_points, num_curves)
  noise[np.arange(num_curves), where] += (outlier * prior.outlier_scale * sd[:, 0]
                                          * rng.standard_normal(num_curves))
  return noise


# ------------------------------------------------------- bar distribution ---


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

  def summaries(self, logits, y_last, quantiles: Sequence[float] = ()) -> dict:
    """Predictive summaries of log L = y_last + z from logits [C, Q, B], y_last [C].

    Returns dict "mean_log" [C, Q] (E log L), "mean" (E L), "sd_log" and
    "q{q}" (the q-quantile of log L) for each requested q.
    """
    y_last = np.asarray(y_last, np.float64)[:, None]
    out = {"mean_log": self.mean(logits) + y_last, "mean": self.mean_exp(logits) * np.exp(y_last),
           "sd_log": self.std(logits)}
    for q in quantiles:
      out[f"q{q:g}"] = self.quantile(logits, q) + y_last
    return out

  def std(self, logits) -> np.ndarray:
    """sd of z [...] (bar density: bin variance w^2 / 12 included)."""
    e = self.edges
    c = 0.5 * (e[1:] + e[:-1])
    p = self.probs(logits)
    m = p @ c
    return np.sqrt(np.maximum(p @ (c * c) - m * m, 0.0) + self.width ** 2 / 12.0)


# ----------------------------------------------------------------- model ---


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


# -------------------------------------------------------------- training ---


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training of the PFN (one seed makes everything reproducible)."""
  seed: int = 0
  num_steps: int = 4000
  batch_size: int = 128
  learning_rate: float = 1e-3
  warmup_steps: int = 200
  weight_decay: float = 1e-4
  grad_clip: float = 1.0
  drop_prob: float = 0.1  # each visible positive point except the last is dropped w.p. this
  log_every: int = 100


def make_batch(rng: np.random.Generator, num_curves: int, prior: PriorConfig = PriorConfig(),
               drop_prob: float = 0.0, data_sizes: np.ndarray = PUBLIC_GRID):
  """One training batch: prefix budgets k ~ U{1..P+-1} visible positive points.

  Returns:
    (ctx [C, P, 3], ctx_mask [C, P], query_x [C, P+], z [C, P+], query_mask [C, P+])
    with P+ the positive grid points as queries (the hidden ones count).
  """
  d = np.asarray(data_sizes, np.float64)
  y, _, _ = sample_prior_curves(rng, num_curves, prior, d)
  npos = int((d > 0).sum())
  k = rng.integers(1, npos, num_curves)  # visible positive points (>= 1 hidden)
  pos_idx = np.arange(npos)[None, :]
  vis_pos = pos_idx < k[:, None]
  drop = (rng.uniform(size=vis_pos.shape) < drop_prob) & (pos_idx < k[:, None] - 1)
  vis_pos &= ~drop
  mask = np.concatenate([np.ones((num_curves, 1), bool), vis_pos], 1)
  ctx, ctx_mask, y_last = encode_context(d, y, mask)
  qx = np.broadcast_to(encode_x(d[d > 0]), (num_curves, npos)).astype(np.float32)
  z = (y[:, 1:] - y_last[:, None]).astype(np.float32)
  qmask = pos_idx >= k[:, None]
  return ctx, ctx_mask, qx, z, qmask


def make_optimizer(train_config: TrainConfig) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and a warmup-cosine schedule (to 5% of the peak)."""
  warmup = min(train_config.warmup_steps, train_config.num_steps // 10)
  sched = optax.warmup_cosine_decay_schedule(0.0, train_config.learning_rate, warmup,
                                             train_config.num_steps,
                                             end_value=0.05 * train_config.learning_rate)
  return optax.chain(optax.clip_by_global_norm(train_config.grad_clip),
                     optax.adamw(sched, weight_decay=train_config.weight_decay))


def fit_bar_model(apply_fn: Callable, params, bars: BarDistribution, train_config: TrainConfig,
                  next_batch: Callable, *, log: Callable[[str], None] | None = None):
  """The PFN training loop: one AdamW step per fresh prior batch on the mean NLL
  of the hidden points; returns (params, log rows).

  apply_fn(params, *inputs) -> logits [..., Q, B]; next_batch() -> (inputs tuple,
  z [..., Q], query mask [..., Q]). Log rows: dicts (step, nll, seconds) every
  `log_every` steps (NLL averaged over the steps since the previous row).
  """
  opt = make_optimizer(train_config)
  opt_state = opt.init(params)

  def loss_fn(prm, inputs, z, qm):
    nll = bars.nll(apply_fn(prm, *inputs), z)
    return jnp.sum(jnp.where(qm, nll, 0.0)) / jnp.maximum(jnp.sum(qm), 1)

  @jax.jit
  def step(prm, st, batch):
    val, grads = jax.value_and_grad(loss_fn)(prm, *batch)
    upd, st = opt.update(grads, st, prm)
    return optax.apply_updates(prm, upd), st, val

  rows, acc, t0 = [], [], time.time()
  for s in progress(range(1, train_config.num_steps + 1), desc="PFN training", unit="step"):
    params, opt_state, val = step(params, opt_state, next_batch())
    acc.append(val)
    if s % train_config.log_every == 0 or s == train_config.num_steps:
      row = {"step": s, "nll": float(np.mean(jax.device_get(acc))),
             "seconds": round(time.time() - t0, 2)}
      acc = []
      rows.append(row)
      if log is not None:
        log(f"step {row['step']}: nll {row['nll']:.4f} ({row['seconds']:.0f}s)")
  return params, rows


def train(model_config: ModelConfig = ModelConfig(), train_config: TrainConfig = TrainConfig(),
          prior: PriorConfig = PriorConfig(), *, log: Callable[[str], None] | None = None):
  """Trains the PFN on prior draws; returns (CurvePFNPredictor, log rows).

  Every step draws a fresh batch (numpy Generator seeded by train_config.seed)
  and takes one AdamW step (`fit_bar_model`).
  """
  rng = np.random.default_rng(train_config.seed)
  p = PUBLIC_GRID.size
  model = CurvePFN(model_config)
  params = model.init(jax.random.key(train_config.seed), jnp.zeros((1, p, 3)),
                      jnp.ones((1, p), bool), jnp.zeros((1, p - 1)))

  def next_batch():
    ctx, cm, qx, z, qm = make_batch(rng, train_config.batch_size, prior, train_config.drop_prob)
    return (ctx, cm, qx), z, qm

  params, rows = fit_bar_model(model.apply, params, model_config.bars, train_config, next_batch,
                               log=log)
  return CurvePFNPredictor(model_config, params, prior), rows


# ------------------------------------------------------------- predictor ---


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
      dict with "mean_log" [C, Q] (E log L), "mean" [C, Q] (E L), "sd_log" [C, Q]
      and "q{q}" [C, Q] (quantiles of log L) for each requested q.
    """
    logits, y_last = self.logits(data_sizes, log_loss, mask, query_sizes)
    return self.bars.summaries(logits, y_last, quantiles)


def save_predictor(predictor: CurvePFNPredictor, directory, *, train_config: TrainConfig,
                   extra: dict | None = None) -> pathlib.Path:
  """Writes weights.msgpack and config.json (model, prior, training config) to directory."""
  out = pathlib.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  (out / "weights.msgpack").write_bytes(flax.serialization.to_bytes(predictor.params))
  mc = dataclasses.asdict(predictor.model_config)
  cfg = {"model": mc, "prior": dataclasses.asdict(predictor.prior),
         "train": dataclasses.asdict(train_config), **(extra or {})}
  (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
  return out


def dataclass_from_dict(cls, values: dict):
  """A (frozen) dataclass from its `dataclasses.asdict` form (JSON lists -> tuples,
  nested dataclass fields rebuilt)."""
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in values:
      continue
    v = values[f.name]
    default = f.default if f.default is not dataclasses.MISSING else None
    if dataclasses.is_dataclass(default):
      v = dataclass_from_dict(type(default), v)
    elif isinstance(v, list):
      v = tuple(v)
    kwargs[f.name] = v
  return cls(**kwargs)


def load_predictor(directory, predictor_cls=None):
  """Reads a predictor written by `save_predictor` (default class CurvePFNPredictor;
  the class names its config types as `model_config_cls` and `prior_cls`)."""
  cls = CurvePFNPredictor if predictor_cls is None else predictor_cls
  src = pathlib.Path(directory)
  for name in ("weights.msgpack", "config.json"):
    if not (src / name).is_file():
      raise errors.CheckpointError(f"load_predictor: {src / name} is missing")
  try:
    cfg = json.loads((src / "config.json").read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.CheckpointError(f"{src / 'config.json'}: not valid JSON ({e})") from None
  model_config = dataclass_from_dict(cls.model_config_cls, cfg["model"])
  prior = dataclass_from_dict(cls.prior_cls, cfg["prior"])
  # The state dict needs no template (no model.init): nested dicts of arrays.
  params = flax.serialization.msgpack_restore((src / "weights.msgpack").read_bytes())
  return cls(model_config, jax.tree.map(jnp.asarray, params), prior)


DEFAULT_WEIGHTS = pathlib.Path(__file__).resolve().parents[1] / "data" / "curve_pfn"


def default_predictor() -> CurvePFNPredictor:
  """The committed PFN (lensllm_jax/data/curve_pfn, made by experiments/train_curve_pfn.py)."""
  return load_predictor(DEFAULT_WEIGHTS)


# ------------------------------------------------------------- selection ---


def curve_pfn_selection(visible, metadata, *, predictor: CurvePFNPredictor | None = None):
  """CurvePFN selection: rank by the PFN's posterior mean of L(D*), each model on its own.

  Args:
    visible: `selection.VisibleCurves`; metadata: `selection.Metadata`.
    predictor: default `default_predictor()`.

  Returns:
    SelectionResult "CurvePFN": predicted = feature = E[L(D*)] [M]; extras
    "mean_log", "sd_log", "q0.1_log", "q0.9_log" [M] (log L(D*) predictive
    mean, sd and 10% / 90% quantiles).
  """
  pred = default_predictor() if predictor is None else predictor
  log_l = np.log(np.where(visible.mask, visible.losses, 1.0))
  out = pred.predict(visible.data_sizes, log_l, visible.mask, [metadata.target_data_num],
                     quantiles=(0.1, 0.9))
  return selection_result(METHOD_NAME, out)


def selection_result(name: str, summaries: dict) -> selection.SelectionResult:
  """A SelectionResult ranking by the posterior mean of L(D*) from predictive
  summaries ([M, 1] "mean", "mean_log", "sd_log", "q0.1", "q0.9")."""
  mean = summaries["mean"][:, 0]
  return selection.SelectionResult(
    name, mean, selection.rank_by(mean), predicted=mean, status=tuple("ok" for _ in mean),
    extras={"mean_log": summaries["mean_log"][:, 0], "sd_log": summaries["sd_log"][:, 0],
            "q0.1_log": summaries["q0.1"][:, 0], "q0.9_log": summaries["q0.9"][:, 0]})
