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

from lensllm_jax import selection

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


def _family_log_loss(family: str, rng, n: int, d: np.ndarray, p: PriorConfig) -> np.ndarray:
  """[n, P] log L of n curves of one family on data sizes d [P] (before gap and noise)."""
  dd = d[None, :]
  if family in ("lensllm", "dynamic"):
    beta = _logu(rng, *p.beta, n)[:, None]
    log_f = beta * np.log(_logu(rng, *p.transition, n))[:, None]   # F = D_t^beta
    e = rng.uniform(*p.floor_fraction, n)[:, None]
    if family == "dynamic":
      rho = rng.uniform(0.0, 1.0, n)[:, None]
      dc = _logu(rng, *p.transition, n)[:, None]
      log_f = log_f + np.log(rho + (1.0 - rho) * np.exp(-dd / dc))
    # L(0) = 1: B / F(0) + E = 1 (F(0) = F0 in both), so B = (1 - E) F0.
    log_b = np.log1p(-e) + log_f[:, :1]
    log_dpow = beta * np.log(np.maximum(dd, 1e-10))
    return np.logaddexp(log_b - np.logaddexp(log_f, log_dpow), np.log(np.maximum(e, 1e-300)))
  if family == "vanilla":
    beta = _logu(rng, *p.beta, n)[:, None]
    alpha = _logu(rng, *p.alpha, n)[:, None]
    e = rng.uniform(*p.floor_fraction, n)[:, None]
    # normalised so that B 200^-beta + E = 1 (L(200) = 1)
    log_b = np.log1p(-e) + beta * np.log(200.0)
    pos = np.maximum(dd, 1.0)
    out = alpha * np.logaddexp(log_b - beta * np.log(pos), np.log(np.maximum(e, 1e-300)))
    return np.where(dd > 0, out, np.nan)  # L(0) is set by the gap
  if family == "bnsl":
    c0 = rng.uniform(*p.c0, n)[:, None]
    c1 = np.maximum(_logu(rng, *p.beta, n)[:, None] - c0, 0.01)
    d1 = _logu(rng, *p.transition, n)[:, None]
    f = _logu(rng, *p.sharpness, n)[:, None]
    x = np.log(dd + 1.0)
    power = -c0 * x - c1 * f * np.logaddexp(0.0, (x - np.log(d1)) / f)
    has_floor = rng.uniform(size=n)[:, None] < 0.5
    e = np.where(has_floor, rng.uniform(*p.floor_fraction, n)[:, None], 0.0)
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
        y[sel] = _family_log_loss(f, rng, int(sel.sum()), d, prior)
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
  noise = sd * rng.standard_normal(clean.shape)
  outlier = rng.uniform(size=num_curves) < prior.outlier_prob
  where = rng.integers(0, d.size, num_curves)
  noise[np.arange(num_curves), where] += (outlier * prior.outlier_scale * sd[:, 0]
                                          * rng.standard_normal(num_curves))
  return clean + noise, clean, fam


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


class _Layer(nn.Module):
  d_model: int
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, h, ctx_len, ctx_mask):
    # h [N, T, d]; the first ctx_len tokens are the context; everyone attends to it.
    x = nn.LayerNorm()(h)
    att = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.d_model)(
      x, x[:, :ctx_len], mask=ctx_mask[:, None, None, :])
    h = h + att
    x = nn.LayerNorm()(h)
    return h + nn.Dense(self.d_model)(nn.gelu(nn.Dense(self.mlp_dim)(x)))


