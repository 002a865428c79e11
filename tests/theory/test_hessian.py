"""Tests of lensllm_jax.theory.hessian against dense references (float64).

References are independent of the matrix-free code: the dense `jax.hessian`
(reverse-over-forward Jacobians) of small Flax models, `numpy.linalg.eigh`,
matrices with prescribed spectra, and closed-form estimator variances.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from helpers import run_with_host_devices
from lensllm_jax.theory import hessian as hs


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


class MLP(nn.Module):
  """Tiny classifier with three top-level modules (64 parameters)."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(5, param_dtype=jnp.float64, name="dense_0")(x))
    x = jnp.tanh(nn.Dense(4, param_dtype=jnp.float64, name="dense_1")(x))
    return nn.Dense(3, param_dtype=jnp.float64, name="head")(x)


def _mlp_problem(seed=0, n=24):
  kp, kx, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (n, 4), jnp.float64)
  y = jax.random.randint(ky, (n,), 0, 3)
  model = MLP()
  params = model.init(kp, x)["params"]
  params = jax.tree_util.tree_map(lambda a: a * 1.5 + 0.1, params)  # some negative curvature

  def loss(p, batch):
    xb, yb = batch
    logp = jax.nn.log_softmax(model.apply({"params": p}, xb))
    return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

  return loss, params, (x, y)


def _dense(loss, params, batch):
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.jit(jax.hessian(lambda w: loss(unravel(w), batch)))(flat))


