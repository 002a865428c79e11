"""Empirical NTK kernels (lensllm_jax.theory.ntk) against explicit jax.jacrev contractions.

References: the Jacobian of the model output w.r.t. the raveled (selected)
parameters from `jax.jacrev`, contracted with numpy in float64; blocked vs
unblocked; sharded over 4 fake host devices vs one device.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from helpers import run_with_host_devices
from lensllm_jax import models, training, xla_workarounds
from lensllm_jax.theory import ntk


class _MLP(nn.Module):
  """[n, 5] -> [n, 3]."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(16)(x))
    return nn.Dense(3)(jax.nn.softplus(nn.Dense(8)(x)))


@pytest.fixture(scope="module")
def mlp():
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (11, 5))
  params = model.init(jax.random.key(1), x)["params"]
  return (lambda p, x: model.apply({"params": p}, x)), params, x


def _jacobian(f, params, x, select=None):
  """J [n, *out, P] float64 w.r.t. the raveled selected subtree (all if None).

  jacrev under jit: op-by-op dispatch of a transformer's vmapped backward costs
  about 3x the CPU of compiling it once."""
  sub = params if select is None else {k: params[k] for k in select}
  flat, unravel = ravel_pytree(sub)

  def g(v):
    full = dict(params)
    full.update(unravel(v))
    return f(full, x)

  return np.asarray(jax.jit(jax.jacrev(g))(flat), np.float64)