class CurvePFN(nn.Module):
  """(context [N, Tc, 3], context mask [N, Tc], query x [N, Tq]) -> logits [N, Tq, B]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, ctx, ctx_mask, query_x):
    c = self.config
    ctx_tok = nn.Dense(c.d_model)(nn.gelu(nn.Dense(c.d_model)(ctx)))
    q_tok = nn.Dense(c.d_model)(nn.gelu(nn.Dense(c.d_model)(query_x[..., None])))
    q_tok = q_tok + self.param("query_type", nn.initializers.normal(0.02), (c.d_model,))
    h = jnp.concatenate([ctx_tok, q_tok], axis=1)
    tc = ctx.shape[1]
    for _ in range(c.num_layers):
      h = _Layer(c.d_model, c.num_heads, c.mlp_dim)(h, tc, ctx_mask)
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


def _train_state(model_config: ModelConfig, train_config: TrainConfig, num_points: int):
  model = CurvePFN(model_config)
  key = jax.random.key(train_config.seed)
  ctx = jnp.zeros((1, num_points, 3))
  params = model.init(key, ctx, jnp.ones((1, num_points), bool), jnp.zeros((1, num_points - 1)))
  warmup = min(train_config.warmup_steps, train_config.num_steps // 10)
  sched = optax.warmup_cosine_decay_schedule(0.0, train_config.learning_rate, warmup,
                                             train_config.num_steps,
                                             end_value=0.05 * train_config.learning_rate)
  opt = optax.chain(optax.clip_by_global_norm(train_config.grad_clip),
                    optax.adamw(sched, weight_decay=train_config.weight_decay))
  return model, params, opt


def train(model_config: ModelConfig = ModelConfig(), train_config: TrainConfig = TrainConfig(),
          prior: PriorConfig = PriorConfig(), *, log: Callable[[str], None] | None = None):
  """Trains the PFN on prior draws; returns (CurvePFNPredictor, log rows).

  Every step draws a fresh batch (numpy Generator seeded by train_config.seed)
  and takes one AdamW step on the mean NLL of the hidden points.
  Log rows: dicts (step, nll, seconds) every `log_every` steps (NLL averaged
  over the steps since the previous row).
  """
  rng = np.random.default_rng(train_config.seed)
  p = PUBLIC_GRID.size
  model, params, opt = _train_state(model_config, train_config, p)
  opt_state = opt.init(params)
  bars = model_config.bars

  def loss_fn(prm, ctx, cm, qx, z, qm):
    logits = model.apply(prm, ctx, cm, qx)
    nll = bars.nll(logits, z)
    return jnp.sum(jnp.where(qm, nll, 0.0)) / jnp.maximum(jnp.sum(qm), 1)

  @jax.jit
  def step(prm, st, batch):
    val, grads = jax.value_and_grad(loss_fn)(prm, *batch)
    upd, st = opt.update(grads, st, prm)
    return optax.apply_updates(prm, upd), st, val

  rows, acc, t0 = [], [], time.time()
  for s in range(1, train_config.num_steps + 1):
    batch = make_batch(rng, train_config.batch_size, prior, train_config.drop_prob)
    params, opt_state, val = step(params, opt_state, batch)
    acc.append(val)
    if s % train_config.log_every == 0 or s == train_config.num_steps:
      row = {"step": s, "nll": float(np.mean(jax.device_get(acc))),
             "seconds": round(time.time() - t0, 2)}
      acc = []
      rows.append(row)
      if log is not None:
        log(f"step {row['step']}: nll {row['nll']:.4f} ({row['seconds']:.0f}s)")
  return CurvePFNPredictor(model_config, params, prior), rows


# ------------------------------------------------------------- predictor ---


class CurvePFNPredictor:
  """A trained PFN: predictive distributions of log L at query sizes."""

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
    b = self.bars
    out = {"mean_log": b.mean(logits) + y_last[:, None],
           "mean": b.mean_exp(logits) * np.exp(y_last)[:, None],
           "sd_log": b.std(logits)}
    for q in quantiles:
      out[f"q{q:g}"] = b.quantile(logits, q) + y_last[:, None]
    return out


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


def load_predictor(directory) -> CurvePFNPredictor:
  """Reads a predictor written by `save_predictor`."""
  src = pathlib.Path(directory)
  for name in ("weights.msgpack", "config.json"):
    if not (src / name).exists():
      raise FileNotFoundError(f"load_predictor: {src / name} is missing")
  cfg = json.loads((src / "config.json").read_text())
  mc = dict(cfg["model"])
  mc["bars"] = BarDistribution(**mc["bars"])
  model_config = ModelConfig(**mc)
  prior = PriorConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in cfg["prior"].items()})
  # The state dict needs no template (no model.init): nested dicts of arrays.
  params = flax.serialization.msgpack_restore((src / "weights.msgpack").read_bytes())
  return CurvePFNPredictor(model_config, jax.tree.map(jnp.asarray, params), prior)


DEFAULT_WEIGHTS = pathlib.Path(__file__).resolve().parent / "data" / "curve_pfn"


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
  mean = out["mean"][:, 0]
  return selection.SelectionResult(
    METHOD_NAME, mean, selection.rank_by(mean), predicted=mean,
    status=tuple("ok" for _ in mean),
    extras={"mean_log": out["mean_log"][:, 0], "sd_log": out["sd_log"][:, 0],
            "q0.1_log": out["q0.1"][:, 0], "q0.9_log": out["q0.9"][:, 0]})
