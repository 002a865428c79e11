"""Tests for lensllm_jax.training (tiny GPT-2 from lensllm_jax.models)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lensllm_jax import training
from lensllm_jax.models import CausalLM, ModelConfig, build, init_params, presets
from lensllm_jax.training import sharding, textdata

V, T = 40, 12
CONFIG = ModelConfig(arch="gpt2", vocab_size=V, max_len=T, d_model=16, n_layers=1, n_heads=2)


def _data(n, seed):
  """Random token data with random target spans (not a tokenizer: faster)."""
  rng = np.random.default_rng(seed)
  # A learnable pattern: token t+1 = (token t + 1) mod V, plus noise rows.
  start = rng.integers(0, V, size=(n, 1))
  seq = (start + np.arange(T + 1)) % V
  seq[rng.random(seq.shape) < 0.1] = rng.integers(0, V)
  lengths = rng.integers(T // 2, T + 2, size=n)
  valid = np.arange(T + 1)[None] < lengths[:, None]
  src = rng.integers(1, T // 2, size=n)
  scored = valid & (np.arange(T + 1)[None] >= src[:, None])
  seq = np.where(valid, seq, 0).astype(np.int32)
  return textdata.TokenizedData(seq[:, :-1], seq[:, 1:], scored[:, 1:].astype(np.float32),
                                valid[:, :-1])


@pytest.fixture(scope="module")
def setup():
  model = CausalLM(CONFIG)
  params = init_params(CONFIG, jax.random.key(0))
  return training.causal_lm_apply(model), params


@functools.partial(jax.jit, static_argnums=0)
def _ref_mean_loss(apply_fn, params, batch):
  """Independent reference: per-token mean NLL via optax's cross entropy."""
  logits = apply_fn(params, batch["input_ids"], batch["attention_mask"], None)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


def test_token_loss_sums_closed_form():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = rng.integers(0, 5, size=(2, 3))
  mask = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  nll = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
  total, count = training.token_loss_sums(jnp.asarray(logits), jnp.asarray(targets),
                                          jnp.asarray(mask))
  np.testing.assert_allclose(total, (nll * mask).sum(), rtol=1e-5)
  assert count == 4


def test_schedule_closed_form():
  cfg = training.TrainConfig(learning_rate=1e-3, warmup_steps=10, max_steps=110,
                             end_lr_fraction=0.1)
  s = training.learning_rate_schedule(cfg)
  np.testing.assert_allclose(s(5), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(s(10), 1e-3, rtol=1e-6)
  # Cosine half-way: end + (peak - end) * (1 + cos(pi / 2)) / 2.
  np.testing.assert_allclose(s(60), 1e-4 + 0.9e-3 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(s(110), 1e-4, rtol=1e-5)
  with pytest.raises(ValueError, match="grad_accum"):
    training.TrainConfig(batch_size=6, grad_accum=4)


def test_step_matches_reference_and_accumulation(setup):
  apply_fn, params = setup
  batch = textdata.as_batch(_data(8, seed=1))
  # Reference: jax.grad of the explicit per-token mean and a plain SGD update.
  loss, grads = jax.jit(jax.value_and_grad(_ref_mean_loss, argnums=1), static_argnums=0)(
      apply_fn, params, batch)
  ref_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  for k in (1, 4):  # 4 micro-batches of 2 == one step on the batch of 8
    step = training.make_train_step(apply_fn, optax.sgd(0.1), grad_accum=k)
    state = training.init_state(jax.tree.map(jnp.array, params), optax.sgd(0.1))
    state, metrics = step(state, batch, jax.random.key(0))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(grads), rtol=1e-5)
    assert int(state.step) == 1 and metrics["tokens"] == batch["loss_mask"].sum()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params,
                 ref_params)


