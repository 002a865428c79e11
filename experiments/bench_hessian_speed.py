r"""Cost of matrix-free Hessian operations relative to one gradient (same process).

For a small causal LM (default preset tiny-gpt2) and one batch of random
tokens, times (after compilation, best of --repeats calls, each blocked on
its result):

  loss       the jitted mean token NLL (forward pass)
  grad       the jitted gradient (reference, = 1.0)
  hvp        one Hessian-vector product, forward-over-reverse
             (`hessian.hvp_operator(...).matvec`)
  lanczos    `hessian.lanczos_eigs` top-k (k = --k) with --num_iters steps and
             k true residuals, i.e. num_iters + k products
  hutchinson `hessian.hutchinson_trace` with --probes probes

and the same jobs by matfree (a maintained JAX library), on the same HVP:

  lanczos_nores      `hessian.lanczos_eigs` without the k residual products
  matfree_lanczos    matfree `eig.eigh_partial(decomp.tridiag_sym(num_iters))`
                     (full re-orthogonalisation; the same num_iters products)
  matfree_hutchinson matfree `stochtrace.estimator_monte_carlo` with
                     `monte_carlo_trace` and --probes sign probes (vmapped)

and prints each as a ratio to the gradient time (and per product for the
Krylov methods), plus compile times, then ours / matfree. No assertions: it
reports.

--sharded: the same jobs on an HVP whose parameters are split over the "fsdp"
axis of a [data, fsdp] mesh (`training.sharding.put_params`, --num_fsdp) and
whose batch is split over all devices (`shard_batch`), run on several devices
(fake host devices on CPU: set XLA_FLAGS before the command). Three ways:

  ours         `hessian.hvp_operator` on the sharded params and batch (flat
               operator) with `lanczos_eigs` (no residuals), `hutchinson_trace`
               and `slq_nodes_weights` (--slq_probes probes of --slq_iters steps)
  matfree_flat matfree's Lanczos / Hutchinson / SLQ on the same flat operator
  matfree_tree matfree on the pytree HVP `hessian.hvp(loss, params, batch, v)`
               (matfree ravels the vectors itself; the parameters stay in
               their shardings)

Every job gets the same start vector and the same probes (ours' draws), so
the results must agree to rounding: the table gives the largest relative
difference from ours on ONE device (same process) of the top-k eigenvalues,
the trace, and the SLQ estimate of tr(H^2). Per job it prints the time (best
of --repeats) relative to ours on the sharded operator, the per-device bytes
of the compiled program (`memory_analysis()`: arguments + outputs +
temporaries) and its all-gathers (collectives XLA inserted to gather a
sharded array), and the sharding of the flat parameter vector that
`hvp_operator` holds.

  python -m experiments.bench_hessian_speed [--preset tiny-gpt2] [--batch 8] [--seq_len 64]
  # ~1-2 min on 2 CPU cores (mostly compilation)
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python -m experiments.bench_hessian_speed --sharded [--num_fsdp 2]
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree
from matfree import decomp, eig, funm, stochtrace

import experiments.common  # noqa: F401  (defines --compilation_cache_dir)
from experiments.hessian_common import lm_loss_fn, markov_sequences
from lensllm_jax.models import build, count_params, init_params, presets
from lensllm_jax.theory import hessian
from lensllm_jax.training import sharding

_PRESET = flags.DEFINE_string("preset", "tiny-gpt2", "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Sequence length.")
_K = flags.DEFINE_integer("k", 10, "Lanczos top-k.")
_ITERS = flags.DEFINE_integer("num_iters", 30, "Lanczos steps.")
_PROBES = flags.DEFINE_integer("probes", 20, "Hutchinson probes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls after compilation (min taken).")
_SHARDED = flags.DEFINE_bool("sharded", False, "Compare on a sharded HVP (needs > 1 device).")
_NUM_FSDP = flags.DEFINE_integer("num_fsdp", 2, "--sharded: devices on the fsdp axis.")
_SLQ_PROBES = flags.DEFINE_integer("slq_probes", 4, "--sharded: SLQ probes.")
_SLQ_ITERS = flags.DEFINE_integer("slq_iters", 10, "--sharded: Lanczos steps per SLQ probe.")


def _block(x):
  return jax.block_until_ready(x)


def timed(fn, repeats):
  """(first-call seconds, best later-call seconds) of fn()."""
  t0 = time.perf_counter()
  _block(fn())
  first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(fn())
    best = min(best, time.perf_counter() - t0)
  return first, best


def single_device(loss, params, batch):
  """The single-device table: our routines and matfree's on one flat HVP."""
  op = hessian.hvp_operator(loss, params, batch)
  v = jax.random.normal(jax.random.PRNGKey(1), (op.dim,), op.dtype)
  key = jax.random.PRNGKey(2)
  loss_jit, grad_jit = jax.jit(loss), jax.jit(jax.grad(loss))
  q0 = hessian.lanczos(op, key, 1).basis[0]
  # The operator is a pytree argument, so its data are not baked into the programs.
  mf_lanczos = jax.jit(lambda op, q: eig.eigh_partial(
      decomp.tridiag_sym(_ITERS.value, reortho="full"))(op.matvec, q))
  mf_trace = jax.jit(lambda op, k: stochtrace.estimator_monte_carlo(
      stochtrace.monte_carlo_trace(),
      stochtrace.sampler_signs(jnp.zeros(op.dim, op.dtype), num=_PROBES.value))(op.matvec, k))
  r = _REPEATS.value
  results = {
      "loss": timed(lambda: loss_jit(params, batch), r),
      "grad": timed(lambda: grad_jit(params, batch), r),
      "hvp": timed(lambda: op.matvec(v), r),
      "lanczos": timed(lambda: hessian.lanczos_eigs(op, key, k=_K.value,
                                                    num_iters=_ITERS.value), r),
      "hutchinson": timed(lambda: hessian.hutchinson_trace(op, key, _PROBES.value), r),
      "lanczos_nores": timed(lambda: hessian.lanczos_eigs(
          op, key, k=_K.value, num_iters=_ITERS.value, compute_residuals=False), r),
      "matfree_lanczos": timed(lambda: mf_lanczos(op, q0), r),
      "matfree_hutchinson": timed(lambda: mf_trace(op, key), r),
  }
  products = {"hvp": 1, "lanczos": _ITERS.value + _K.value, "hutchinson": _PROBES.value,
              "lanczos_nores": _ITERS.value, "matfree_lanczos": _ITERS.value,
              "matfree_hutchinson": _PROBES.value}
  g = results["grad"][1]
  print(f"{'op':<18} {'time (ms)':>10} {'/ grad':>8} {'/ grad per HVP':>15} {'compile (s)':>12}")
  for name, (first, best) in results.items():
    per = f"{best / g / products[name]:15.2f}" if name in products else f"{'':>15}"
    print(f"{name:<18} {1e3 * best:10.2f} {best / g:8.2f} {per} {first - best:12.2f}")
  print(f"HVP / grad = {results['hvp'][1] / g:.2f} (theory: ~2-3, forward-over-reverse); "
        f"Lanczos k={_K.value} ({_ITERS.value} steps + {_K.value} residuals) = "
        f"{results['lanczos'][1] / g:.1f} gradients")
  for ours, theirs in (("lanczos_nores", "matfree_lanczos"), ("hutchinson", "matfree_hutchinson")):
    print(f"{ours} / {theirs} = {results[ours][1] / results[theirs][1]:.2f} (run time), "
          f"{(results[ours][0] - results[ours][1]) / (results[theirs][0] - results[theirs][1]):.2f}"
          " (compile)")


