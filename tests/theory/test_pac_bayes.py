"""Tests of lensllm_jax.theory.pac_bayes against dense per-example Hessians.

The reference forms `v^T H v` and `v^T H^+ v` come from dense
`jax.hessian` blocks and `numpy.linalg.eigh` (positive part = negative
eigenvalues set to 0), independent of the Lanczos code.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from jax.flatten_util import ravel_pytree

from lensllm_jax.theory import pac_bayes as pb


class Net(nn.Module):
  """Two top-level modules: "dense_0" (20 params) and "head" (15 params)."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(4, param_dtype=jnp.float64, name="dense_0")(x))
    return nn.Dense(3, param_dtype=jnp.float64, name="head")(x)


def _problem(n=6):
  kp, kx, ky, kv = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(kx, (n, 4), jnp.float64)
  y = jax.random.randint(ky, (n,), 0, 3)
  model = Net()
  params0 = jax.tree_util.tree_map(lambda a: 1.5 * a + 0.1, model.init(kp, x)["params"])
  flat0, unravel = ravel_pytree(params0)
  params = unravel(flat0 + 0.3 * jax.random.normal(kv, flat0.shape, jnp.float64))

  def loss(p, batch):
    xb, yb = batch
    logp = jax.nn.log_softmax(model.apply({"params": p}, xb))
    return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

  return loss, params, params0, {"x": x, "y": y}


def _loss_dict(loss):
  return lambda p, b: loss(p, (b["x"], b["y"]))


def _dense_hessians(loss, params, params0, examples):
  """v = w_hat - w0 [P] and per-example dense Hessians [n, P, P] (jax.hessian)."""
  flat, unravel = ravel_pytree(params)

  def one(x, y):
    return jax.hessian(lambda w: loss(unravel(w), (x[None], y[None])))(flat)

  hess = np.asarray(jax.jit(jax.vmap(one))(examples["x"], examples["y"]))
  return np.asarray(flat - ravel_pytree(params0)[0]), hess


def _dense_forms(v, hess, idx):
  """Per-example vHv [n], vH+v [n], (mean H)^+ form, ||v||^2 lambda_max^+ [n] of a block."""
  v, hess = v[idx], hess[:, idx][:, :, idx]

  def pos(h):
    w, u = np.linalg.eigh(h)
    return v @ (u * np.maximum(w, 0)) @ u.T @ v

  vhv = np.einsum("i,nij,j->n", v, hess, v)
  top = np.maximum(np.linalg.eigvalsh(hess)[:, -1], 0) * (v @ v)
  return vhv, np.array([pos(h) for h in hess]), pos(hess.mean(axis=0)), top


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="module")
def problem():
  with jax.enable_x64(True):
    loss, params, params0, examples = _problem()
    return loss, params, params0, examples, _dense_hessians(loss, params, params0, examples)


def test_layer_blocks_partitions(problem):
  params = problem[1]
  assert pb.leaf_paths(params) == ["dense_0/bias", "dense_0/kernel", "head/bias", "head/kernel"]
  assert pb.layer_blocks(params) == {"dense_0": (0, 1), "head": (2, 3)}
  assert pb.layer_blocks(params, {"kernels": ["dense_0/kernel", "head/kernel"],
                                  "bias": ["head/bias"]}) == {"kernels": (1, 3), "bias": (2,)}
  assert pb.layer_blocks(params, lambda p: "all" if "kernel" in p else None) == {"all": (1, 3)}
  with pytest.raises(ValueError, match="variables"):
    pb.layer_blocks({"params": params})
  with pytest.raises(ValueError, match="several blocks"):
    pb.layer_blocks(params, {"a": ["head"], "b": ["head/kernel"]})
  with pytest.raises(ValueError, match="selects no leaves"):
    pb.layer_blocks(params, {"a": ["nothing"]})


def test_layer_table_matches_dense_and_bound(problem):
  loss, params, params0, examples, (v_all, hess) = problem
  flat_sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(params)]
  offsets = np.cumsum([0] + flat_sizes)
  # Lanczos to the full block dimension: the quadrature must be exact.
  rows = pb.layer_table(_loss_dict(loss), params, params0, examples, jax.random.PRNGKey(1),
                        num_iters=64, c=2.0, n=100)
  assert [r.block for r in rows] == ["dense_0", "head"]
  for row, leaf_ids in zip(rows, [(0, 1), (2, 3)], strict=True):
    idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in leaf_ids])
    vhv, vhpv, vhpv_mean_hessian, _ = _dense_forms(v_all, hess, idx)
    assert row.num_params == idx.size and row.num_iters == 35  # m clipped to all 35 params
    np.testing.assert_allclose(row.vhv_mean, vhv.mean(), rtol=1e-9)
    np.testing.assert_allclose(row.vhv_max, vhv.max(), rtol=1e-9)
    np.testing.assert_allclose(row.vhpv_max, vhpv.max(), rtol=1e-8)
    np.testing.assert_allclose(row.vhpv_mean, vhpv.mean(), rtol=1e-8)
    np.testing.assert_allclose(row.vhpv_batch, vhpv_mean_hessian, rtol=1e-8)
    assert row.argmax_example == int(vhpv.argmax())
    assert row.vhpv_mean >= row.vhpv_batch - 1e-12  # Jensen: (.)^+ is convex
    np.testing.assert_allclose(row.sqrt_term, np.sqrt(2.0 * vhpv.max() / 100), rtol=1e-8)
  h = [r.vhpv_max for r in rows]
  bound = pb.pac_bayes_bound(h, c=2.0, n=100)
  np.testing.assert_allclose(bound, np.sqrt(2.0 * h[0] / 100) + np.sqrt(2.0 * h[1] / 100))
  np.testing.assert_allclose(bound, sum(r.sqrt_term for r in rows))
  np.testing.assert_allclose(pb.generalization_bound(0.5, h, 2.0, 100, eps=0.1),
                             1.1 * (0.5 + bound))
  frame = pd.DataFrame(rows)
  assert list(frame.columns) == list(pb.LayerRow._fields) and len(frame) == 2
  assert set(pb.table_columns(rows)) == set(pb.LayerRow._fields)
  with pytest.raises(ValueError, match="c > 0"):
    pb.pac_bayes_bound(h, c=0.0, n=100)
  with pytest.raises(ValueError, match=">= 0"):
    pb.pac_bayes_bound([-1.0], c=1.0, n=10)


