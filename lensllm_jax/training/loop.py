"""Fine-tuning: optimiser, jit train/eval steps, early stopping, orbax checkpoints.

Objective. For a batch with loss mask m [B, T] and per-token negative
log-likelihoods l [B, T], the training loss is the mean NLL per scored token
(the project's one LM loss, defined in `models.losses`)

    L = sum_{b,t} m_bt l_bt / sum_{b,t} m_bt,

the same per-token mean that `evaluate` reports on a whole split (the public
curves' "test loss"). With gradient accumulation over k micro-batches the
step sums the numerator and denominator over the micro-batches (a `lax.scan`)
before dividing, so it equals one step on the full batch (not a mean of
per-micro-batch means) while holding only one micro-batch of activations.

Optimiser: clip_by_global_norm -> AdamW with linear warm-up and cosine decay
to end_lr_fraction * learning_rate; no weight decay on 1-D parameters
(biases, norm scales).

Early stopping (the recipe of the paper's fine-tuning runs, Lin et al. 2024):
the validation loss is measured before training (step 0) and every
`eval_every` steps; training stops after `patience` consecutive evaluations
without an improvement of more than `min_delta`, or at `max_steps`. The
result keeps the parameters of the best validation evaluation; its test loss
is what a curve reports for this subset size.

Determinism: the batch of step s is a pure function of (seed, s)
(`textdata.train_batch_indices`), the step key is fold_in(key(seed), s), and
checkpoints (taken at evaluations, at a time interval) hold params, optimiser state, best
params, step, data position and early-stopping state, so a run interrupted
at any point and restarted with the same arguments ends with the same
parameters as an uninterrupted one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lensllm_jax import errors, models, xla_workarounds
from lensllm_jax.models import losses
from lensllm_jax.progress import progress
from lensllm_jax.training import sharding as shd
from lensllm_jax.training import textdata


class ApplyFn(Protocol):
  """(params, input_ids [B, T], attention_mask [B, T], key) -> logits [B, T, V]."""

  def __call__(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
               key: jax.Array) -> jax.Array: ...


def causal_lm_apply(model: Any, *, dropout: bool = False) -> ApplyFn:
  """An `ApplyFn` for a decoder-only `lensllm_jax.models.build(config)` (or any Flax module with
  the same call signature). With dropout=True the key feeds dropout. An
  encoder-decoder module (``model.config.is_encoder_decoder``) gets
  `seq2seq_apply` instead, so every caller works for both kinds.

  The function is a value: two built from equal modules (Flax modules compare by
  their fields, the config) are equal and hash alike, so the caches keyed on it
  (`compiled_steps`, `cached_eval_step`, `sweep.precompile_model`) hand every model of
  one shape the programs compiled for the first.
  """
  if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
    return seq2seq_apply(model, dropout=dropout)
  return _CausalLMApply(model, dropout)


@dataclasses.dataclass(frozen=True)
class _CausalLMApply:
  """`causal_lm_apply`'s function. A closure here was hashed by identity: each model
  loaded (select's online rounds reload them) compiled its steps again."""
  model: Any
  dropout: bool = False

  def __call__(self, params, input_ids, attention_mask, key, **loss_args):
    if self.dropout:
      return self.model.apply({"params": params}, input_ids, attention_mask=attention_mask,
                              deterministic=False, rngs={"dropout": key}, **loss_args)
    return self.model.apply({"params": params}, input_ids, attention_mask=attention_mask,
                            **loss_args)

  def token_loss_sums(self, params, batch, key):
    """`token_loss_sums` of a `models.CausalLM`'s logits on a batch, from its fused output
    head and loss (`models.losses.head_token_nll_sums`: no [B T, V] logits in memory)."""
    return self(params, batch["input_ids"], batch["attention_mask"], key,
                targets=batch["targets"], loss_mask=batch["loss_mask"])


def seq2seq_apply(model: Any, *, dropout: bool = False, router_losses: bool = True):
  """The apply function of an encoder-decoder `models.build(config)` on seq2seq batches.

  Called (by the train / eval steps) as apply_fn(params, input_ids [B, S],
  attention_mask [B, S], key, targets=[B, T], target_mask=[B, T],
  training=bool): the encoder reads input_ids, the decoder reads the targets
  shifted right (`models.shift_right`) under target_mask, and logits[:, t]
  predicts targets[:, t] (`textdata.encode_examples(..., encoder_decoder=True)`
  makes such batches). In training steps of a Switch model (router_losses)
  it returns (logits, auxiliary loss) with `models.switch_router_losses`,
  which the step adds per scored token; otherwise logits [B, T, V].
  The function carries ``apply_fn.encoder_decoder = True`` and is a value, like
  `causal_lm_apply`'s (equal for equal modules and settings).
  """
  return _Seq2SeqApply(model, dropout, router_losses)


@dataclasses.dataclass(frozen=True)
class _Seq2SeqApply:
  """`seq2seq_apply`'s function (a value: see `causal_lm_apply`)."""
  model: Any
  dropout: bool = False
  router_losses: bool = True
  encoder_decoder: ClassVar[bool] = True

  def __call__(self, params, input_ids, attention_mask, key, *, targets, target_mask,
               training=False):
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
             "target_mask": target_mask}
    aux = training and self.router_losses and self.model.config.arch == "switch"
    rngs = {"dropout": key} if self.dropout else None
    out = models.seq2seq_logits(self.model, params, batch, deterministic=not self.dropout,
                                rngs=rngs, return_router_logits=aux)
    if aux:
      logits, routers = out
      return logits, models.switch_router_losses(routers, self.model.config)
    return out


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Fine-tuning hyper-parameters.

  Attributes:
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up from 0 to the peak.
    decay_steps: horizon of the cosine decay (default: max_steps).
    end_lr_fraction: final learning rate / peak.
    weight_decay: AdamW decoupled weight decay (not on 1-D parameters).
    b1, b2, eps: Adam moments.
    grad_clip: global-norm clipping threshold (None: no clipping).
    batch_size: examples per step (global, over all devices).
    grad_accum: micro-batches per step (divides batch_size).
    max_steps: step budget.
    eval_every: steps between validation evaluations (and checkpoints).
    patience: evaluations without improvement before stopping.
    min_delta: improvement threshold of the validation loss.
    eval_batch_size: examples per evaluation batch.
    seed: data order and step keys.
  """
  learning_rate: float = 1e-4
  warmup_steps: int = 0
  decay_steps: int | None = None
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float | None = 1.0
  batch_size: int = 16
  grad_accum: int = 1
  max_steps: int = 1000
  eval_every: int = 50
  patience: int = 3
  min_delta: float = 0.0
  eval_batch_size: int = 32
  seed: int = 0

  def __post_init__(self):
    if self.batch_size % self.grad_accum:
      raise ValueError(f"TrainConfig.grad_accum={self.grad_accum} must divide "
                       f"batch_size={self.batch_size}")
    for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "patience",
                 "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up to cfg.learning_rate, cosine decay to end_lr_fraction of it."""
  decay = max(cfg.decay_steps or cfg.max_steps, cfg.warmup_steps + 1)
  if not cfg.warmup_steps:  # same curve; avoids optax's zero-length warm-up warning
    return optax.cosine_decay_schedule(cfg.learning_rate, decay, alpha=cfg.end_lr_fraction)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps, decay_steps=decay,
      end_value=cfg.learning_rate * cfg.end_lr_fraction)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> adamw(schedule) (decay masked off 1-D leaves)."""
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay,
                           mask=lambda p: jax.tree.map(lambda x: jnp.ndim(x) > 1, p)))
  return optax.chain(*parts)


class TrainState(NamedTuple):
  """step: [] int32; params and opt_state: pytrees."""
  step: jax.Array
  params: Any
  opt_state: Any


def place(tree: Any, mesh: Any = None) -> Any:
  """A committed copy of a pytree of arrays: over `mesh` per `sharding.param_shardings`
  (scalars replicated), or on the first local device without one.

  The train step's outputs are committed arrays; inputs placed the same way give
  the jit the same signature on every call, so the step compiles once per shape
  (an uncommitted input, e.g. a fresh `jnp.zeros` step counter, compiles it again
  on the second call). Always a copy: the caller's arrays survive buffer donation.
  """
  # Copied after placing, by one compiled program: replicating a single-device array over
  # a mesh reuses its buffer for the shard on that device even with may_alias=False
  # (jaxlib 0.10.2), and the train step would then donate (delete) the caller's array.
  placement = _placement(tree, mesh)
  return jax.device_put(_copy_tree(jax.device_put(tree, placement)), placement)


def _placement(tree: Any, mesh: Any) -> Any:
  """The shardings `place` gives a pytree (a tree of them, or one for every leaf)."""
  if mesh is not None:
    return shd.param_shardings(tree, mesh)
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def init_state(params: Any, optimizer: optax.GradientTransformation, *,
               mesh: Any = None) -> TrainState:
  """Step 0, a copy of `params` and the optimiser's initial state, placed like `place`
  (on `mesh`, or on the first local device).

  One compiled program makes the whole state (`precompile` compiles it ahead): done
  leaf by leaf, the copies were one small compilation per parameter shape, in the
  first run of every process.
  """
  params = jax.device_put(params, _placement(params, mesh))  # may share the caller's
  state = _jit_init_state(optimizer)(params)  # buffers: the state holds copies
  return jax.device_put(state, _placement(state, mesh))  # commits the new leaves


@functools.lru_cache(maxsize=8)
def _jit_init_state(optimizer: optax.GradientTransformation) -> Callable:
  def init(params):
    return TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params),
                      optimizer.init(params))

  return xla_workarounds.jit(init, program="state_init")


@functools.lru_cache(maxsize=8)
def _jit_schedule(cfg: TrainConfig) -> Callable:
  return jax.jit(learning_rate_schedule(cfg))


def token_loss_sums(logits: jax.Array, targets: jax.Array,
                    loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum_bt m_bt * -log softmax(logits_bt)[targets_bt], sum_bt m_bt), float32 scalars.

  The numerator and denominator of the project's LM loss
  (`models.losses.token_nll_sums`, where the convention is defined).

  Args:
    logits: [B, T, V]; targets: [B, T] int; loss_mask: [B, T].
  """
  return losses.token_nll_sums(logits, targets, loss_mask)