def test_optimizer_is_clipped_adamw():
  cfg = training.TrainConfig(learning_rate=1e-2, weight_decay=0.1, grad_clip=0.5)
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}
  grads = {"w": jnp.arange(6.0).reshape(3, 2) - 2.5, "b": jnp.array([3.0, -4.0])}
  opt = training.make_optimizer(cfg)
  state = opt.init(params)
  upd, state = opt.update(grads, state, params)
  upd, state = opt.update(grads, state, params)  # second step: moments matter
  # Hand-written AdamW with clipping, two steps, decay only on the matrix.
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
  m = {k: 0.0 for k in grads}
  v = {k: 0.0 for k in grads}
  for _ in (1, 2):
    for k, g in grads.items():
      g = np.asarray(g) * min(1.0, 0.5 / norm)
      m[k] = 0.9 * m[k] + 0.1 * g
      v[k] = 0.999 * v[k] + 0.001 * g**2
  lr = float(training.learning_rate_schedule(cfg)(1))  # cosine decay has begun
  for k in grads:
    mhat, vhat = m[k] / (1 - 0.9**2), v[k] / (1 - 0.999**2)
    want = -lr * (mhat / (np.sqrt(vhat) + 1e-8) + (0.1 if k == "w" else 0.0) * 1.0)
    # float32 bias corrections (1 - 0.999^2) lose ~1e-5 relative precision.
    np.testing.assert_allclose(upd[k], want, rtol=1e-4)


def test_evaluate_is_per_token_mean(setup):
  apply_fn, params = setup
  data = _data(11, seed=2)
  got = training.evaluate(training.make_eval_step(apply_fn), params, data, batch_size=4)
  want = _ref_mean_loss(apply_fn, params, textdata.as_batch(data))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _check_early_stopping(res, cfg):
  vals = [h["val_loss"] for h in res.history]
  steps = [h["step"] for h in res.history]
  best = int(np.argmin(vals))
  assert res.best_step == steps[best] and res.best_val_loss == vals[best]
  if res.stopped_early:  # exactly `patience` evaluations after the best one
    assert len(vals) - 1 - best == cfg.patience
  else:
    assert steps[-1] == cfg.max_steps


def test_finetune_improves_and_stops_early(setup):
  apply_fn, params = setup
  train, val = _data(64, seed=3), _data(32, seed=4)
  cfg = training.TrainConfig(learning_rate=3e-2, warmup_steps=2, batch_size=8, max_steps=120,
                             eval_every=4, patience=2, seed=0)
  res = training.finetune(apply_fn, params, train, val, cfg)
  assert res.finished and res.best_val_loss < res.initial_val_loss - 0.5
  assert res.stopped_early and res.steps < cfg.max_steps
  _check_early_stopping(res, cfg)
  # The returned params are the best ones: their validation loss is the best.
  ev = training.make_eval_step(apply_fn)
  np.testing.assert_allclose(training.evaluate(ev, res.params, val, 32), res.best_val_loss,
                             rtol=1e-6)
  assert 0 < res.scored_tokens < res.train_tokens <= res.steps * 8 * T
  # Tokens seen = non-padding inputs of exactly the batches of steps 0..steps-1.
  idx = np.concatenate([textdata.train_batch_indices(64, 8, s, seed=0) for s in range(res.steps)])
  assert res.train_tokens == train.attention_mask[idx].sum()
  assert res.scored_tokens == train.loss_mask[idx].sum()


def test_resume_matches_uninterrupted(setup, tmp_path):
  apply_fn, params = setup
  train, val = _data(40, seed=5), _data(16, seed=6)
  cfg = training.TrainConfig(learning_rate=1e-2, warmup_steps=3, batch_size=8, grad_accum=2,
                             max_steps=14, eval_every=5, patience=10, seed=7)
  full = training.finetune(apply_fn, params, train, val, cfg)
  part = training.finetune(apply_fn, params, train, val, cfg, checkpoint_dir=str(tmp_path),
                           stop_after_steps=7)
  assert not part.finished and part.steps == 7
  # A fresh call resumes from the step-5 checkpoint (steps 6-7 are redone).
  resumed = training.finetune(apply_fn, params, train, val, cfg, checkpoint_dir=str(tmp_path))
  # A run shorter than the save interval writes nothing; interrupted, it is redone.
  short = tmp_path / "short"
  part = training.finetune(apply_fn, params, train, val, cfg, checkpoint_dir=str(short),
                           checkpoint_every_s=3600.0, stop_after_steps=7)
  assert part.steps == 7 and not part.finished and not short.exists()
  redone = training.finetune(apply_fn, params, train, val, cfg, checkpoint_dir=str(short),
                             checkpoint_every_s=3600.0)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), redone.params, full.params)
  assert resumed.finished and resumed.steps == full.steps == 14
  for a, b in ((resumed.final_params, full.final_params), (resumed.params, full.params)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0), a, b)
  assert [h["step"] for h in resumed.history] == [0, 5, 10, 14]
  np.testing.assert_allclose([h["val_loss"] for h in resumed.history],
                             [h["val_loss"] for h in full.history], rtol=1e-6)
  assert resumed.train_tokens == full.train_tokens
  # A finished run is not redone; another TrainConfig is refused.
  again = training.finetune(apply_fn, params, train, val, cfg, checkpoint_dir=str(tmp_path))
  assert again.steps == 14
  with pytest.raises(ValueError, match="another TrainConfig"):
    training.finetune(apply_fn, params, train, val,
                      training.TrainConfig(learning_rate=1.0, max_steps=14),
                      checkpoint_dir=str(tmp_path))


