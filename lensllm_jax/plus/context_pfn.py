"""A context PFN: Bayesian extrapolation of one curve given the other candidates' curves.

`curve_pfn.py` predicts log L(D) of a model from its own visible points only.
Here the prediction of a target model also reads the visible curves of the
other candidate models of the same file (a set: permutation-invariant, any
number of models), and the network is trained on a HIERARCHICAL prior in which
the models of one file share file-level structure, so that the other curves
carry information about the target's continuation (e.g. all models of a task
reaching their power phase at similar sizes, or bigger models having a larger
exponent). Only synthetic draws are used for training.

Hierarchical prior (`HierarchyConfig`, `sample_prior_files`). Decided from the
laws of `curve_pfn.py` and first principles before any public file was read
for this model; the single-curve ranges are `curve_pfn.PriorConfig`'s, unchanged.
One draw is a FILE of M models on the public grid:
  * M ~ U{4, ..., 32} (selection files list tens of candidates; the padded
    batch holds 32), model sizes log10 N ~ U(7, 10.5) independently (from
    10M-parameter models to ~30B) and s = log10 N - 8.75 (decades from the
    middle of that range).
  * Every law parameter q of `curve_pfn.family_log_loss` (beta, transition,
    floor, rho, decay_size, alpha, c0, sharpness, has_floor) and the
    zero-shot gap magnitude is drawn through its quantile u in (0, 1) of the
    single-curve range: logit u_i = m_q + a_q s_i + tau_q eps_i with, per file
    and parameter, m_q ~ Logistic(0, 1) (so with a = tau = 0 each u is uniform
    and a curve's parameter has the single-curve prior's marginal), the size
    slope a_q ~ N(0, 0.5^2) per decade (over the 3.5 decades, up to a few
    logits: a clear trend with size, of either sign) and the spread
    tau_q ~ logU(0.05, 2) (from near-identical models to models almost as
    different as independent draws, logistic sd 1.8); eps_i ~ N(0, 1).
  * Family: with prob 0.7 one family (drawn with `family_weights`) for the
    whole file, else each model its own.
  * Zero-shot gap kind (none / positive / negative, `gap_probs`): with prob
    0.5 one kind for the file, else per model; magnitudes through the
    hierarchy above on the single-curve ranges.
  * Level: the single-curve laws are normalised to L(0) = 1 (vanilla:
    L(200) = 1); here log L_i += -c s_i + tau_L eps_i with c ~ U(-0.05, 0.3)
    nats per decade (a pre-training N exponent of ~0.076 gives 0.18 nats per
    decade; fine-tuned task losses may differ either way) and
    tau_L ~ logU(0.01, 0.5).
  * Noise: one sd per file ~ logU(1e-3, 0.05) (one test set for all models)
    times e^(0.3 eps_i) per model; outliers as in the single-curve prior.
  * A model whose log L spans more than `max_log_range` is redrawn (the file
    keeps the first M valid models of 2M + 4 drawn).
  * Budget: every model of a file shows the same visible prefix (the
    protocol's views), k ~ U{1, ..., 13} fine-tuning points plus the zero-shot
    point; each visible point but the last is dropped w.p. `drop_prob`.

Network (`ContextPFN`, `ContextModelConfig`). The trunk is `curve_pfn.CurvePFN`
(4 layers, width 64, 256 bars on z = log L - log L(D_last)); each trunk layer
also attends, through a gated attention (gate tanh(g), g initialised at
`set_gate_init` = 0.1, `curve_pfn.Layer`), to one token per OTHER model of the
file. That token is an
MLP of (a) a summary of the other curve: its visible points encoded as in the
single-curve PFN, two self-attention layers, masked mean, and (b) the pair
features (log L_j(D_last) - log L_t(D_last) clipped to [-3, 3],
(log10 N_j - log10 N_t) / 2). No positional information: the prediction is
invariant to the order of the other models. The trunk starts from the
committed single-curve PFN (`init_from`), so at step 0 the context PFN is the
single-curve PFN plus 0.1 x the set attention, and training teaches it to use
the other curves. (A first run with the gates initialised at exactly 0 left
them closed: |tanh g| <= 0.03 after 3000 steps, and no gain over the
single-curve PFN on held-out prior files, since at g = 0 the set attention
gets no gradient; hence 0.1. Measured on prior draws only.)

Training budget (decided before evaluation): `configs/context_pfn.py`, seed 0,
batches of files drawn afresh each step, AdamW; size set by the ~25 min time
budget on the 2-core machine (the config says the step count and wall time).

Result (docs/context_pfn.md): on held-out prior files the committed model is
as accurate as the single-curve PFN, not better (RMSE ratios 0.91-1.02 over
1-12 visible points); with every model visible up to the same budget, the
other prefixes carry little information about the target's continuation.

Uses float32 (a network); the prior is float64 numpy; summaries float64.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.plus import curve_pfn
from lensllm_jax.plus.curve_pfn import PUBLIC_GRID

__all__ = [
  "ContextModelConfig",
  "ContextPFN",
  "ContextPFNPredictor",
  "HierarchyConfig",
  "context_pfn_selection",
  "default_predictor",
  "make_file_batch",
  "sample_prior_files",
  "train",
]

METHOD_NAME = "ContextPFN"
HIERARCHICAL = ("beta", "transition", "floor", "rho", "decay_size", "alpha", "c0", "sharpness",
                "has_floor", "gap")
SIZE_CENTER = 8.75  # log10 N at the middle of the prior's size range


@dataclasses.dataclass(frozen=True)
class HierarchyConfig:
  """The hierarchical prior over files (module docstring: the meaning of each range)."""
  curve: curve_pfn.PriorConfig = curve_pfn.PriorConfig()
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
    tau = curve_pfn._logu(rng, *h.spread, 1)[0]
    out[name] = 1.0 / (1.0 + np.exp(-(m + a * s + tau * rng.standard_normal(s.size))))
  return out


def _quantile_draws(u: dict, idx: np.ndarray) -> Callable:
  """A `curve_pfn.family_log_loss` parameter source from quantiles u (models idx)."""
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
      y[idx] = curve_pfn.family_log_loss(curve_pfn.FAMILIES[f], _quantile_draws(u, idx), d, p)
    kind = (np.full(n, rng.choice(3, p=gp)) if rng.uniform() < h.shared_gap_kind_prob
            else rng.choice(3, size=n, p=gp))
    pos_gap = _quantile_draws(u, np.arange(n))("gap", *p.gap_positive, log=True)[:, 0]
    neg_gap = _quantile_draws(u, np.arange(n))("gap", *p.gap_negative, log=True)[:, 0]
    gap = np.where(kind == 1, pos_gap, np.where(kind == 2, -neg_gap, 0.0))
    is_vanilla = fam == curve_pfn.FAMILIES.index("vanilla")
    # vanilla has no L(0): as in the single-curve prior, L(0) = L(200) e^|g|
    y[:, 0] = np.where(is_vanilla, y[:, 1] + np.abs(gap),
                       y[:, 0] + gap)
    c = rng.uniform(*h.level_slope)
    tau = curve_pfn._logu(rng, *h.level_spread, 1)[0]
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
    sd = curve_pfn._logu(rng, *p.noise_sd, 1)[0] * np.exp(
      hierarchy.noise_jitter * rng.standard_normal(m))[:, None]
    out["noisy"][i, :m] = clean + curve_pfn.observation_noise(rng, sd, clean.shape, p)
    out["clean"][i, :m] = clean
    out["model_mask"][i, :m] = True
    out["log10_size"][i, :m] = log10n
    out["family"][i, :m] = fam
  return out


# ---------------------------------------------------------------- network ---


@dataclasses.dataclass(frozen=True)
class ContextModelConfig:
  """The trunk (a `curve_pfn.ModelConfig`) and the other-curve encoder's depth."""
  trunk: curve_pfn.ModelConfig = curve_pfn.ModelConfig()
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
  ctx, cm, y_last = curve_pfn.encode_context(data_sizes, np.where(vis, y, 0.0).reshape(-1, p),
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
      tok = curve_pfn.Layer(c.d_model, c.num_heads, c.mlp_dim, name=f"encoder_{i}")(tok, p, cm)
    w = cm[..., None].astype(tok.dtype)
    summary = (tok * w).sum(1) / jnp.maximum(w.sum(1), 1.0)          # [F*M, d]
    summary = summary.reshape(f, 1, m, c.d_model)
    # One token per (target t, other j).
    feats = jnp.concatenate([jnp.broadcast_to(summary, (f, m, m, c.d_model)), pair], -1)
    set_tok = nn.Dense(c.d_model, name="pair_out")(
      nn.gelu(nn.Dense(c.d_model, name="pair_in")(feats)))
    set_mask = model_mask[:, None, :] & model_mask[:, :, None] & ~jnp.eye(m, dtype=bool)
    logits = curve_pfn.CurvePFN(c, self.config.set_gate_init, name="trunk")(
      ctx.reshape(f * m, p, 3), cm, query_x.reshape(f * m, -1),
      set_tok.reshape(f * m, m, c.d_model), set_mask.reshape(f * m, m))
    return logits.reshape(f, m, query_x.shape[-1], -1)


# --------------------------------------------------------------- training ---


def make_file_batch(rng: np.random.Generator, num_files: int,
                    hierarchy: HierarchyConfig = HierarchyConfig(), drop_prob: float = 0.0,
                    data_sizes: np.ndarray = PUBLIC_GRID):
  """One training batch of files; one visible budget k ~ U{1..P+-1} per file.

  Returns:
    (inputs, z [F, Mx, P+], query_mask [F, Mx, P+]) with inputs the
    `ContextPFN` arguments and the positive grid points as queries (hidden
    points of real models count).
  """
  d = np.asarray(data_sizes, np.float64)
  draw = sample_prior_files(rng, num_files, hierarchy, data_sizes=d)
  y, mm = draw["noisy"], draw["model_mask"]
  npos = int((d > 0).sum())
  k = rng.integers(1, npos, num_files)[:, None, None]
  pos_idx = np.arange(npos)[None, None, :]
  vis_pos = pos_idx < k
  vis_pos = vis_pos & ~((rng.uniform(size=y[..., 1:].shape) < drop_prob) & (pos_idx < k - 1))
  mask = np.concatenate([np.ones(y.shape[:2] + (1,), bool), vis_pos], -1)
  ctx, cm, mm, pair, y_last = encode_file(d, y, mask, mm, draw["log10_size"])
  qx = np.broadcast_to(curve_pfn.encode_x(d[d > 0]), y[..., 1:].shape).astype(np.float32)
  z = (y[..., 1:] - y_last[..., None]).astype(np.float32)
  qmask = (pos_idx >= k) & mm[..., None]
  return (ctx, cm, mm, pair, qx), z, qmask


def init_params(model_config: ContextModelConfig, seed: int, init_from=None):
  """Initial parameters; with init_from (a `curve_pfn.save_predictor` directory)
  the trunk's single-curve weights are copied from that PFN."""
  p = PUBLIC_GRID.size
  model = ContextPFN(model_config)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 2, p, 3)), jnp.ones((1, 2, p), bool),
                      jnp.ones((1, 2), bool), jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, p - 1)))
  if init_from is None:
    return params
  single = curve_pfn.load_predictor(init_from)
  if single.model_config != model_config.trunk:
    raise ValueError(f"init_from={init_from}: its model {single.model_config} is not the "
                     f"trunk {model_config.trunk}")

  def merge(dst, src, path):
    for key, val in src.items():
      if key not in dst:
        raise ValueError(f"init_from={init_from}: {path}/{key} is not a trunk parameter")
      if isinstance(val, dict):
        dst[key] = merge(dict(dst[key]), val, f"{path}/{key}")
      else:
        if dst[key].shape != val.shape:
          raise ValueError(f"init_from={init_from}: {path}/{key} has shape {val.shape}, "
                           f"the trunk {dst[key].shape}")
        dst[key] = jnp.asarray(val)
    return dst

  trunk = merge(dict(params["params"]["trunk"]), single.params["params"], "trunk")
  return {"params": {**params["params"], "trunk": trunk}}


