"""Sketched NTK (ntk.make_sketched_ntk_fn) against the exact kernel.

References: the exact kernel from an explicit `jax.jacrev` Jacobian J [n, P]
(float64 numpy), and the variance formulas of the docstring evaluated on J;
the sketch's mean and error are estimated over many seeds (vmapped keys).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lensllm_jax.theory import ntk

SEEDS = 300


class _MLP(nn.Module):
  """[n, 4] -> [n, 2]."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(jnp.tanh(nn.Dense(6)(x)))


@pytest.fixture(scope="module")
def mlp():
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (6, 4))
  params = model.init(jax.random.key(1), x)["params"]
  f = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  flat, unravel = ravel_pytree(params)
  jac = np.asarray(jax.jacrev(lambda v: f(unravel(v), x))(flat), np.float64)  # [n, 2, P]
  return f, params, x, jac


def _entry_variance(u, v, sketch, k):
  """Per-entry variance of Theta_hat = <u, v> sketched (the docstring's formulas)."""
  var = np.einsum("ap,ap->a", u, u)[:, None] * np.einsum("bp,bp->b", v, v)[None, :]
  var = var + (u @ v.T) ** 2
  if sketch != "gaussian":
    var = var - 2 * (u ** 2) @ (v ** 2).T
  return var / k


KEYS = jax.random.split(jax.random.key(7), SEEDS)


def _samples(fn, params, x, keys=KEYS):
  return np.asarray(jax.vmap(lambda k: fn(params, x, key=k))(keys), np.float64)


@pytest.fixture(scope="module")
def sketches(mlp):
  """sketch -> SEEDS sketched untraced kernels [seeds, n, n, 2, 2] at k = 8 (one compile each)."""
  f, params, x, _ = mlp
  return {s: _samples(ntk.make_sketched_ntk_fn(f, sketch_dim=8, key=jax.random.key(0),
                                               sketch=s), params, x)
          for s in ntk.SKETCHES}


@pytest.mark.parametrize("sketch", ntk.SKETCHES)
def test_unbiased_with_the_stated_variance(mlp, sketches, sketch):
  """Mean over seeds -> Theta (5 standard errors; zip layout [n, n, 2, 2]), and for the
  kernel of output 0, E||Theta_hat - Theta||_F^2 equals the docstring's sum of per-entry
  variances (within the Monte-Carlo error)."""
  _, _, _, jac = mlp
  k = 8
  samples = sketches[sketch]
  exact = np.einsum("aip,bjp->abij", jac, jac)
  se = samples.std(0) / np.sqrt(SEEDS)
  assert np.all(np.abs(samples.mean(0) - exact) <= 5 * se + 1e-6)
  u = jac[:, 0]  # output 0: [n, P]; its kernel is the [..., 0, 0] slice
  theta, scalar = u @ u.T, samples[..., 0, 0]
  var = _entry_variance(u, u, sketch, k)
  assert np.all(np.abs(scalar.mean(0) - theta) <= 5 * np.sqrt(var / SEEDS) + 1e-6)
  sq_err = np.sum((scalar - theta) ** 2, axis=(1, 2))
  expected = var.sum()
  assert abs(sq_err.mean() - expected) <= 5 * sq_err.std() / np.sqrt(SEEDS)
  if sketch == "gaussian":  # the closed form ((tr Theta)^2 + ||Theta||_F^2) / k
    np.testing.assert_allclose(ntk.sketch_rms_error(theta, k) ** 2, expected, rtol=1e-10)
  else:
    assert expected <= ntk.sketch_rms_error(theta, k) ** 2


def test_error_shrinks_like_one_over_sqrt_k(mlp, sketches):
  """RMS Frobenius error at k = 8 and 128: ratio ~ 4, each at the predicted value."""
  f, params, x, jac = mlp
  u = jac[:, 1]
  theta = u @ u.T
  fn = ntk.make_sketched_ntk_fn(f, sketch_dim=128, key=jax.random.key(0), sketch="rademacher",
                                chunk_size=48)
  errs = {}
  for k, samples in ((8, sketches["rademacher"]), (128, _samples(fn, params, x, KEYS[:100]))):
    errs[k] = np.sqrt(np.mean(np.sum((samples[..., 1, 1] - theta) ** 2, axis=(1, 2))))
    predicted = np.sqrt(_entry_variance(u, u, "rademacher", k).sum())
    np.testing.assert_allclose(errs[k], predicted, rtol=0.3)
  assert 3.0 < errs[8] / errs[128] < 5.3


def test_blocked_and_chunked_evaluation_give_the_same_kernel(mlp, sketches):
  """block_size / chunk_size / make_blocked_ntk_fn's block pairs leave S, hence the kernel,
  unchanged: equal to the unblocked kernel of the same key."""
  f, params, x, _ = mlp
  blocked = ntk.make_sketched_ntk_fn(f, sketch_dim=8, key=KEYS[0], sketch="rademacher",
                                     block_size=4, chunk_size=3)
  whole = sketches["rademacher"][0]
  np.testing.assert_allclose(blocked(params, x), whole, rtol=1e-5, atol=1e-6)
  pairs = ntk.make_blocked_ntk_fn(blocked, block_size=4)  # calls it with x2 = another block
  np.testing.assert_allclose(pairs(params, x), whole, rtol=1e-5, atol=1e-6)


