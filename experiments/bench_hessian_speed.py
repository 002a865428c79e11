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

  python -m experiments.bench_hessian_speed [--preset tiny-gpt2] [--batch 8] [--seq_len 64]
  # ~1-2 min on 2 CPU cores (mostly compilation)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags
from matfree import decomp, eig, stochtrace

import experiments.common  # noqa: F401  (defines --compilation_cache_dir)
from experiments.hessian_common import lm_loss_fn, markov_sequences
from lensllm_jax.models import build, count_params, init_params, presets
from lensllm_jax.theory import hessian

_PRESET = flags.DEFINE_string("preset", "tiny-gpt2", "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Sequence length.")
_K = flags.DEFINE_integer("k", 10, "Lanczos top-k.")
_ITERS = flags.DEFINE_integer("num_iters", 30, "Lanczos steps.")
_PROBES = flags.DEFINE_integer("probes", 20, "Hutchinson probes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls after compilation (min taken).")


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


def main(argv):
  del argv
  config = presets[_PRESET.value]
  model = build(config)
  params = init_params(config, jax.random.PRNGKey(0))
  batch = {k: jnp.asarray(v) for k, v in markov_sequences(
      config.vocab_size, _BATCH.value, _SEQ_LEN.value, chain_seed=0, seed=0).items()}
  loss = lm_loss_fn(model)
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
  print(f"preset {_PRESET.value}: {count_params(params):,} parameters, batch "
        f"{_BATCH.value} x {_SEQ_LEN.value} tokens, backend {jax.default_backend()}")
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


if __name__ == "__main__":
  app.run(main)
