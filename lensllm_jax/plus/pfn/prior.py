"""Priors of the PFNs: single curves (`sample_prior_curves`) and whole files (`sample_prior_files`).

The single-curve prior draws a law family (`FAMILIES`) and its parameters per
curve (`PriorConfig`); the file prior ties the models of one file through a
hierarchy (`HierarchyConfig`). The maths: `lensllm_jax.plus.pfn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

PUBLIC_GRID = np.array([0.0] + [200.0 * 2 ** k for k in range(14)])


FAMILIES = ("lensllm", "dynamic", "vanilla", "bnsl")


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
  [lo, hi] (`independent_draws`, or a hierarchical source, `sample_prior_files`);
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


HIERARCHICAL = ("beta", "transition", "floor", "rho", "decay_size", "alpha", "c0", "sharpness",
                "has_floor", "gap")


SIZE_CENTER = 8.75  # log10 N at the middle of the prior's size range


@dataclasses.dataclass(frozen=True)
class HierarchyConfig:
  """The hierarchical prior over files (module docstring: the meaning of each range)."""
  curve: PriorConfig = PriorConfig()
  num_models: tuple[int, int] = (4, 32)
  log10_size: tuple[float, float] = (7.0, 10.5)
  size_slope_sd: float = 0.5
  spread: tuple[float, float] = (0.05, 2.0)
  shared_family_prob: float = 0.7
  shared_gap_kind_prob: float = 0.5
  level_slope: tuple[float, float] = (-0.05, 0.3)
  level_spread: tuple[float, float] = (0.01, 0.5)
  noise_jitter: float = 0.3

  def __post_init__(self):
    lo, hi = self.num_models
    if not 1 <= lo <= hi:
      raise ValueError(f"HierarchyConfig.num_models: need 1 <= lo <= hi, got {self.num_models}")


def _logit_draws(rng: np.random.Generator, s: np.ndarray, h: HierarchyConfig) -> dict:
  """name -> [n] quantiles u in (0, 1) of one file's models (logit-normal hierarchy)."""
  out = {}
  for name in HIERARCHICAL:
    m = rng.logistic()
    a = rng.normal(0.0, h.size_slope_sd)
    tau = _logu(rng, *h.spread, 1)[0]
    out[name] = 1.0 / (1.0 + np.exp(-(m + a * s + tau * rng.standard_normal(s.size))))
  return out


def _quantile_draws(u: dict, idx: np.ndarray) -> Callable:
  """A `family_log_loss` parameter source from quantiles u (models idx)."""
  def draw(name, lo, hi, log=False):
    q = u[name][idx][:, None]
    if log:
      return np.exp(np.log(lo) + (np.log(hi) - np.log(lo)) * q)
    return lo + (hi - lo) * q
  return draw


def _sample_file(rng: np.random.Generator, num_models: int, h: HierarchyConfig,
                 d: np.ndarray):
  """(clean log L [M, P], log10 N [M], family [M]) of one file."""
  p = h.curve
  w = np.asarray(p.family_weights) / np.sum(p.family_weights)
  gp = np.asarray(p.gap_probs) / np.sum(p.gap_probs)
  while True:
    n = 2 * num_models + 4
    log10n = rng.uniform(*h.log10_size, n)
    s = log10n - SIZE_CENTER
    u = _logit_draws(rng, s, h)
    fam = (np.full(n, rng.choice(len(w), p=w)) if rng.uniform() < h.shared_family_prob
           else rng.choice(len(w), size=n, p=w))
    y = np.empty((n, d.size))
    for f in np.unique(fam):
      idx = np.flatnonzero(fam == f)
      y[idx] = family_log_loss(FAMILIES[f], _quantile_draws(u, idx), d, p)
    kind = (np.full(n, rng.choice(3, p=gp)) if rng.uniform() < h.shared_gap_kind_prob
            else rng.choice(3, size=n, p=gp))
    pos_gap = _quantile_draws(u, np.arange(n))("gap", *p.gap_positive, log=True)[:, 0]
    neg_gap = _quantile_draws(u, np.arange(n))("gap", *p.gap_negative, log=True)[:, 0]
    gap = np.where(kind == 1, pos_gap, np.where(kind == 2, -neg_gap, 0.0))
    is_vanilla = fam == FAMILIES.index("vanilla")
    # vanilla has no L(0): as in the single-curve prior, L(0) = L(200) e^|g|
    y[:, 0] = np.where(is_vanilla, y[:, 1] + np.abs(gap),
                       y[:, 0] + gap)
    c = rng.uniform(*h.level_slope)
    tau = _logu(rng, *h.level_spread, 1)[0]
    y = y + (-c * s + tau * rng.standard_normal(n))[:, None]
    pos = y[:, d > 0]
    ok = np.flatnonzero(np.all(np.isfinite(y), 1)
                        & (pos.max(1) - pos.min(1) <= p.max_log_range))
    if ok.size >= num_models:
      keep = ok[:num_models]
      return y[keep], log10n[keep], fam[keep]


def sample_prior_files(rng: np.random.Generator, num_files: int,
                       hierarchy: HierarchyConfig = HierarchyConfig(),
                       max_models: int | None = None, data_sizes: np.ndarray = PUBLIC_GRID):
  """Draws files of curves from the hierarchical prior (float64 numpy).

  Args:
    rng: numpy Generator (the seed makes the draw reproducible).
    num_files: number of files F.
    hierarchy: the prior.
    max_models: padded model axis Mx (default hierarchy.num_models[1]).
    data_sizes: [P] grid, ascending, starting at 0.

  Returns:
    dict: "noisy", "clean" log L [F, Mx, P] (0 where padded), "model_mask"
    [F, Mx], "log10_size" [F, Mx], "family" [F, Mx] (index into FAMILIES, -1
    where padded).
  """
  d = np.asarray(data_sizes, np.float64)
  mx = hierarchy.num_models[1] if max_models is None else int(max_models)
  if mx < hierarchy.num_models[1]:
    raise ValueError(f"sample_prior_files: max_models={mx} < num_models {hierarchy.num_models}")
  out = {"noisy": np.zeros((num_files, mx, d.size)), "clean": np.zeros((num_files, mx, d.size)),
         "model_mask": np.zeros((num_files, mx), bool), "log10_size": np.zeros((num_files, mx)),
         "family": np.full((num_files, mx), -1)}
  p = hierarchy.curve
  for i in range(num_files):
    m = int(rng.integers(hierarchy.num_models[0], hierarchy.num_models[1] + 1))
    clean, log10n, fam = _sample_file(rng, m, hierarchy, d)
    sd = _logu(rng, *p.noise_sd, 1)[0] * np.exp(
      hierarchy.noise_jitter * rng.standard_normal(m))[:, None]
    out["noisy"][i, :m] = clean + observation_noise(rng, sd, clean.shape, p)
    out["clean"][i, :m] = clean
    out["model_mask"][i, :m] = True
    out["log10_size"][i, :m] = log10n
    out["family"][i, :m] = fam
  return out