def compile_with_cost(jitted, *args):
  """The compiled program, its per-device bytes (arguments + outputs + temporaries,
  `memory_analysis()`) and its number of all-gathers."""
  compiled = jitted.lower(*args).compile()
  mem = compiled.memory_analysis()
  size = (float("nan") if mem is None else float(
      mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes))
  return compiled, size, len(re.findall(r"\sall-gather(?:-start)?\(", compiled.as_text()))


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def sharded(loss, params, batch):
  """The sharded table: ours and matfree's (flat operator, pytree HVP) on a mesh."""
  if jax.device_count() < 2:
    raise app.UsageError("--sharded needs several devices; on CPU run with "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=4")
  mesh = sharding.make_mesh(num_fsdp=_NUM_FSDP.value)
  if _BATCH.value % sharding.num_batch_shards(mesh):
    raise app.UsageError(f"--batch ({_BATCH.value}) must be a multiple of the "
                         f"{sharding.num_batch_shards(mesh)} devices")
  shardings = sharding.param_shardings(params, mesh)
  params_s, batch_s = jax.device_put(params, shardings), sharding.shard_batch(batch, mesh)
  op_s = hessian.hvp_operator(loss, params_s, batch_s)
  op_1 = hessian.hvp_operator(loss, params, batch)
  m, k, probes, slq_k, slq_m = (_ITERS.value, _K.value, _PROBES.value, _SLQ_PROBES.value,
                                _SLQ_ITERS.value)
  key = jax.random.PRNGKey(2)
  _, unravel = ravel_pytree(params)
  dim, dtype = op_1.dim, op_1.dtype
  # Ours' draws, made inside each program as ours makes them: the Lanczos start,
  # the Hutchinson probes (fold_in(key, i)) and the SLQ probes.
  q0 = hessian.lanczos(op_1, key, 1).basis[0]

  def hutch_probes(key):
    return jax.vmap(lambda i: jax.random.rademacher(jax.random.fold_in(key, i), (dim,), dtype))(
        jnp.arange(probes))

  def slq_probes(key):
    return jax.vmap(lambda i: jax.random.rademacher(
        jax.random.split(jax.random.fold_in(key, i))[0], (dim,), dtype))(jnp.arange(slq_k))

  q0_tree = jax.device_put(unravel(q0), shardings)

  def tree_hvp(v, p, b):
    return hessian.hvp(loss, p, b, v)

  def mf_eigh(matvec, q, *args):
    vals, vecs = eig.eigh_partial(decomp.tridiag_sym(m, reortho="full"))(matvec, q, *args)
    return jnp.sort(vals)[::-1][:k], vecs

  def mf_mean(integrand, matvec, probes, *args):
    return stochtrace.estimator_monte_carlo(integrand, lambda _: probes)(matvec, key, *args)

  trace_integrand = stochtrace.monte_carlo_trace()
  square_integrand = funm.monte_carlo_funm_sym(funm.dense_funm_sym_eigh(jnp.square),
                                               decomp.tridiag_sym(slq_m, reortho="full"))

  def ours_slq(op, key):
    nodes, weights, _ = hessian.slq_nodes_weights(op, key, slq_k, slq_m)
    return hessian.slq_moments(nodes, weights, 2)[0] * op.dim

  ours = {
      "lanczos": jax.jit(lambda op, key: hessian.lanczos_eigs(
          op, key, k=k, num_iters=m, compute_residuals=False)[:2]),
      "hutchinson": jax.jit(lambda op, key: hessian.hutchinson_trace(op, key, probes).trace),
      "slq": jax.jit(ours_slq),
  }
  flat = {
      "lanczos": jax.jit(lambda op, q: mf_eigh(op.matvec, q)),
      "hutchinson": jax.jit(lambda op, key: mf_mean(trace_integrand, op.matvec,
                                                    hutch_probes(key))),
      "slq": jax.jit(lambda op, key: mf_mean(square_integrand, op.matvec, slq_probes(key))),
  }
  tree = {
      "lanczos": jax.jit(lambda p, b, q: mf_eigh(tree_hvp, q, p, b)),
      "hutchinson": jax.jit(lambda p, b, key: mf_mean(
          trace_integrand, tree_hvp, jax.vmap(unravel)(hutch_probes(key)), p, b)),
      "slq": jax.jit(lambda p, b, key: mf_mean(
          square_integrand, tree_hvp, jax.vmap(unravel)(slq_probes(key)), p, b)),
  }
  starts = {"lanczos": q0, "hutchinson": key, "slq": key}
  runs = {}  # (way, job) -> (jitted, args)
  for job in ours:
    runs["ours, 1 device", job] = ours[job], (op_1, key)
    runs["ours", job] = ours[job], (op_s, key)
    runs["matfree_flat", job] = flat[job], (op_s, starts[job])
    runs["matfree_tree", job] = tree[job], (params_s, batch_s,
                                            q0_tree if job == "lanczos" else starts[job])
  r = _REPEATS.value
  rows = {}
  for (way, job), (fn, args) in runs.items():
    compiled, size, gathers = compile_with_cost(fn, *args)
    out = _block(compiled(*args))
    _, best = timed(lambda compiled=compiled, args=args: compiled(*args), r)
    rows[way, job] = out, best, size, gathers
  print(f"{len(jax.devices())} devices, mesh {dict(mesh.shape)}; params split over 'fsdp' "
        f"(training.sharding.param_shardings), batch over all devices")
  print(f"hvp_operator's flat parameter vector [{op_s.dim}]: "
        f"{hessian.split_params(params_s)[0].sharding}")
  print(f"Lanczos {m} steps (top {k}), Hutchinson {probes} probes, SLQ {slq_k} probes x {slq_m} "
        "steps (tr(H^2)); same start vector and probes for every way")
  print(f"{'way':<16} {'job':<11} {'time (ms)':>10} {'/ ours':>7} {'MiB/device':>11} "
        f"{'all-gathers':>12} {'rel. diff vs 1 device':>22}")
  for (way, job), (out, best, size, gathers) in rows.items():
    value = out[0] if job == "lanczos" else out
    diff = _relative(value, rows["ours, 1 device", job][0][0] if job == "lanczos"
                     else rows["ours, 1 device", job][0])
    print(f"{way:<16} {job:<11} {1e3 * best:10.2f} {best / rows['ours', job][1]:7.2f} "
          f"{size / 2**20:11.2f} {gathers:12d} {diff:22.2e}")
  vecs = rows["ours", "lanczos"][0][1]
  tree_vecs = jax.tree.leaves(rows["matfree_tree", "lanczos"][0][1])[0]
  print(f"eigenvectors: ours {vecs.shape} {vecs.sharding}; matfree_tree (first leaf) "
        f"{tree_vecs.shape} {tree_vecs.sharding}")


def main(argv):
  del argv
  config = presets[_PRESET.value]
  model = build(config)
  params = init_params(config, jax.random.PRNGKey(0))
  batch = {k: jnp.asarray(v) for k, v in markov_sequences(
      config.vocab_size, _BATCH.value, _SEQ_LEN.value, chain_seed=0, seed=0).items()}
  print(f"preset {_PRESET.value}: {count_params(params):,} parameters, batch "
        f"{_BATCH.value} x {_SEQ_LEN.value} tokens, backend {jax.default_backend()}")
  if _SHARDED.value:
    sharded(lm_loss_fn(model), params, batch)
  else:
    single_device(lm_loss_fn(model), params, batch)


if __name__ == "__main__":
  app.run(main)