def train(model_config: ContextModelConfig = ContextModelConfig(),
          train_config: curve_pfn.TrainConfig | None = None,
          hierarchy: HierarchyConfig = HierarchyConfig(), *, init_from=None,
          log: Callable[[str], None] | None = None):
  """Trains the context PFN on hierarchical prior draws; returns (predictor, log rows).

  train_config.batch_size counts FILES (each of up to num_models[1] models,
  every model a target); one fresh batch per step (`curve_pfn.fit_bar_model`).
  """
  train_config = curve_pfn.TrainConfig() if train_config is None else train_config
  rng = np.random.default_rng(train_config.seed)
  model = ContextPFN(model_config)
  params = init_params(model_config, train_config.seed, init_from)

  def next_batch():
    return make_file_batch(rng, train_config.batch_size, hierarchy, train_config.drop_prob)

  params, rows = curve_pfn.fit_bar_model(model.apply, params, model_config.trunk.bars,
                                         train_config, next_batch, log=log)
  return ContextPFNPredictor(model_config, params, hierarchy), rows


# -------------------------------------------------------------- predictor ---


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
  def bars(self) -> curve_pfn.BarDistribution:
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
    qx = np.broadcast_to(curve_pfn.encode_x(q), y.shape[:2] + (q.size,)).astype(np.float32)
    return np.asarray(self._apply(self.params, ctx, cm, mm, pair, qx), np.float64), y_last

  def predict(self, data_sizes, log_loss, mask, log10_size, query_sizes,
              quantiles: Sequence[float] = ()):
    """Predictive summaries (`curve_pfn.BarDistribution.summaries`) [M, Q] of the M
    models of one file (log_loss, mask [M, P], log10_size [M])."""
    y = np.asarray(log_loss, np.float64)
    if y.ndim != 2:
      raise ValueError(f"ContextPFN: log_loss must be [M, P], got shape {y.shape}")
    logits, y_last = self.file_logits(data_sizes, y[None], np.asarray(mask)[None],
                                      np.ones((1, y.shape[0]), bool),
                                      np.asarray(log10_size)[None], query_sizes)
    return self.bars.summaries(logits[0], y_last[0], quantiles)