def _batch_sums(apply_fn, params, batch, key, training=False):
  if isinstance(apply_fn, _CausalLMApply) and isinstance(apply_fn.model, models.CausalLM):
    return apply_fn.token_loss_sums(params, batch, key)
  if not getattr(apply_fn, "encoder_decoder", False):
    logits = apply_fn(params, batch["input_ids"], batch["attention_mask"], key)
    return token_loss_sums(logits, batch["targets"], batch["loss_mask"])
  out = apply_fn(params, batch["input_ids"], batch["attention_mask"], key,
                 targets=batch["targets"], target_mask=batch["loss_mask"], training=training)
  logits, aux = out if isinstance(out, tuple) else (out, None)
  total, count = token_loss_sums(logits, batch["targets"], batch["loss_mask"])
  if aux is not None:  # a per-token mean: weighted by the scored tokens, like the NLL
    total = total + aux * count
  return total, count


def make_train_step(apply_fn: ApplyFn, optimizer: optax.GradientTransformation, *,
                    grad_accum: int = 1, donate: bool = True) -> Callable:
  """Builds the jit-compiled step (state, batch, key) -> (state, metrics).

  batch: dict of [B, T] arrays ("input_ids", "targets", "loss_mask",
  "attention_mask"), B divisible by grad_accum (micro-batch i holds rows
  i, i + k, ...). The step key is
  fold_in(key, state.step) and micro-batch i gets fold_in(step_key, i).
  metrics: {"loss": mean NLL per scored token, "tokens": scored tokens,
  "grad_norm": global norm before clipping}. The state buffers are donated.
  """

  def step_fn(state: TrainState, batch: dict, key: jax.Array):
    step_key = jax.random.fold_in(key, state.step)
    # Micro-batch i = rows i, i + k, i + 2k, ...: strided, so that every
    # device's contiguous block of a sharded batch holds part of each one.
    micro = jax.tree.map(
        lambda x: x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1),
        batch)

    def sum_loss(params, mb, k):
      total, count = _batch_sums(apply_fn, params, mb, k, training=True)
      return total, count  # differentiate the sum; divide once by the total count

    # Value and gradient together: scan over micro-batches, summing both.
    vg = jax.value_and_grad(sum_loss, has_aux=True)

    def body_vg(carry, xs):
      grads, total, count = carry
      i, mb = xs
      (t, c), g = vg(state.params, mb, jax.random.fold_in(step_key, i))
      return (jax.tree.map(jnp.add, grads, g), total + t, count + c), None

    if grad_accum == 1:  # no loop: XLA fuses across the whole step, no zero gradient buffers
      (total, count), grads = vg(state.params, batch, jax.random.fold_in(step_key, 0))
    else:
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
      (grads, total, count), _ = jax.lax.scan(
          body_vg, init, (jnp.arange(grad_accum), micro))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": total / denom, "tokens": count, "grad_norm": optax.global_norm(grads)}
    return TrainState(state.step + 1, params, opt_state), metrics

  return xla_workarounds.jit(step_fn, program="train_step",
                             donate_argnums=(0,) if donate else ())