def test_traced_kernel_with_param_mask_is_unbiased(mlp):
  """trace_axes=(-1,), "mean", Dense_1 only: the mean over seeds -> the exact kernel."""
  f, params, x, _ = mlp
  mask = ntk.param_mask_from_names(params, ["Dense_1"])
  exact = np.asarray(ntk.make_ntk_fn(f, param_mask=mask, trace_axes=(-1,),
                                     implementation="jacrev")(params, x), np.float64)
  fn = ntk.make_sketched_ntk_fn(f, sketch_dim=8, key=jax.random.key(0), param_mask=mask,
                                trace_axes=(-1,))
  samples = _samples(fn, params, x)
  assert samples.shape == (SEEDS, 6, 6)
  se = samples.std(0) / np.sqrt(SEEDS)
  assert np.all(np.abs(samples.mean(0) - exact) <= 5 * se + 1e-6)
  assert not np.allclose(samples[0], exact, rtol=1e-3)  # a sketch, not the exact kernel


def test_f_within_the_stated_bound(mlp, sketches):
  """|F(Theta_hat, t) - F(Theta, t)| <= ||r0||^2 min(1, 2 eta t ||Theta_hat - Theta||_F) on
  every seed, and on average within the bound with the expected (RMS) kernel error."""
  f, params, x, jac = mlp
  u = jac[:, 0]
  theta = u @ u.T
  r0 = np.asarray(f(params, x)[:, 0], np.float64) - 1.0
  eta, ts = 0.5, np.geomspace(1e-2, 1e2, 9)
  exact_f = np.asarray(ntk.ntk_test_loss_from_kernel(theta, r0, eta, ts))
  gaps = []
  for s in sketches["countsketch"][:40, :, :, 0, 0]:
    gap = np.abs(np.asarray(ntk.ntk_test_loss_from_kernel(s, r0, eta, ts)) - exact_f)
    bound = ntk.ntk_test_loss_error_bound(np.linalg.norm(s - theta), r0, eta, ts)
    assert np.all(gap <= bound + 1e-9)
    gaps.append(gap)
  mean_gap = np.mean(gaps, axis=0)
  rms_bound = ntk.ntk_test_loss_error_bound(ntk.sketch_rms_error(theta, 8), r0, eta, ts)
  assert np.all(mean_gap <= rms_bound)
  assert np.any(rms_bound < np.sum(r0 ** 2)) and mean_gap.max() > 0  # not vacuous


def test_sweep_snapshot_kernels():
  """The fine-tuning sweep's NTK options (finetune_sweep._ntk_fns) on a tiny GPT-2's
  per-sequence log-likelihood with a loss mask: "exact" (blocked over the devices) equals
  J J^T from jax.jacrev; "sketched" (count sketch, k = 1024) is within 4 x the stated RMS
  error of it."""
  from lensllm_jax import models
  from lensllm_jax.training import sweep as finetune_sweep

  config = models.presets["tiny-gpt2"].replace(d_model=16, n_heads=2, n_kv_heads=None,
                                               head_dim=None, d_ff=32, vocab_size=32,
                                               max_len=8, n_layers=1)
  params = models.init_params(config, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (6, 8), 0, config.vocab_size)
  x = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
       "loss_mask": jnp.ones_like(ids).at[:, :3].set(0)}
  # Exact: blocked over the devices (test_ntk checks blocked = unblocked); the jacrev
  # reference below is computed independently.
  blocked, _ = finetune_sweep._ntk_fns(config, "log_likelihood",
                                       finetune_sweep.KernelOptions("exact", block_size=4))
  exact = np.asarray(blocked(params, x), np.float64)
  flat, unravel = ravel_pytree(params)
  apply_fn = ntk.lm_output_fn(models.build(config))
  jac = np.asarray(jax.jit(jax.jacrev(lambda v: apply_fn(unravel(v), x)))(flat), np.float64)
  np.testing.assert_allclose(exact, jac @ jac.T, rtol=1e-4, atol=1e-5 * np.abs(exact).max())
  sketched, _ = finetune_sweep._ntk_fns(config, "log_likelihood", finetune_sweep.KernelOptions(
      "sketched", block_size=4, sketch_dim=1024, sketch_seed=2))
  err = np.linalg.norm(np.asarray(sketched(params, x), np.float64) - exact)
  assert 0 < err <= 4 * ntk.sketch_rms_error(exact, 1024)
  with pytest.raises(ValueError, match="config.ntk.kernel"):
    finetune_sweep.KernelOptions(kernel="sketch")


def test_bad_arguments(mlp):
  f, params, x, _ = mlp
  with pytest.raises(ValueError, match="sketch_dim"):
    ntk.make_sketched_ntk_fn(f, sketch_dim=0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="sketch="):
    ntk.make_sketched_ntk_fn(f, sketch_dim=4, key=jax.random.key(0), sketch="srht")
  with pytest.raises(ValueError, match="example axis"):
    ntk.make_sketched_ntk_fn(f, sketch_dim=4, key=jax.random.key(0), trace_axes=(0,))(params, x)