def test_truncated_lanczos_keeps_plain_form_exact(problem):
  loss, params, params0, examples, (v_all, hess) = problem
  idx = np.arange(20)  # dense_0 leaves come first in ravel order
  vhv, vhpv, _, top = _dense_forms(v_all, hess, idx)
  forms = pb.per_example_forms(_loss_dict(loss), params, params0, examples,
                               jax.random.PRNGKey(2), block=(0, 1), num_iters=3)
  # v^T H v = ||v||^2 T[0, 0] is exact for any number of steps.
  np.testing.assert_allclose(forms.vhv, vhv, rtol=1e-9)
  # The positive part with 3 of 20 steps is a 3-point Gauss rule: by Jensen
  # it is at least (vHv)^+, and at most ||v||^2 lambda_max^+ (Ritz values
  # lie inside the spectrum); the exact value obeys the same bounds.
  got = np.asarray(forms.vhpv)
  assert np.all(got >= np.maximum(vhv, 0) - 1e-10)
  assert np.all(got <= top * (1 + 1e-10))
  assert np.all(vhpv >= np.maximum(vhv, 0) - 1e-10)
  assert np.all(np.isfinite(forms.change)) and forms.vhpv.shape == (6,)


def test_tiny_transformer_block_matches_dense():
  models = pytest.importorskip("lensllm_jax.models")
  with jax.enable_x64(False):
    config = models.presets["tiny-gpt2"].replace(vocab_size=32, d_model=16, n_heads=2,
                                                 d_ff=32, n_layers=1, max_len=8)
    model = models.CausalLM(config)
    params0 = models.init_params(config, jax.random.PRNGKey(0))
    ln = params0["ln_f"]
    params = dict(params0)
    params["ln_f"] = jax.tree_util.tree_map(
        lambda a: a + 0.2 * jax.random.normal(jax.random.PRNGKey(1), a.shape), ln)
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 32)

    def loss(p, batch):
      targets, mask = models.next_token_targets(batch)
      return jnp.mean(models.token_nll(model.apply({"params": p}, batch), targets, mask))

    blocks = pb.layer_blocks(params)
    assert list(blocks) == ["h_0", "ln_f", "wpe", "wte"]
    forms = pb.per_example_forms(loss, params, params0, ids, jax.random.PRNGKey(3),
                                 block=blocks["ln_f"], num_iters=32)
    flat, unravel = ravel_pytree(params["ln_f"])
    v = np.asarray(flat - ravel_pytree(params0["ln_f"])[0], np.float64)

    def ex_loss(w, example):
      return loss({**params, "ln_f": unravel(w)}, example[None])

    hess = jax.jit(jax.vmap(jax.hessian(ex_loss), in_axes=(None, 0)))(flat, ids)
    dense = list(np.asarray(hess, np.float64))
  pos = []
  for h in dense:
    h = (h + h.T) / 2
    w, u = np.linalg.eigh(h)
    pos.append(v @ (u * np.maximum(w, 0)) @ u.T @ v)
  assert v.size == 32
  scale = max(pos)
  np.testing.assert_allclose(forms.vhpv, pos, rtol=2e-3, atol=1e-4 * scale)
  np.testing.assert_allclose(forms.vhv, [v @ h @ v for h in dense], rtol=2e-3, atol=1e-4 * scale)


def test_repeated_tables_reuse_one_compilation(problem):
  """A second layer_table call (new weights, same shapes) reuses the compiled program:
  one executable for both calls and both blocks, and the same numbers as a fresh build."""
  loss, params, params0, examples, _ = problem
  loss_fn = _loss_dict(loss)
  key = jax.random.PRNGKey(3)
  first = pb.layer_table(loss_fn, params, params0, examples, key, num_iters=8)
  moved = jax.tree_util.tree_map(lambda a: 0.9 * a, params)
  second = pb.layer_table(loss_fn, moved, params0, examples, key, num_iters=8)
  program = pb._forms_program(loss_fn, params, 8, None)
  assert program.run._cache_size() == 1
  pb._cached_forms_program.cache_clear()
  fresh = pb.layer_table(loss_fn, moved, params0, examples, key, num_iters=8)
  assert pb._forms_program(loss_fn, params, 8, None) is not program
  for a, b in zip(second, fresh, strict=True):
    np.testing.assert_allclose(a.vhpv_max, b.vhpv_max, rtol=1e-12)
  assert any(a.vhpv_max != b.vhpv_max for a, b in zip(first, second, strict=True))