def make_eval_step(apply_fn: ApplyFn) -> Callable:
  """jit (params, batch) -> (sum of scored-token NLL, number of scored tokens)."""

  def eval_fn(params, batch):
    return _batch_sums(apply_fn, params, batch, jax.random.key(0))

  return xla_workarounds.jit(eval_fn, program="eval_step")


@jax.jit
def _copy_tree(tree: Any) -> Any:
  """A copy of a pytree of arrays in one dispatch (same placement)."""
  return jax.tree.map(jnp.copy, tree)


@functools.lru_cache(maxsize=8)
def compiled_steps(apply_fn: ApplyFn, cfg: TrainConfig):
  """(optimizer, train step, eval step), cached so repeated runs reuse compilations (keyed
  on the apply function's value: every model of one shape gets the same jitted steps)."""
  optimizer = make_optimizer(cfg)
  return (optimizer, make_train_step(apply_fn, optimizer, grad_accum=cfg.grad_accum),
          cached_eval_step(apply_fn))


@contextlib.contextmanager
def count_compilations() -> Iterator[collections.Counter]:
  """Counts the XLA compilations of jitted functions inside the block, by name.

  Yields a Counter {"jit(step_fn)": n, ...} filled from JAX's compile events
  (`jax.monitoring`, one per executable built or loaded from the persistent
  cache; a cached call of the same signature builds none).
  """
  counts = collections.Counter()

  def listener(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      counts[kwargs.get("fun_name", "")] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@functools.lru_cache(maxsize=8)
def cached_eval_step(apply_fn: ApplyFn) -> Callable:
  """`make_eval_step(apply_fn)`, one per apply_fn (reuses its compilations)."""
  return make_eval_step(apply_fn)


def precompile(apply_fn: ApplyFn, cfg: TrainConfig, params: Any, like: textdata.TokenizedData,
               *, mesh: Any = None) -> None:
  """Compiles `finetune`'s train step and eval step ahead of time (no array is made).

  For batches of cfg.batch_size (train) and cfg.eval_batch_size (eval) rows
  shaped like `like`'s rows (any split of the task), a state placed by
  `init_state(..., mesh=mesh)` and params `place`d the same way: the later
  calls of `finetune` / `evaluate` find the programs in the jit caches of
  `compiled_steps` and compile nothing. Thread-safe: run it in a background
  thread while other work (pre-training, the pre-trained NTK) goes on.
  """
  optimizer, train_step, eval_step = compiled_steps(apply_fn, cfg)
  state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
                         params)
  shardings = _placement(state, mesh)
  if not isinstance(shardings, TrainState):  # one sharding for every leaf
    shardings = jax.tree.map(lambda _: shardings, state)
  state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                       state, shardings)
  sharding = shd.batch_sharding(mesh) if mesh is not None else None

  def batch(rows):  # the shapes and dtypes of textdata's batches of `rows` examples
    return textdata.as_batch(textdata.TokenizedData(*(
        jax.ShapeDtypeStruct((rows,) + a.shape[1:], a.dtype, sharding=sharding) for a in like)))

  train_step.lower(state, batch(cfg.batch_size), jax.random.key(cfg.seed)).compile()
  eval_step.lower(state.params, batch(cfg.eval_batch_size)).compile()
  _jit_init_state(optimizer).lower(state.params).compile()
  _copy_tree.lower(state.params).compile()
  _jit_schedule(cfg).lower(0).compile()