def _spectrum_matrix(eigs, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
  return (q * np.asarray(eigs)) @ q.T


@pytest.fixture(scope="module")
def mlp():
  with jax.enable_x64(True):
    loss, params, batch = _mlp_problem()
    return loss, params, batch, _dense(loss, params, batch), hs.hvp_operator(loss, params, batch)


def test_hvp_matches_dense_in_every_data_mode(mlp):
  loss, params, (x, y), dense, op_batch = mlp
  flat, unravel = ravel_pytree(params)
  v = np.random.default_rng(1).normal(size=flat.shape[0])
  want = dense @ v
  # Pytree HVP.
  got_tree = hs.hvp(loss, params, (x, y), unravel(jnp.asarray(v)))
  np.testing.assert_allclose(ravel_pytree(got_tree)[0], want, rtol=1e-10, atol=1e-12)
  # One batch, stacked batches (lax.scan) and a host stream: mean of
  # equal-size per-batch losses is the full-batch mean loss.
  ops = {
      "batch": op_batch,
      "stacked": hs.hvp_operator(loss, params, (x.reshape(3, 8, 4), y.reshape(3, 8)),
                                 data_mode="stacked"),
      "stream": hs.hvp_operator(loss, params, lambda: ((x[i:i + 8], y[i:i + 8])
                                                       for i in range(0, 24, 8)),
                                data_mode="stream"),
  }
  assert not ops["stream"].traceable and ops["batch"].traceable
  for name, op in ops.items():
    assert op.dim == 64, name
    np.testing.assert_allclose(op.matvec(jnp.asarray(v)), want, rtol=1e-10, atol=1e-12,
                               err_msg=name)
  # A parameter block: the diagonal block of the dense Hessian.
  leaves = jax.tree_util.tree_leaves(params)
  block = (0, 1)  # tree_leaves order of dense_0/{bias, kernel}
  sizes = [leaf.size for leaf in leaves]
  idx = np.arange(sum(sizes[:2]))
  op = hs.hvp_operator(loss, params, (x, y), block=block)
  vb = v[idx]
  np.testing.assert_allclose(op.matvec(jnp.asarray(vb)), dense[np.ix_(idx, idx)] @ vb,
                             rtol=1e-10, atol=1e-12)


def test_hvp_operator_rejects_bad_arguments(mlp):
  loss, params, batch, _, _ = mlp
  with pytest.raises(ValueError, match="data_mode"):
    hs.hvp_operator(loss, params, batch, data_mode="chunks")
  with pytest.raises(ValueError, match="leading"):
    hs.hvp_operator(loss, params, (batch[0], batch[1][:3]), data_mode="stacked")
  with pytest.raises(ValueError, match="block"):
    hs.hvp_operator(loss, params, batch, block=(99,))


def test_lanczos_top_eigenvalues_match_eigh(mlp):
  _, _, _, dense, op = mlp
  evals, evecs = np.linalg.eigh(dense)
  key = jax.random.PRNGKey(3)
  # Full dimension: every Ritz pair is exact (the MLP Hessian has repeated
  # zero eigenvalues, so Lanczos must restart after breakdowns).
  full = hs.lanczos_eigs(op, key, k=5, num_iters=op.dim)
  np.testing.assert_allclose(full.eigenvalues, evals[::-1][:5], rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(np.sort(full.ritz_values), evals, atol=1e-9)
  assert np.all(full.residual_norms < 1e-9)
  overlap = np.abs(np.asarray(full.eigenvectors) @ evecs[:, ::-1][:, :5])
  np.testing.assert_allclose(np.diag(overlap), 1.0, atol=1e-6)
  # Fewer steps than dimensions: the extreme eigenvalues still converge, and
  # the reported residuals equal an independent dense computation.
  part = hs.lanczos_eigs(op, key, k=5, num_iters=30)
  np.testing.assert_allclose(part.eigenvalues[:2], evals[::-1][:2], rtol=1e-6)
  y = np.asarray(part.eigenvectors)
  dense_resid = np.linalg.norm(y @ dense - part.eigenvalues[:, None] * y, axis=1)
  np.testing.assert_allclose(part.residual_norms, dense_resid, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(part.residual_estimates, dense_resid, rtol=1e-3, atol=1e-10)
  np.testing.assert_allclose(np.min(full.ritz_values), evals[0], atol=1e-10)


def test_lanczos_on_prescribed_spectrum_and_host_loop():
  eigs = np.concatenate([[-3.0, 2.5, 2.0], np.linspace(-0.5, 0.5, 37)])
  a = _spectrum_matrix(eigs)
  op = hs.dense_operator(jnp.asarray(a))
  key = jax.random.PRNGKey(0)
  lm = hs.lanczos_eigs(op, key, k=3, num_iters=25, which="LM")
  np.testing.assert_allclose(lm.eigenvalues, [-3.0, 2.5, 2.0], rtol=1e-8)
  # The same operator as a non-traceable (host) operator: same result.
  host = hs.LinearOperator(lambda v: jnp.asarray(a) @ v, 40, np.dtype(np.float64), False)
  lm_host = hs.lanczos_eigs(host, key, k=3, num_iters=25, which="LM")
  np.testing.assert_allclose(lm_host.eigenvalues, lm.eigenvalues, rtol=1e-12)
  res = hs.lanczos(op, key, 25)
  q = np.asarray(res.basis)
  np.testing.assert_allclose(q @ q.T, np.eye(25), atol=1e-12)  # full re-orthogonalisation
  t = np.diag(res.alphas) + np.diag(res.betas, 1) + np.diag(res.betas, -1)
  np.testing.assert_allclose(q @ a @ q.T, t, atol=1e-10)


def test_power_iteration_and_deflation():
  eigs = np.concatenate([[5.0, -4.0, 2.0], np.linspace(-1.0, 1.0, 27)])
  a = _spectrum_matrix(eigs, seed=1)
  op = hs.dense_operator(jnp.asarray(a))
  r1, r2 = hs.power_iteration_top_k(op, jax.random.PRNGKey(0), k=2, max_iters=500, tol=1e-9)
  assert bool(r1.converged) and bool(r2.converged)
  np.testing.assert_allclose([r1.eigenvalue, r2.eigenvalue], [5.0, -4.0], rtol=1e-8)
  q = np.asarray(r1.eigenvector)
  np.testing.assert_allclose(np.linalg.norm(a @ q - float(r1.eigenvalue) * q),
                             r1.residual_norm, rtol=1e-6, atol=1e-13)
  assert 1 < int(r1.num_iters) <= 500
  # The host loop follows the same iterates as the compiled loop.
  host = hs.LinearOperator(lambda v: jnp.asarray(a) @ v, 30, np.dtype(np.float64), False)
  key0 = jax.random.fold_in(jax.random.PRNGKey(0), 0)  # the key top_k used for r1
  rh = hs.power_iteration(host, key0, max_iters=500, tol=1e-9)
  np.testing.assert_allclose(rh.eigenvalue, 5.0, rtol=1e-8)
  assert int(rh.num_iters) == int(r1.num_iters)


def test_hutchinson_within_reported_standard_error(mlp):
  _, _, _, dense, op = mlp
  exact = np.trace(dense)
  # Variance of one Rademacher sample: 2 (||A||_F^2 - sum_i A_ii^2).
  sd = np.sqrt(2 * (np.sum(dense ** 2) - np.sum(np.diag(dense) ** 2)))
  for seed in range(5):
    r = hs.hutchinson_trace(op, jax.random.PRNGKey(seed), num_probes=200)
    assert abs(float(r.trace) - exact) <= 3 * float(r.stderr), (seed, r.trace, exact, r.stderr)
    assert 0.7 < float(r.stderr) / (sd / np.sqrt(200)) < 1.3
    np.testing.assert_allclose(r.trace, np.mean(r.samples))


def test_slq_moments_and_quadrature(mlp):
  _, _, _, dense, op = mlp
  evals = np.linalg.eigh(dense)[0]
  dim = dense.shape[0]
  key = jax.random.PRNGKey(7)
  m = 6
  res = hs.slq_density(op, key, num_probes=30, num_iters=m, num_grid=2000)
  nodes, weights = np.asarray(res.nodes), np.asarray(res.weights)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
  # Per probe, the m-point Gauss rule reproduces z^T H^k z / ||z||^2 exactly
  # for k <= 2m - 1 (z regenerated exactly as slq_density draws it).
  for i in range(3):
    pkey, _ = jax.random.split(jax.random.fold_in(key, i))
    z = np.asarray(jax.random.rademacher(pkey, (dim,), jnp.float64))
    for k in (1, 2, 3):
      want = z @ np.linalg.matrix_power(dense, k) @ z / dim
      np.testing.assert_allclose(np.sum(weights[i] * nodes[i] ** k), want, rtol=1e-8)
  # Averaged over probes: within the reported standard error of the exact
  # moments tr(H^k) / P of the eigenvalues.
  for k in (1, 2):
    est, se = hs.slq_moments(res.nodes, res.weights, k)
    assert abs(float(est) - np.mean(evals ** k)) <= 3.5 * float(se), (k, est, se)
  # The smoothed density integrates to one and its mean is the nodes' mean.
  grid, dens = np.asarray(res.grid), np.asarray(res.density)
  np.testing.assert_allclose(np.trapezoid(dens, grid), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.trapezoid(dens * grid, grid),
                             float(hs.slq_moments(res.nodes, res.weights, 1)[0]), atol=1e-6)


def test_positive_part_quadratic_form_exact_at_full_dimension(mlp):
  _, _, _, dense, op = mlp
  evals, evecs = np.linalg.eigh(dense)
  v = np.random.default_rng(5).normal(size=dense.shape[0])
  pos = (evecs * np.maximum(evals, 0)) @ evecs.T
  q = hs.lanczos_quadrature(op, jnp.asarray(v), jax.random.PRNGKey(0), op.dim,
                            hs.positive_part)
  np.testing.assert_allclose(q.value, v @ pos @ v, rtol=1e-9)
  np.testing.assert_allclose(q.norm_sq, v @ v, rtol=1e-12)
  # An indefinite matrix with a repeated eigenvalue (early breakdown).
  eigs = np.array([-2.0, -2.0, -2.0, 1.0, 1.0, 3.0, 0.5, -0.1])
  a = _spectrum_matrix(eigs, seed=3)
  w, u = np.linalg.eigh(a)
  qa = hs.lanczos_quadrature(hs.dense_operator(jnp.asarray(a)), jnp.asarray(v[:8]),
                             jax.random.PRNGKey(1), 8, hs.positive_part)
  np.testing.assert_allclose(qa.value, v[:8] @ (u * np.maximum(w, 0)) @ u.T @ v[:8], rtol=1e-10)


# ----------------------------------------------------------------------------
# Cross-checks with matfree (a maintained JAX library: Lanczos, SLQ, Hutchinson)
# on the same HVP operator. Same start vectors / probes: the two must agree to
# rounding (float64); independent probes: within their standard errors.

def _matfree_ritz(op, q0, m):
  """matfree's Ritz values and first-component weights of m Lanczos steps from q0."""
  from matfree import decomp

  _, t, _, _ = decomp.tridiag_sym(m, reortho="full")(op.matvec, q0)
  theta, s = np.linalg.eigh(np.asarray(t))
  return theta, s[0] ** 2


def test_top_eigenvalues_agree_with_matfree(mlp):
  _, _, _, dense, op = mlp
  from matfree import decomp, eig

  m, key = 30, jax.random.PRNGKey(11)
  ours = hs.lanczos_eigs(op, key, k=3, num_iters=m)
  assert int(ours.num_breakdowns) == 0
  q0 = hs.lanczos(op, key, m).basis[0]  # the start vector lanczos_eigs drew
  vals, vecs = eig.eigh_partial(decomp.tridiag_sym(m, reortho="full"))(op.matvec, q0)
  # Same Krylov space: every Ritz value agrees, the top three to 1e-9 relative.
  np.testing.assert_allclose(np.sort(ours.ritz_values), np.sort(vals), rtol=1e-8,
                             atol=1e-10 * np.abs(vals).max())
  top = np.argsort(np.asarray(vals))[::-1][:3]
  np.testing.assert_allclose(ours.eigenvalues, np.asarray(vals)[top], rtol=1e-9)
  overlap = np.abs(np.sum(np.asarray(ours.eigenvectors) * np.asarray(vecs)[top], axis=1))
  np.testing.assert_allclose(overlap, 1.0, atol=1e-6)
  # And both are the dense top eigenvalues to Lanczos accuracy at m = 30 < P = 64.
  np.testing.assert_allclose(ours.eigenvalues[:2], np.linalg.eigvalsh(dense)[::-1][:2], rtol=1e-6)


def test_spectral_density_agrees_with_matfree(mlp):
  _, _, _, dense, op = mlp
  from matfree import decomp, funm, stochtrace

  key, m, k = jax.random.PRNGKey(12), 8, 16
  res = hs.slq_density(op, key, num_probes=k, num_iters=m, num_grid=400)
  # Same Rademacher probes (drawn as slq_nodes_weights draws them).
  nodes, weights = [], []
  for i in range(k):
    z = jax.random.rademacher(jax.random.split(jax.random.fold_in(key, i))[0], (op.dim,),
                              op.dtype)
    theta, w = _matfree_ritz(op, z / jnp.linalg.norm(z), m)
    nodes.append(theta)
    weights.append(w)
  nodes, weights = np.stack(nodes), np.stack(weights)
  np.testing.assert_allclose(np.sort(res.nodes, axis=1), nodes, rtol=1e-8,
                             atol=1e-9 * np.abs(nodes).max())
  theirs = hs.gaussian_density(jnp.asarray(nodes), jnp.asarray(weights), res.grid, res.sigma)
  np.testing.assert_allclose(res.density, theirs, atol=1e-8 * float(np.max(theirs)))
  # matfree's own SLQ estimator of tr(H^2) with its own probes: the two
  # estimates agree within 4 combined standard errors (tr(H^2) = P * moment 2).
  square = funm.dense_funm_sym_eigh(lambda x: x ** 2)
  integrand = funm.monte_carlo_funm_sym(square, decomp.tridiag_sym(m, reortho="full"))
  sampler = stochtrace.sampler_signs(jnp.zeros(op.dim, op.dtype), num=200)
  mean, sem = jax.jit(stochtrace.estimator_monte_carlo_mean_and_sem(integrand, sampler))(
      op.matvec, jax.random.PRNGKey(13))
  ours, se = hs.slq_moments(res.nodes, res.weights, 2)
  exact = np.sum(np.linalg.eigvalsh(dense) ** 2)
  combined = np.hypot(float(sem), op.dim * float(se))
  assert abs(float(mean) - op.dim * float(ours)) <= 4 * combined, (mean, ours, sem, se)
  assert abs(float(mean) - exact) <= 4 * float(sem), (mean, exact, sem)


def test_trace_estimates_agree_with_matfree(mlp):
  _, _, _, dense, op = mlp
  from matfree import stochtrace

  key, num = jax.random.PRNGKey(14), 200
  ours = hs.hutchinson_trace(op, key, num_probes=num)
  # Same probes: matfree's Monte Carlo estimator fed hutchinson_trace's probes.
  probes = jnp.stack([jax.random.rademacher(jax.random.fold_in(key, i), (op.dim,), op.dtype)
                      for i in range(num)])
  same = stochtrace.estimator_monte_carlo(stochtrace.monte_carlo_trace(), lambda _: probes)(
      op.matvec, key)
  np.testing.assert_allclose(ours.trace, same, rtol=1e-10)
  # Its own probes: within 4 combined standard errors, and of the exact trace.
  sampler = stochtrace.sampler_signs(jnp.zeros(op.dim, op.dtype), num=num)
  mean, sem = stochtrace.estimator_monte_carlo_mean_and_sem(
      stochtrace.monte_carlo_trace(), sampler)(op.matvec, jax.random.PRNGKey(15))
  assert abs(float(mean) - float(ours.trace)) <= 4 * np.hypot(float(sem), float(ours.stderr))
  assert abs(float(mean) - np.trace(dense)) <= 4 * float(sem)


# Sharded HVP (4 host devices, subprocess): parameters split over the "fsdp"
# axis of a 2 x 2 mesh, batch over all four devices. Our routines on
# `hvp_operator` of the sharded params, and matfree on the pytree HVP of the
# sharded params (matfree ravels the vectors itself), with the same start
# vector and probes, against references from the dense Hessian (numpy).
_SHARDED_CODE = r"""
import json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from jax.flatten_util import ravel_pytree
from matfree import decomp, eig, stochtrace
from lensllm_jax.theory import hessian as hs
from lensllm_jax.training import sharding

assert jax.device_count() == 4
k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
params = {"w1": jax.random.normal(k1, (4, 6)), "b1": 0.1 * jax.random.normal(k2, (6,)),
          "w2": jax.random.normal(k3, (6, 3))}
x = jax.random.normal(k4, (24, 4))
y = jnp.arange(24) % 3

def loss(p, batch):
  xb, yb = batch
  logp = jax.nn.log_softmax(jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"])
  return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

mesh = sharding.make_mesh(num_fsdp=2)
shardings = sharding.param_shardings(params, mesh)
params_s = jax.device_put(params, shardings)
batch_s = sharding.shard_batch((x, y), mesh)
op = hs.hvp_operator(loss, params_s, batch_s)
_, unravel = ravel_pytree(params)
key, m, num, slq_k, slq_m = jax.random.PRNGKey(1), 20, 16, 3, 6
dense = np.asarray(hs.dense_hessian(loss, params, (x, y)))
q0 = hs.lanczos(op, key, 1).basis[0]
hutch = np.stack([jax.random.rademacher(jax.random.fold_in(key, i), (op.dim,), jnp.float64)
                  for i in range(num)])
slq_z = np.stack([jax.random.rademacher(jax.random.split(jax.random.fold_in(key, i))[0],
                                        (op.dim,), jnp.float64) for i in range(slq_k)])

def tree_hvp(v, p, b):
  return hs.hvp(loss, p, b, v)

e = hs.lanczos_eigs(op, key, k=3, num_iters=m)
nodes, weights, _ = hs.slq_nodes_weights(op, key, num_probes=slq_k, num_iters=slq_m)
vals, _ = jax.jit(lambda p, b, q: eig.eigh_partial(decomp.tridiag_sym(m, reortho="full"))(
    tree_hvp, q, p, b))(params_s, batch_s, jax.device_put(unravel(q0), shardings))
trace = jax.jit(lambda p, b, z: stochtrace.estimator_monte_carlo(
    stochtrace.monte_carlo_trace(), lambda _: jax.vmap(unravel)(z))(tree_hvp, key, p, b))(
        params_s, batch_s, jnp.asarray(hutch))
tridiag = jax.jit(lambda p, b, q: decomp.tridiag_sym(slq_m, reortho="full")(tree_hvp, q, p, b)[1])
their_nodes = [np.linalg.eigvalsh(np.asarray(tridiag(params_s, batch_s, jax.device_put(
    unravel(z / np.linalg.norm(z)), shardings)))).tolist() for z in slq_z]
print(json.dumps({
    "split": [not s.is_fully_replicated for s in jax.tree.leaves(shardings)],
    "dense_top": np.linalg.eigvalsh(dense)[::-1][:3].tolist(),
    "quad": np.einsum("ip,pq,iq->i", hutch, dense, hutch).tolist(),
    "quad_sq": np.einsum("ip,pq,iq->i", slq_z, dense @ dense, slq_z).tolist(),
    "ours": {"top": np.asarray(e.eigenvalues).tolist(), "resid": np.asarray(e.residual_norms).tolist(),
             "trace": float(hs.hutchinson_trace(op, key, num_probes=num).trace),
             "nodes": np.sort(np.asarray(nodes), axis=1).tolist(),
             "weights": np.asarray(weights)[np.arange(slq_k)[:, None],
                                            np.argsort(np.asarray(nodes), axis=1)].tolist()},
    "matfree_tree": {"top": np.sort(np.asarray(vals))[::-1][:3].tolist(), "trace": float(trace),
                     "nodes": their_nodes}}))
"""


@pytest.mark.slow
def test_sharded_hvp_agrees_with_dense_references_and_matfree():
  out = json.loads(run_with_host_devices(_SHARDED_CODE, num_devices=4).strip().splitlines()[-1])
  assert all(out["split"]), "a parameter leaf is not split: the test would not test sharding"
  ours, theirs, dim = out["ours"], out["matfree_tree"], 48
  # Ours on the sharded operator against the dense Hessian: the top Ritz values lie
  # within their residual norms of the top eigenvalues; the trace estimate is the
  # mean of the same probes' z^T H z; each probe's Gauss rule integrates t^2
  # exactly (m = 6 >= 2): ||z||^2 sum_j w_j theta_j^2 = z^T H^2 z.
  top, dense_top = np.asarray(ours["top"]), np.asarray(out["dense_top"])
  assert np.all(np.abs(top[:2] - dense_top[:2]) <= np.asarray(ours["resid"][:2]) + 1e-12)
  np.testing.assert_allclose(top[:2], dense_top[:2], rtol=1e-6)
  np.testing.assert_allclose(ours["trace"], np.mean(out["quad"]), rtol=1e-10)
  second = dim * np.sum(np.asarray(ours["weights"]) * np.asarray(ours["nodes"]) ** 2, axis=1)
  np.testing.assert_allclose(second, out["quad_sq"], rtol=1e-9)
  # matfree on the sharded pytree HVP, same start vector and probes: the same numbers.
  np.testing.assert_allclose(theirs["top"], ours["top"], rtol=1e-9)
  np.testing.assert_allclose(theirs["trace"], ours["trace"], rtol=1e-10)
  np.testing.assert_allclose(theirs["nodes"], ours["nodes"], rtol=1e-9,
                             atol=1e-10 * np.abs(ours["nodes"]).max())