def _close(a, b, rtol=3e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize("implementation", ntk.IMPLEMENTATIONS)
def test_mlp_kernel_matches_jacrev(mlp, implementation):
  f, params, x = mlp
  x1, x2 = x[:7], x[7:]
  j1, j2 = _jacobian(f, params, x1), _jacobian(f, params, x2)
  ref = np.einsum("aip,bjp->abij", j1, j2)  # [7, 4, 3, 3]
  fn = ntk.make_ntk_fn(f, implementation=implementation)
  _close(fn(params, x1, x2), ref)
  # Traced output axis: "mean" is neural-tangents' convention, "sum" the trace.
  traced = np.einsum("abii->ab", ref)
  mean_fn = ntk.make_ntk_fn(f, implementation=implementation, trace_axes=(-1,))
  _close(mean_fn(params, x1, x2), traced / 3)
  if implementation == ntk.DEFAULT_IMPLEMENTATION:
    _close(fn(params, x1), np.einsum("aip,bjp->abij", j1, j1))  # x2=None: x1 again
    sum_fn = ntk.make_ntk_fn(f, implementation=implementation, trace_axes=(-1,),
                             trace_reduction="sum")
    _close(sum_fn(params, x1, x2), traced)


def test_param_mask_subset(mlp):
  f, params, x = mlp
  mask = ntk.param_mask_from_names(params, ["Dense_1", "Dense_2/bias"])
  assert mask["Dense_1"]["kernel"] and mask["Dense_2"]["bias"]
  assert not mask["Dense_0"]["kernel"] and not mask["Dense_2"]["kernel"]
  sub = {"Dense_1": params["Dense_1"], "Dense_2": {"bias": params["Dense_2"]["bias"]}}
  flat, unravel = ravel_pytree(sub)

  def g(v):
    s = unravel(v)
    full = {"Dense_0": params["Dense_0"], "Dense_1": s["Dense_1"],
            "Dense_2": {"kernel": params["Dense_2"]["kernel"], "bias": s["Dense_2"]["bias"]}}
    return f(full, x)

  j = np.asarray(jax.jacrev(g)(flat), np.float64)
  ref = np.einsum("aip,bip->ab", j, j)
  for impl in ("jacobian_contraction", "ntk_vector_products"):
    got = ntk.make_ntk_fn(f, trace_axes=(-1,), trace_reduction="sum", param_mask=mask,
                          implementation=impl)(params, x)
    _close(got, ref)
  with pytest.raises(ValueError, match="matches no parameter"):
    ntk.param_mask_from_names(params, ["Dense_9"])
  with pytest.raises(ValueError, match="selects no parameter"):
    ntk.make_ntk_fn(f, param_mask=jax.tree.map(lambda _: False, params))(params, x)


def test_blocked_equals_unblocked(mlp):
  f, params, x = mlp
  fn = ntk.make_ntk_fn(f)  # untraced: [n, n, 3, 3], mirrors must swap output axes too
  full = fn(params, x)
  done = []
  blocked = ntk.make_blocked_ntk_fn(fn, block_size=4, pairs_per_call=2,
                                    progress=lambda d, t: done.append((d, t)))
  _close(blocked(params, x), full, rtol=1e-5)
  assert done[-1] == (6, 6)  # 3 blocks -> 6 upper-triangle pairs
  _close(blocked(params, x, x[:5]), full[:, :5], rtol=1e-5)
  scalar = ntk.make_ntk_fn(lambda p, x: f(p, x)[:, 0])
  blocked = ntk.make_blocked_ntk_fn(scalar, block_size=3)
  blocked.precompile(jax.eval_shape(lambda: params), jax.eval_shape(lambda: x))
  with training.count_compilations() as counts:  # compiled from shapes ahead of the call
    _close(blocked(params, x), scalar(params, x), rtol=1e-5)
  assert not counts["jit(local_pairs)"] and not counts["jit(_assemble)"], counts
  flat = np.asarray(ntk.kernel_to_matrix(full))
  assert flat.shape == (33, 33)
  np.testing.assert_allclose(flat[3 * 2 + 1, 3 * 5 + 2], full[2, 5, 1, 2])


def test_jacobian_stages_reproduce_the_kernel_to_the_bit(mlp):
  """make_ntk_fn's stages (what the blocked kernel runs) do neural-tangents' operations in
  its order: the same float32 numbers, not just close ones (untraced outputs in the zip
  layout, a traced axis summed, a parameter subset)."""
  f, params, x = mlp
  a, b = x[:4], x[4:9]
  mask = ntk.param_mask_from_names(params, ["Dense_1", "Dense_2"])
  for kwargs in ({}, dict(trace_axes=(-1,), trace_reduction="sum"), dict(param_mask=mask)):
    fn = ntk.make_ntk_fn(f, **kwargs)
    # Compiled with the kernel's own options (the blocked kernel's pair program has them
    # too): at another LLVM level jaxlib 0.12 rounds some entries differently.
    staged = xla_workarounds.jit(lambda p, a, b, stages=fn.stages: stages[1](
        p, stages[0](p, a), stages[0](p, b)), program="ntk_kernel")
    np.testing.assert_array_equal(np.asarray(staged(params, a, b)), np.asarray(fn(params, a, b)),
                                  err_msg=str(kwargs))
  assert not hasattr(ntk.make_ntk_fn(f, implementation="jacrev"), "stages")


@pytest.mark.slow
def test_multi_device_sharded_equals_single_device():
  code = """
  import jax, jax.numpy as jnp, numpy as np
  import flax.linen as nn
  from lensllm_jax.theory import ntk
  assert len(jax.devices()) == 4, jax.devices()

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(jnp.tanh(nn.Dense(16)(x)))

  m = M()
  x = jax.random.normal(jax.random.key(0), (22, 5))
  p = m.init(jax.random.key(1), x)['params']
  fn = ntk.make_ntk_fn(lambda p, x: m.apply({'params': p}, x), trace_axes=(-1,))
  single = np.asarray(fn(p, x))
  sharded = ntk.make_blocked_ntk_fn(fn, block_size=3, pairs_per_call=1)
  got = sharded(p, x)
  one = ntk.make_blocked_ntk_fn(fn, block_size=3, devices=jax.devices()[:1])(p, x)
  np.testing.assert_allclose(np.asarray(got), single, rtol=1e-5, atol=1e-5 * np.abs(single).max())
  np.testing.assert_allclose(np.asarray(got), np.asarray(one), rtol=1e-6, atol=1e-6)
  print('ok', got.shape)
  """
  assert run_with_host_devices(code, num_devices=4).startswith("ok (22, 22)")


# Two layers, 2-4 heads, d_model 32, vocab 64: ~20k parameters, fast references.
_SMALL = {
    "tiny-gpt2": dict(d_model=32, n_heads=2, n_kv_heads=None, head_dim=None, d_ff=64,
                      vocab_size=64, max_len=16),
    "tiny-llama": dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=None, d_ff=64,
                       vocab_size=64, max_len=16),
}


@functools.cache
def _transformer(name):
  config = models.presets[name].replace(**_SMALL[name])
  model = models.CausalLM(config)
  ids = jax.random.randint(jax.random.key(3), (5, 8), 0, config.vocab_size)
  params = models.init_params(config, jax.random.key(4))
  return config, model, params, ids