def test_save_load_params(setup, tmp_path):
  _, params = setup
  training.save_params(str(tmp_path / "p"), params)
  back = training.load_params(str(tmp_path / "p"), params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Without a template: the saved shapes and dtypes, on the first device.
  jax.tree.map(np.testing.assert_array_equal, training.load_params(str(tmp_path / "p")), params)


def _uncached_apply_fn():
  """CONFIG's apply function with the step caches emptied: equal apply functions share
  their compiled programs, so a compilation count starts from nothing only after this."""
  training.compiled_steps.cache_clear()
  training.cached_eval_step.cache_clear()
  return training.causal_lm_apply(CausalLM(CONFIG))


def test_apply_functions_of_equal_modules_share_the_step_programs():
  """Two `causal_lm_apply`s of separately built modules of one config are one cache key:
  `compiled_steps` hands the second the first's jitted steps (nothing to compile again);
  another config or dropout setting is another key. Encoder-decoders alike."""
  a, b = (training.causal_lm_apply(CausalLM(CONFIG)) for _ in range(2))
  assert a is not b and a == b and hash(a) == hash(b)
  cfg = training.TrainConfig(batch_size=4, max_steps=3)
  assert training.compiled_steps(a, cfg)[1] is training.compiled_steps(b, cfg)[1]
  assert training.cached_eval_step(a) is training.cached_eval_step(b)
  assert a != training.causal_lm_apply(CausalLM(CONFIG), dropout=True)
  assert a != training.causal_lm_apply(CausalLM(CONFIG.replace(d_model=32)))
  t5 = [training.causal_lm_apply(build(presets["tiny-t5"])) for _ in range(2)]
  assert t5[0] == t5[1] and hash(t5[0]) == hash(t5[1]) and t5[0].encoder_decoder


def test_entry_points_compile_the_step_once(setup):
  """pretrain and finetune, each called twice with the same shapes and TrainConfig: one
  compilation of the train step in all (the initial state is placed like the step's
  outputs, so no call sees a new signature)."""
  _, params = setup
  apply_fn = _uncached_apply_fn()
  train, val = _data(16, seed=8), _data(8, seed=9)
  cfg = training.TrainConfig(batch_size=4, max_steps=3, eval_every=2, eval_batch_size=8)
  # On a mesh (the sweep's data-parallel setting): an unplaced step counter compiled the
  # step a second time there, as its committed output came back as the next input.
  mesh = sharding.make_mesh()
  with training.count_compilations() as counts:
    for _ in range(2):
      training.pretrain(apply_fn, params, train, cfg, mesh=mesh)
    assert counts["jit(step_fn)"] == 1, counts
    for _ in range(2):  # the same TrainConfig: the same program as pretrain's
      training.finetune(apply_fn, params, train, val, cfg, mesh=mesh)
  assert counts["jit(step_fn)"] == 1 and counts["jit(eval_fn)"] == 1, counts



def test_precompile_leaves_nothing_to_compile(setup):
  """After `precompile` (abstract shapes only), finetune and evaluate compile nothing."""
  _, params = setup
  apply_fn = _uncached_apply_fn()
  train, val = _data(16, seed=12), _data(8, seed=13)
  cfg = training.TrainConfig(batch_size=4, max_steps=2, eval_every=2, eval_batch_size=8)
  with training.count_compilations() as counts:
    training.precompile(apply_fn, cfg, params, train)
  assert counts["jit(step_fn)"] == 1 and counts["jit(eval_fn)"] == 1, counts
  with training.count_compilations() as counts:
    res = training.finetune(apply_fn, params, train, val, cfg)
  # Nothing at all: the state's set-up too is one precompiled program (it was one
  # compilation per parameter shape, in the first run of every process).
  assert res.steps == 2 and not counts, counts