def evaluate(eval_step: Callable, params: Any, data: textdata.TokenizedData,
             batch_size: int, *, mesh: Any = None) -> float:
  """Mean NLL per scored token over all of `data` (summed in float64 on host).

  With a mesh the batches are sharded over its data axes (batch_size must be
  divisible by the number of shards). The params are placed like `init_state`'s
  (no copy where they already are): a model's zero-shot evaluation (params as loaded)
  and its fine-tuning evaluations (the state's) then share one compiled program.
  """
  params = jax.device_put(params, _placement(params, mesh))
  total, count = 0.0, 0.0
  for batch in textdata.eval_batches(data, batch_size):
    if mesh is not None:
      batch = shd.shard_global_batch(batch, mesh)
    t, c = eval_step(params, batch)
    total += float(t)
    count += float(c)
  if count == 0:
    raise ValueError("evaluation data has no scored tokens (loss_mask is all zero)")
  return total / count


# ---------------------------------------------------------------------------
# Checkpoints.


class _Checkpoints:
  """Orbax CheckpointManager of {"state": arrays, "meta": JSON} per step, the last one kept.

  Saves are asynchronous: `save` returns once the arrays are copied off the
  device buffers (which the next train step donates) and the files are written
  in the background; orbax publishes a step directory only when it is complete.
  """

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    self._manager = None  # opened on the first save or restore: a short run touches no file

  @property
  def manager(self):
    if self._manager is None:
      import orbax.checkpoint as ocp

      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=True))
    return self._manager

  def latest_step(self) -> int | None:
    return self.manager.latest_step() if os.path.isdir(self.directory) else None

  def save(self, step: int, arrays: Any, meta: dict) -> None:
    import orbax.checkpoint as ocp

    meta = json.loads(json.dumps(meta))  # a snapshot: the caller goes on updating its dict
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def close(self) -> None:
    """Waits for an asynchronous save to be written."""
    if self._manager is not None:
      self._manager.close()