def _mean_log_likelihood(model, params, ids):
  """Reference output written independently of ntk.lm_output_fn."""
  logits = model.apply({"params": params}, ids)[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0].mean(axis=1)


def test_transformer_kernel_matches_jacrev():
  config, model, params, ids = _transformer("tiny-llama")
  apply_fn = ntk.lm_output_fn(model, "log_likelihood")
  _close(apply_fn(params, ids), _mean_log_likelihood(model, params, ids), rtol=1e-6)
  j = _jacobian(lambda p, x: _mean_log_likelihood(model, p, x), params, ids)  # [5, P]
  ref = j @ j.T
  # The default implementation (the MLP tests cover both neural-tangents ones).
  theta = np.asarray(ntk.make_ntk_fn(apply_fn)(params, ids), np.float64)
  _close(theta, ref, rtol=1e-4)
  np.testing.assert_allclose(theta, theta.T, rtol=1e-5, atol=1e-6 * np.abs(theta).max())
  assert np.linalg.eigvalsh(0.5 * (theta + theta.T)).min() > -1e-5 * np.abs(theta).max()
  # Last block + head only, blocked: equals the jacrev contraction over those leaves.
  names = [n for n in models.block_names(config)
           if n.endswith(f"_{config.n_layers - 1}") or n in ("ln_f", "norm", "lm_head")]
  assert len(names) >= 2, names
  mask = ntk.param_mask_from_names(params, names)
  j_sub = _jacobian(lambda p, x: _mean_log_likelihood(model, p, x), params, ids, select=names)
  fn = ntk.make_ntk_fn(apply_fn, param_mask=mask)
  blocked = ntk.make_blocked_ntk_fn(fn, block_size=2)(params, ids)
  _close(blocked, j_sub @ j_sub.T, rtol=1e-4)


def test_transformer_traced_logits():
  # GPT-2 here, Llama above: both architectures once, to keep the suite short.
  config, model, params, ids = _transformer("tiny-gpt2")
  ids = ids[:3]
  apply_fn = ntk.lm_output_fn(model, "last_logits")
  j = _jacobian(lambda p, x: model.apply({"params": p}, x)[:, -1], params, ids)  # [3, V, P]
  ref = np.einsum("aip,bip->ab", j, j) / config.vocab_size
  _close(ntk.make_ntk_fn(apply_fn, trace_axes=(-1,))(params, ids), ref, rtol=1e-4)


def test_kernel_distance():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
  expected = 1 - np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))
  np.testing.assert_allclose(ntk.kernel_distance(a, b), expected, rtol=1e-5)
  np.testing.assert_allclose(ntk.kernel_distance(a, 3.0 * a), 0.0, atol=1e-6)
  np.testing.assert_allclose(ntk.kernel_distance(np.diag([1., 0.]), np.diag([0., 2.])), 1.0)
  np.testing.assert_allclose(ntk.kernel_distance(a, -a), 2.0, atol=1e-6)


def test_recorder_records_chosen_steps(mlp):
  f, params, x = mlp
  fn = ntk.make_ntk_fn(f, trace_axes=(-1,))
  rec = ntk.NTKRecorder(fn, x, steps=(0, 2, 3))
  for step in range(4):
    p = jax.tree.map(lambda w, s=step: w * (1.0 + 0.1 * s), params)
    out = rec.record(step, p)
    assert (out is None) == (step == 1)
  assert sorted(rec.kernels) == [0, 2, 3]
  p2 = jax.tree.map(lambda w: w * 1.2, params)
  _close(rec.kernels[2], fn(p2, x))
  dist = rec.distances()
  assert dist[0] == pytest.approx(0.0, abs=1e-6)
  assert 0.0 < dist[2] < dist[3] < 1.0
  assert set(rec.consecutive_distances()) == {2, 3}
  with pytest.raises(KeyError, match="was not recorded"):
    rec.distances(reference_step=1)


def test_bad_arguments(mlp):
  f, params, x = mlp
  with pytest.raises(ValueError, match="implementation"):
    ntk.make_ntk_fn(f, implementation="structured_derivatives")
  with pytest.raises(ValueError, match="example axis"):
    ntk.make_ntk_fn(f, trace_axes=(0,))(params, x)
  with pytest.raises(ValueError, match="block_size"):
    ntk.make_blocked_ntk_fn(ntk.make_ntk_fn(f), block_size=0)