DEFAULT_WEIGHTS = pathlib.Path(__file__).resolve().parents[1] / "data" / "context_pfn"


@functools.cache
def default_predictor() -> ContextPFNPredictor:
  """The committed context PFN (lensllm_jax/data/context_pfn, made by
  `experiments.train_curve_pfn --config=configs/context_pfn.py`); loaded once."""
  return curve_pfn.load_predictor(DEFAULT_WEIGHTS, ContextPFNPredictor)


def context_pfn_selection(visible, metadata, *, predictor: ContextPFNPredictor | None = None):
  """ContextPFN selection: rank by the posterior mean of L(D*) of each model given
  its visible points, the other models' visible curves and the model sizes.

  Returns:
    SelectionResult "ContextPFN": predicted = feature = E[L(D*)] [M]; extras
    "mean_log", "sd_log", "q0.1_log", "q0.9_log" [M].
  """
  pred = default_predictor() if predictor is None else predictor
  log_l = np.log(np.where(visible.mask, visible.losses, 1.0))
  sizes = np.asarray(metadata.sizes, np.float64)
  if np.any(sizes <= 0):
    raise ValueError(f"ContextPFN: {metadata.name}: model sizes must be > 0, got {sizes}")
  out = pred.predict(visible.data_sizes, log_l, visible.mask, np.log10(sizes),
                     [metadata.target_data_num], quantiles=(0.1, 0.9))
  return curve_pfn.selection_result(METHOD_NAME, out)