def save_params(path: str, params: Any) -> None:
  """Writes a parameter pytree with orbax (a fresh directory `path`)."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.abspath(path), params)


def load_params(path: str, like: Any = None) -> Any:
  """Reads a pytree written by `save_params` (as `like`'s structure and shardings if given).

  Without `like` the arrays land on the first local device, whatever the
  device layout they were saved from (e.g. a multi-process mesh). A missing
  directory or one orbax cannot restore into `like` is an `errors.CheckpointError`
  naming it.
  """
  import orbax.checkpoint as ocp

  if not os.path.isdir(path):
    raise errors.CheckpointError(f"{path}: no such checkpoint directory (written by "
                                 "training.save_params)")
  with ocp.StandardCheckpointer() as ckpt:
    try:
      if like is None:
        meta = ckpt.metadata(os.path.abspath(path))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            getattr(meta, "item_metadata", meta))
      return ckpt.restore(os.path.abspath(path),
                          jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
    except (OSError, ValueError, KeyError, TypeError) as e:  # orbax: missing/corrupt/other tree
      detail = " ".join(str(e).split())[:300]
      raise errors.CheckpointError(f"{path}: not a readable checkpoint of these parameters "
                                   f"({type(e).__name__}: {detail})") from e


# ---------------------------------------------------------------------------
# The fine-tuning loop.


@dataclasses.dataclass
class FinetuneResult:
  """Outcome of `finetune`.

  Attributes:
    params: parameters of the best validation evaluation (the pre-trained
      ones if no evaluation improved on step 0).
    final_params: parameters after the last step run.
    best_step: step of the best validation evaluation.
    best_val_loss: its validation loss (mean NLL per token).
    initial_val_loss: validation loss of the starting parameters.
    steps: steps run in total (over all resumed calls).
    stopped_early: patience ran out before max_steps.
    finished: False when stopped by `stop_after_steps` (resume to finish).
    train_tokens: non-padding input tokens processed by training steps.
    scored_tokens: target tokens the training loss was taken on.
    history: one dict per evaluation (step, val_loss, train_loss, lr).
    seconds: wall time of this call.
    seconds_train: of which in train steps (until their metrics are on the host).
    seconds_eval: of which in validation evaluations.
  """
  params: Any
  final_params: Any
  best_step: int
  best_val_loss: float
  initial_val_loss: float
  steps: int
  stopped_early: bool
  finished: bool
  train_tokens: int
  scored_tokens: int
  history: list
  seconds: float
  seconds_train: float = 0.0
  seconds_eval: float = 0.0


def finetune(apply_fn: ApplyFn, params: Any, train: textdata.TokenizedData,
             validation: textdata.TokenizedData, cfg: TrainConfig, *,
             checkpoint_dir: str | None = None, checkpoint_every_s: float = 0.0,
             stop_after_steps: int | None = None, mesh: Any = None,
             log_fn: Callable[[dict], None] | None = None) -> FinetuneResult:
  """Fine-tunes `params` on `train` with early stopping on `validation`.

  Args:
    apply_fn: see `ApplyFn` (e.g. `causal_lm_apply(models.build(config))`).
    params: starting (pre-trained) parameters; not modified.
    train, validation: tokenised splits ([N, T] arrays).
    cfg: hyper-parameters.
    checkpoint_dir: if set, state is saved there (asynchronously, the last
      save kept) at an evaluation once `checkpoint_every_s` seconds have passed
      since the last save or the start of the call, and a call finding a
      checkpoint resumes from it (a finished run whose last evaluation was
      saved returns at once).
    checkpoint_every_s: the save interval; 0 saves at every evaluation. A run
      shorter than the interval writes nothing (interrupted, it is redone from
      the start, with the same result).
    stop_after_steps: stop (unfinished) once this many steps have been run in
      total -- simulates an interrupted run.
    mesh: a `sharding.make_mesh()` mesh for data-parallel training (None:
      default device).
    log_fn: called with a dict at every evaluation (progress display).

  Returns:
    FinetuneResult.
  """
  start_time = time.time()
  optimizer, train_step, eval_step = compiled_steps(apply_fn, cfg)
  key = jax.random.key(cfg.seed)

  state = init_state(params, optimizer, mesh=mesh)  # a copy: survives donation
  best_params = _copy_tree(state.params)
  meta = {"step": 0, "best_step": 0, "best_val_loss": None, "initial_val_loss": None,
          "bad_evals": 0, "stopped_early": False, "done": False, "train_tokens": 0,
          "scored_tokens": 0, "history": [], "data_seed": cfg.seed,
          "config": dataclasses.asdict(cfg)}
  ckpt = _Checkpoints(checkpoint_dir) if checkpoint_dir else None
  try:
    if ckpt is not None and ckpt.latest_step() is not None:
      arrays, meta = ckpt.restore(ckpt.latest_step(),
                                  {"state": state._asdict(), "best_params": best_params})
      if meta["config"] != json.loads(json.dumps(dataclasses.asdict(cfg))):
        raise ValueError(f"checkpoint in {checkpoint_dir} was written with another TrainConfig: "
                         f"{meta['config']} != {dataclasses.asdict(cfg)}")
      state, best_params = TrainState(**arrays["state"]), arrays["best_params"]
    clock = {"train": 0.0, "eval": 0.0}

    def timed_evaluate(params):
      t0 = time.perf_counter()
      val = evaluate(eval_step, params, validation, cfg.eval_batch_size, mesh=mesh)
      clock["eval"] += time.perf_counter() - t0
      return val

    if meta["initial_val_loss"] is None:
      val = timed_evaluate(state.params)
      meta.update(initial_val_loss=val, best_val_loss=val)
      meta["history"].append({"step": 0, "val_loss": val, "train_loss": None})
    schedule = _jit_schedule(cfg)
    last_save = time.monotonic()
    train_sum, train_count = 0.0, 0.0
    step = int(meta["step"])
    bar = progress(total=cfg.max_steps - step, desc="training", unit="step")
    while not meta["done"]:
      if stop_after_steps is not None and step >= stop_after_steps:
        break
      batch = textdata.train_batch(train, cfg.batch_size, step, seed=cfg.seed)
      meta["train_tokens"] += int(batch["attention_mask"].sum())
      if mesh is not None:
        batch = shd.shard_global_batch(batch, mesh)
      t0 = time.perf_counter()
      state, metrics = train_step(state, batch, key)
      loss, tokens = float(metrics["loss"]), float(metrics["tokens"])
      clock["train"] += time.perf_counter() - t0
      step += 1
      bar.update()
      meta["scored_tokens"] += int(tokens)
      train_sum += loss * tokens
      train_count += tokens
      if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss at step {step}: {metrics}")
      if step % cfg.eval_every and step < cfg.max_steps:
        continue
      val = timed_evaluate(state.params)
      record = {"step": step, "val_loss": val,
                "train_loss": train_sum / max(train_count, 1.0),
                "lr": float(schedule(step - 1))}
      train_sum, train_count = 0.0, 0.0
      meta["history"].append(record)
      if val < meta["best_val_loss"] - cfg.min_delta:
        meta.update(best_val_loss=val, best_step=step, bad_evals=0)
        best_params = _copy_tree(state.params)
      else:
        meta["bad_evals"] += 1
      meta["stopped_early"] = meta["bad_evals"] >= cfg.patience
      meta["done"] = meta["stopped_early"] or step >= cfg.max_steps
      meta["step"] = step
      # The data position is a function of (seed, step); stored for inspection.
      spe = textdata.steps_per_epoch(train.num_examples, cfg.batch_size)
      meta["data_position"] = {"epoch": step // spe, "batch_in_epoch": step % spe,
                               "examples_seen": step * cfg.batch_size}
      if log_fn is not None:
        log_fn(dict(record, best_val_loss=meta["best_val_loss"], best_step=meta["best_step"]))
      if ckpt is not None and time.monotonic() - last_save >= checkpoint_every_s:
        ckpt.save(step, {"state": state._asdict(), "best_params": best_params}, meta)
        last_save = time.monotonic()
    bar.close()
  finally:
    if ckpt is not None:
      ckpt.close()
  return FinetuneResult(
      params=best_params, final_params=state.params, best_step=int(meta["best_step"]),
      best_val_loss=float(meta["best_val_loss"]),
      initial_val_loss=float(meta["initial_val_loss"]), steps=step,
      stopped_early=bool(meta["stopped_early"]), finished=bool(meta["done"]),
      train_tokens=int(meta["train_tokens"]), scored_tokens=int(meta["scored_tokens"]),
      history=list(meta["history"]), seconds=time.time() - start_time,
      seconds_train=clock["train"], seconds_eval=clock["eval"])


def pretrain(apply_fn: ApplyFn, params: Any, train: textdata.TokenizedData,
             cfg: TrainConfig, *, mesh: Any = None) -> tuple[Any, list[float]]:
  """Plain training for cfg.max_steps steps (no evaluation; tiny configs).

  Returns:
    (params, per-step training losses).
  """
  optimizer, train_step, _ = compiled_steps(apply_fn, cfg)
  state = init_state(params, optimizer, mesh=mesh)
  key = jax.random.key(cfg.seed)
  losses = []
  for step in progress(range(cfg.max_steps), desc="training", unit="step"):
    batch = textdata.train_batch(train, cfg.batch_size, step, seed=cfg.seed)
    if mesh is not None:
      batch = shd.shard_global_batch(batch, mesh)
    state, metrics = train_step(state, batch, key)
    losses.append(float(metrics["loss"]))
  return state.params, losses


def as_numpy(tree: Any) -> Any:
  """Host copy of a pytree of arrays."""
  return jax.tree.map(np.asarray, tree)
