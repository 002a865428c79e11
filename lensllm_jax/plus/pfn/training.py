"""Training the PFNs on fresh prior draws: `train` (CurvePFN), `train_context` (ContextPFN),
both through `fit_bar_model` (AdamW, one fresh batch per step).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lensllm_jax import errors
from lensllm_jax.plus.pfn.bars import BarDistribution
from lensllm_jax.plus.pfn.checkpoint import load_predictor
from lensllm_jax.plus.pfn.network import (
  ContextModelConfig,
  ContextPFN,
  CurvePFN,
  ModelConfig,
  encode_context,
  encode_file,
  encode_x,
)
from lensllm_jax.plus.pfn.predictor import ContextPFNPredictor, CurvePFNPredictor
from lensllm_jax.plus.pfn.prior import (
  PUBLIC_GRID,
  HierarchyConfig,
  PriorConfig,
  sample_prior_curves,
  sample_prior_files,
)
from lensllm_jax.progress import progress


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
  qx = np.broadcast_to(encode_x(d[d > 0]), y[..., 1:].shape).astype(np.float32)
  z = (y[..., 1:] - y_last[..., None]).astype(np.float32)
  qmask = (pos_idx >= k) & mm[..., None]
  return (ctx, cm, mm, pair, qx), z, qmask


def init_context_params(model_config: ContextModelConfig, seed: int, init_from=None):
  """Initial parameters; with init_from (a `save_predictor` directory)
  the trunk's single-curve weights are copied from that PFN."""
  p = PUBLIC_GRID.size
  model = ContextPFN(model_config)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 2, p, 3)), jnp.ones((1, 2, p), bool),
                      jnp.ones((1, 2), bool), jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, p - 1)))
  if init_from is None:
    return params
  single = load_predictor(init_from)
  if single.model_config != model_config.trunk:
    raise errors.CheckpointError(f"init_from={init_from}: its model {single.model_config} is "
                                 f"not the trunk {model_config.trunk}")

  def merge(dst, src, path):
    for key, val in src.items():
      if key not in dst:
        raise errors.CheckpointError(
            f"init_from={init_from}: {path}/{key} is not a trunk parameter")
      if isinstance(val, dict):
        dst[key] = merge(dict(dst[key]), val, f"{path}/{key}")
      else:
        if dst[key].shape != val.shape:
          raise errors.CheckpointError(f"init_from={init_from}: {path}/{key} has shape "
                                       f"{val.shape}, the trunk {dst[key].shape}")
        dst[key] = jnp.asarray(val)
    return dst

  trunk = merge(dict(params["params"]["trunk"]), single.params["params"], "trunk")
  return {"params": {**params["params"], "trunk": trunk}}


def train_context(model_config: ContextModelConfig = ContextModelConfig(),
          train_config: TrainConfig | None = None,
          hierarchy: HierarchyConfig = HierarchyConfig(), *, init_from=None,
          log: Callable[[str], None] | None = None):
  """Trains the context PFN on hierarchical prior draws; returns (predictor, log rows).

  train_config.batch_size counts FILES (each of up to num_models[1] models,
  every model a target); one fresh batch per step (`fit_bar_model`).
  """
  train_config = TrainConfig() if train_config is None else train_config
  rng = np.random.default_rng(train_config.seed)
  model = ContextPFN(model_config)
  params = init_context_params(model_config, train_config.seed, init_from)

  def next_batch():
    return make_file_batch(rng, train_config.batch_size, hierarchy, train_config.drop_prob)

  params, rows = fit_bar_model(model.apply, params, model_config.trunk.bars,
                                         train_config, next_batch, log=log)
  return ContextPFNPredictor(model_config, params, hierarchy), rows
