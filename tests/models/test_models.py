"""Properties of the Flax causal LMs (both architectures) and the loss helpers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lensllm_jax import models
from lensllm_jax.models import layers

ARCHS = ("tiny-gpt2", "tiny-llama")
B, T = 2, 16


@pytest.fixture(scope="module")
def built():
  """Per tiny preset: config, params, jitted apply(params, ids, mask, pos), a batch of ids.

  Built once per module: every init / compile costs seconds of CPU.
  """
  out = {}
  for name in ARCHS:
    config = models.presets[name]
    params = models.init_params(config, jax.random.key(0))
    apply = jax.jit(lambda p, ids, mask, pos, c=config: models.CausalLM(c).apply(
        {"params": p}, ids, attention_mask=mask, positions=pos))
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size)
    out[name] = (config, params, apply, ids)
  return out


@pytest.fixture(params=ARCHS)
def setup(request, built):
  return built[request.param]


def _default_pos():
  return jnp.broadcast_to(jnp.arange(T), (B, T))


def test_shapes_dtypes_and_block_names(setup):
  config, params, apply, ids = setup
  logits = apply(params, ids, jnp.ones((B, T), jnp.int32), _default_pos())
  assert logits.shape == (B, T, config.vocab_size) and logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  assert tuple(sorted(params)) == tuple(sorted(models.block_names(config)))
  # The default call (no mask, default positions) agrees.
  default = jax.jit(models.CausalLM(config).apply)({"params": params}, ids)
  np.testing.assert_allclose(default, logits, atol=1e-5)


def test_causal_mask(setup):
  config, params, apply, ids = setup
  mask, pos = jnp.ones((B, T), jnp.int32), _default_pos()
  k = 9
  changed = ids.at[:, k:].set((ids[:, k:] + 7) % config.vocab_size)
  a, b = apply(params, ids, mask, pos), apply(params, changed, mask, pos)
  np.testing.assert_allclose(a[:, :k], b[:, :k], atol=1e-6)
  assert np.abs(np.asarray(a[:, k:] - b[:, k:])).max() > 1e-3  # the future did change


def test_padding_mask(setup):
  config, params, apply, ids = setup
  # Row 0 right-padded after 10 tokens, row 1 left-padded by 5.
  mask = np.ones((B, T), np.int32)
  mask[0, 10:] = 0
  mask[1, :5] = 0
  mask = jnp.asarray(mask)
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  real = np.asarray(mask).astype(bool)
  garbage = jnp.where(mask == 1, ids, (ids * 31 + 5) % config.vocab_size)
  a, b = apply(params, ids, mask, pos), apply(params, garbage, mask, pos)
  np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-6)
  assert np.all(np.isfinite(np.asarray(a)))  # fully masked rows stay finite
  # Padding is invisible: each row equals the unpadded sequence run alone.
  # (Row 1's real tokens moved to the front of an unpadded row; by causality the
  # tokens after them do not matter. Same shapes: no new compilation.)
  moved = jnp.stack([jnp.concatenate([ids[1, 5:], ids[1, :5]]), ids[0]])
  alone = apply(params, moved, jnp.ones((B, T), jnp.int32), _default_pos())
  np.testing.assert_allclose(a[1, 5:], alone[0, :T - 5], atol=1e-5)
  np.testing.assert_allclose(a[0, :10], alone[1, :10], atol=1e-5)


def _complex_rotary(x, positions, theta):
  """Reference RoPE as complex multiplication: pair (x[i], x[i + D/2]) -> z_i e^{i p w_i}."""
  half = x.shape[-1] // 2
  z = x[..., :half] + 1j * x[..., half:]
  w = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  z = z * np.exp(1j * positions[:, :, None, None] * w)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_rotary_matches_complex_reference_and_is_relative():
  rng = np.random.default_rng(0)
  head_dim, theta = 16, 10000.0
  x = rng.normal(size=(1, 6, 2, head_dim)).astype(np.float32)
  pos = np.array([[0, 1, 5, 17, 100, 1000]])
  cos, sin = layers.rotary_angles(jnp.asarray(pos), head_dim, theta)
  got = layers.apply_rotary(jnp.asarray(x), cos, sin)
  np.testing.assert_allclose(got, _complex_rotary(x.astype(np.float64), pos, theta), atol=2e-4)
  # Norm preserved, and q(m) . k(n) depends only on m - n.
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  q, k = rng.normal(size=(2, head_dim)).astype(np.float32)

  def score(m, n):
    p = jnp.asarray([[m, n]])
    c, s = layers.rotary_angles(p, head_dim, theta)
    r = layers.apply_rotary(jnp.asarray(np.stack([q, k])[None, :, None, :]), c, s)
    return float(jnp.dot(r[0, 0, 0], r[0, 1, 0]))

  base = score(7, 3)
  for shift in (1, 10, 40):
    assert abs(score(7 + shift, 3 + shift) - base) < 1e-4
  assert abs(score(7, 3) - score(3, 7)) > 1e-3  # not symmetric: direction matters


def _closed_form_count(c: models.ModelConfig) -> int:
  """Parameter count summed module by module (written out independently of num_params)."""
  d, f, v = c.d_model, c.d_ff, c.vocab_size
  if c.arch == "gpt2":
    ln = 2 * d
    attn = (d * 3 * d + 3 * d) + (d * d + d)
    mlp = (d * f + f) + (f * d + d)
    return v * d + c.max_len * d + c.n_layers * (2 * ln + attn + mlp) + ln
  hd = c.head_dim
  attn = d * c.n_heads * hd + 2 * d * c.n_kv_heads * hd + c.n_heads * hd * d
  mlp = 3 * d * f
  head = 0 if c.tie_embeddings else d * v
  return v * d + c.n_layers * (2 * d + attn + mlp) + d + head


# The development presets (the benchmark presets are checked in test_model_zoo.py).
DEV_PRESETS = ("tiny-gpt2", "tiny-llama", "small-gpt2", "small-llama", "gpt2-124m", "gpt2-355m",
               "llama-124m")


@pytest.mark.parametrize("name", DEV_PRESETS)
def test_parameter_count(name):
  config = models.presets[name]
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  assert models.count_params(shapes) == models.num_params(config) == _closed_form_count(config)
  if name == "gpt2-124m":
    assert models.num_params(config) == 124_439_808  # the released GPT-2 small


def test_flops_per_token_gpt2_small():
  c = models.presets["gpt2-124m"]
  non_embedding = 12 * 12 * 768**2  # Kaplan et al.: 12 L d^2 = 85M for GPT-2 small
  n_matmul = non_embedding + 50257 * 768  # + tied output head
  expected = 6 * n_matmul + 12 * 12 * 768 * 1024
  assert models.flops_per_token(c, 1024) == pytest.approx(expected, rel=1e-12)
  assert models.flops_per_token(c, 1024, training=False) == pytest.approx(expected / 3)


def test_bfloat16_compute_close_to_float32(setup):
  config, params, apply, ids = setup
  f32 = apply(params, ids, jnp.ones((B, T), jnp.int32), _default_pos())
  bf16 = jax.jit(models.CausalLM(config.replace(dtype="bfloat16")).apply)({"params": params}, ids)
  assert bf16.dtype == jnp.float32
  scale = float(jnp.std(f32))
  err = float(jnp.max(jnp.abs(bf16 - f32)))
  assert 0 < err < 0.05 * scale  # rounded, but close (bf16 has 8 mantissa bits)


def test_dropout_only_when_not_deterministic(built):
  config, params, plain_apply, ids = built["tiny-gpt2"]
  config = config.replace(dropout_rate=0.3)
  apply = jax.jit(models.CausalLM(config).apply, static_argnames="deterministic")
  det = apply({"params": params}, ids)
  plain = plain_apply(params, ids, jnp.ones((B, T), jnp.int32), _default_pos())
  np.testing.assert_allclose(det, plain, atol=1e-6)
  noisy = apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(3)})
  assert float(jnp.max(jnp.abs(noisy - det))) > 1e-3


def test_token_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(3, 5))
  mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  expected = np.array([-picked[0, :3].mean(), -picked[1, 1:].mean(), 0.0])
  got = models.token_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(models.sequence_log_likelihood(logits, targets, mask), -expected,
                             rtol=1e-5, atol=1e-6)
  pooled = -(picked * mask).sum() / mask.sum()
  np.testing.assert_allclose(models.mean_token_nll(logits, targets, mask), pooled, rtol=1e-5)


def test_token_log_probs_derivatives_match_log_softmax():
  # The target logit is gathered with a hand-written JVP: its gradient, JVP and a
  # Hessian-vector product must equal those of jax.nn.log_softmax + one-hot pick.
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
  targets = jnp.asarray([[0, 5, 2], [3, 3, 1]], jnp.int32)
  weights = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
  tangent = jnp.asarray(rng.normal(size=logits.shape), jnp.float32)

  def ours(x):
    return jnp.sum(models.token_log_probs(x, targets) * weights)

  def reference(x):
    picked = jax.nn.log_softmax(x) * jax.nn.one_hot(targets, x.shape[-1])
    return jnp.sum(picked.sum(-1) * weights)

  @jax.jit  # one compilation (op by op, the derivatives took 16 s)
  def derivatives(x, t):
    return [(f(x), jax.grad(f)(x), jax.jvp(f, (x,), (t,))[1],
             jax.jvp(jax.grad(f), (x,), (t,))[1]) for f in (ours, reference)]

  got, expected = derivatives(logits, tangent)
  for a, b, tol in zip(got, expected, (1e-6, 1e-6, 1e-5, 1e-5), strict=True):  # value, grad, jvp, hvp
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("tied, bias, softcap, chunk_rows", [
    (True, False, None, 4), (False, True, 2.0, 5)])
def test_head_token_nll_sums_matches_the_dense_head(monkeypatch, tied, bias, softcap,
                                                    chunk_rows):
  """The fused head + loss (row chunks whose gradients form in the forward pass) against
  the logits written out and `token_nll_sums`: the value against numpy in float64, the
  gradients (h, weight, bias, mask) against autodiff of the dense head. chunk_rows: rows
  per chunk (21 rows: 6 chunks of 4 or 5 of 5, the last padded); one chunk (gpt2 heads
  of tests/training) is the training step's test against the dense loss."""
  from lensllm_jax.models import losses
  batch, length, width, vocab = 3, 7, 4, 11
  monkeypatch.setattr(losses, "_CHUNK_BYTES", 4 * vocab * chunk_rows)  # float32 logits
  assert losses._row_chunks(batch * length, vocab, width) == -(-batch * length // chunk_rows)
  rng = np.random.default_rng(2)
  h = rng.normal(size=(batch, length, width)).astype(np.float32)
  weight = rng.normal(size=(vocab, width) if tied else (width, vocab)).astype(np.float32)
  b = rng.normal(size=vocab).astype(np.float32) if bias else None
  targets = rng.integers(0, vocab, size=(batch, length))
  mask = (rng.random((batch, length)) > 0.3).astype(np.float32)

  def fused(h, weight, b, mask):
    head = {"embedding" if tied else "kernel": weight}
    return losses.head_token_nll_sums(h, targets, mask, bias=b, softcap=softcap, **head)[0]

  def dense(h, weight, b, mask):
    logits = layers.tied_logits(h, weight, jnp.float32) if tied else h @ weight
    logits = layers.soft_cap(logits if b is None else logits + b, softcap)
    return models.token_nll_sums(logits, targets, mask)[0]

  args = (h, weight, b, mask)
  got_value, got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2, 3)))(*args)
  want_value, want = jax.jit(jax.value_and_grad(dense, argnums=(0, 1, 2, 3)))(*args)
  z = h.astype(np.float64) @ (weight.T if tied else weight).astype(np.float64)
  z = z if b is None else z + b
  z = z if softcap is None else softcap * np.tanh(z / softcap)
  lse = np.log(np.exp(z).sum(-1))
  nll = lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(got_value, (nll * mask).sum(), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(fused)(*args), got_value, rtol=1e-6)  # undifferentiated
  np.testing.assert_allclose(want_value, got_value, rtol=1e-6)
  assert len(jax.tree.leaves(got)) == 3 + bias
  for ours, theirs in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_next_token_targets():
  ids = jnp.array([[5, 6, 7, 8], [1, 2, 3, 0]])
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  targets, loss_mask = models.next_token_targets(ids, mask)
  np.testing.assert_array_equal(targets, [[6, 7, 8, 0], [2, 3, 0, 0]])
  np.testing.assert_array_equal(loss_mask, [[1, 1, 1, 0], [1, 1, 0, 0]])
  # Uniform logits give NLL log V per token.
  logits = jnp.zeros((2, 4, 9))
  np.testing.assert_allclose(models.token_nll(logits, targets, loss_mask), [math.log(9)] * 2,
                             rtol=1e-6)


def test_config_validation():
  with pytest.raises(ValueError, match="arch"):
    models.ModelConfig(arch="bert")
  with pytest.raises(ValueError, match="n_kv_heads"):
    models.ModelConfig(arch="llama", n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="dtype"):
    models.ModelConfig(dtype="float16")
  with pytest.raises(ValueError, match="max_len"):
    models.CausalLM(models.presets["tiny-gpt2"]).init(jax.random.key(0),
                                                      jnp.zeros((1, 129), jnp.int32))
  c = models.presets["tiny-llama"]
  assert c.d_ff == 176 and c.head_dim == 16 and not c.tie_embeddings
  assert models.ModelConfig(arch="gpt2", d_model=48, n_heads=4).d_ff == 192
  wider = models.presets["tiny-gpt2"].replace(d_model=128, dtype="bfloat16")
  assert (wider.d_ff, wider.head_dim, wider.n_heads) == (512, 32, 4)
  assert models.presets["tiny-gpt2"].replace(dtype="bfloat16").d_ff == 256
  assert models.presets["tiny-gpt2"].replace(arch="llama").tie_embeddings is False
