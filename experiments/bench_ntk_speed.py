r"""Benchmark: empirical NTK implementations on a small transformer.

For n probe sequences (default 64, 256, 1024) computes the [n, n] NTK of the
per-sequence mean log-likelihood of a small GPT-2-style model w.r.t. all
parameters with

  * neural-tangents JACOBIAN_CONTRACTION (the reference of the ratios),
  * neural-tangents NTK_VECTOR_PRODUCTS,
  * a naive jax.jacrev of the whole batch output + explicit contraction
    (the last two need O(n) passes over a batch of n: O(n^2) work, so they run
    only up to --slow_max_n),

and prints, per n, the run time (median of --repeats calls of the function
compiled ahead of time) and the peak memory XLA plans for the compiled function
(`compiled.memory_analysis()`: arguments + outputs + temporaries; on CPU this
is the buffer-assignment estimate, not a measured RSS), each as a ratio
against JACOBIAN_CONTRACTION in the same process. The kernels are also
compared with each other (max relative difference).

  python -m experiments.bench_ntk_speed                 # n = 64, 256, 1024
  python -m experiments.bench_ntk_speed --sizes=64,256  # quicker

--mode=scale: exact-blocked vs sketched kernels of an LLM-sized model
(default gpt2-124m, random init, all parameters). Each (n, kernel) case runs
in a fresh subprocess, which reports the wall time of one kernel evaluation
(compilation included) and its peak resident memory (VmHWM, the process'
high-water mark, with the model's own footprint shown as the baseline); the
sketch's relative Frobenius error ||Theta_hat - Theta||_F / ||Theta||_F is
reported against the exact kernel of the same n where that was run, next to
the predicted RMS error sqrt(((tr Theta)^2 + ||Theta||_F^2) / k) / ||Theta||_F.
Exact kernels with n > --exact_max_n are not run (their cost is printed).

  python -m experiments.bench_ntk_speed --mode=scale --sizes=16,256,1024 \
      --sketch_dims=1024,4096 --seq_len=8
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging

import experiments.common  # noqa: F401  (defines --compilation_cache_dir)
from lensllm_jax import models
from lensllm_jax.theory import ntk

_SIZES = flags.DEFINE_list("sizes", ["64", "256", "1024"], "Numbers of probe sequences n.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 16, "Tokens per probe sequence.")
_D_MODEL = flags.DEFINE_integer("d_model", 32, "Model width.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Transformer blocks.")
_HEADS = flags.DEFINE_integer("heads", 2, "Attention heads.")
_VOCAB = flags.DEFINE_integer("vocab", 128, "Vocabulary size.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per case (median reported).")
_IMPLS = flags.DEFINE_list("implementations", list(ntk.IMPLEMENTATIONS),
                           "Implementations; the first is the reference of the ratios.")
_SLOW_MAX_N = flags.DEFINE_integer(
    "slow_max_n", 256, "Largest n for the implementations whose cost grows as n^2 passes "
    "(ntk_vector_products, jacrev); larger n are reported as skipped.")
_OUT = flags.DEFINE_string("out", None, "Optional CSV of the measurements.")
_MODE = flags.DEFINE_enum("mode", "implementations", ["implementations", "scale"],
                          "implementations: the NTK implementations on a small model; scale: "
                          "exact-blocked vs sketched on --preset (fresh process per case).")
_PRESET = flags.DEFINE_string("preset", "gpt2-124m", "--mode=scale: model preset (random init).")
_SKETCH_DIMS = flags.DEFINE_list("sketch_dims", ["1024", "4096"], "--mode=scale: sketch sizes k.")
_SKETCH = flags.DEFINE_enum("sketch", "countsketch", list(ntk.SKETCHES), "--mode=scale: sketch.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 4, "--mode=scale: examples per block.")
_EXACT_MAX_N = flags.DEFINE_integer("exact_max_n", 16, "--mode=scale: largest n of the exact kernel.")
_CASE_TIMEOUT = flags.DEFINE_integer("case_timeout", 1800, "--mode=scale: seconds per case.")
_CASE = flags.DEFINE_string("case", None, "Internal: JSON of one --mode=scale case.")


def build_model():
  """Small GPT-2-style model and its parameters (seeded)."""
  config = models.presets["tiny-gpt2"].replace(
      d_model=_D_MODEL.value, n_layers=_LAYERS.value, n_heads=_HEADS.value, n_kv_heads=None,
      head_dim=None, d_ff=4 * _D_MODEL.value, vocab_size=_VOCAB.value,
      max_len=max(_SEQ_LEN.value, 16))
  model = models.build(config)
  params = models.init_params(config, jax.random.key(0))
  return config, model, params


def measure(fn, params, x, repeats):
  """Compile once, then time `repeats` calls; returns (seconds, peak bytes, kernel)."""
  t0 = time.perf_counter()
  compiled = fn.lower(params, x).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes) if mem is not None else float("nan")
  # Compiled ahead of time, so the first call is already a warm call.
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    kernel = jax.block_until_ready(compiled(params, x))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), compile_s, peak, np.asarray(kernel, np.float64)


def run_size(n, model, params, config, repeats):
  ids = jax.random.randint(jax.random.key(n), (n, _SEQ_LEN.value), 0, config.vocab_size)
  apply_fn = ntk.lm_output_fn(model, "log_likelihood")
  rows, ref_kernel = [], None
  for i, impl in enumerate(_IMPLS.value):
    if i > 0 and impl != "jacobian_contraction" and n > _SLOW_MAX_N.value:
      logging.info("n=%d %s skipped (n > --slow_max_n=%d)", n, impl, _SLOW_MAX_N.value)
      rows.append(dict(n=n, implementation=impl, seconds=float("nan"),
                       compile_seconds=float("nan"), peak_mib=float("nan"),
                       max_rel_diff=float("nan")))
      continue
    fn = ntk.make_ntk_fn(apply_fn, implementation=impl)
    sec, compile_s, peak, kernel = measure(fn, params, ids, repeats)
    if ref_kernel is None:
      ref_kernel = kernel
    diff = float(np.abs(kernel - ref_kernel).max() / np.abs(ref_kernel).max())
    rows.append(dict(n=n, implementation=impl, seconds=sec, compile_seconds=compile_s,
                     peak_mib=peak / 2**20, max_rel_diff=diff))
    logging.info("n=%d %-22s %.3fs (compile %.1fs) peak %.1f MiB, %.0f kernel entries/s",
                 n, impl, sec, compile_s, peak / 2**20, n * n / sec)
  return rows


def print_table(rows):
  ref = {}
  for r in rows:
    ref.setdefault(r["n"], r)
  header = (f"{'n':>6} {'implementation':<22} {'time s':>9} {'time ratio':>10} "
            f"{'peak MiB':>9} {'mem ratio':>9} {'max rel diff':>12}")
  print(header)
  print("-" * len(header))
  for r in rows:
    b = ref[r["n"]]
    if np.isnan(r["seconds"]):
      print(f"{r['n']:>6} {r['implementation']:<22} {'skipped (n > --slow_max_n)':>30}")
      continue
    print(f"{r['n']:>6} {r['implementation']:<22} {r['seconds']:>9.3f} "
          f"{r['seconds'] / b['seconds']:>10.2f} {r['peak_mib']:>9.1f} "
          f"{r['peak_mib'] / b['peak_mib']:>9.2f} {r['max_rel_diff']:>12.1e}")
  print(f"(ratios against {rows[0]['implementation']} at the same n; peak = XLA "
        "memory_analysis of the compiled kernel function)")


def _peak_rss_mib() -> float:
  """The process' peak resident set size (VmHWM), MiB."""
  with open("/proc/self/status") as fh:
    for line in fh:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def run_case(case: dict) -> None:
  """One --mode=scale case in this (fresh) process: prints a JSON line, saves the kernel."""
  config = models.presets[case["preset"]].replace(max_len=max(case["seq_len"], 8))
  model = models.build(config)
  params = models.init_params(config, jax.random.key(0))
  ids = np.asarray(jax.random.randint(jax.random.key(case["n"]), (case["n"], case["seq_len"]), 0,
                                      config.vocab_size))
  baseline = _peak_rss_mib()
  apply_fn = ntk.lm_output_fn(model, "log_likelihood")
  if case["kernel"] == "exact":
    fn = ntk.make_blocked_ntk_fn(ntk.make_ntk_fn(apply_fn), block_size=case["block_size"],
                                 pairs_per_call=1)
  else:
    fn = ntk.make_sketched_ntk_fn(apply_fn, sketch_dim=case["k"], key=jax.random.key(1),
                                  sketch=case["sketch"], block_size=case["block_size"])
  t0 = time.perf_counter()
  theta = np.asarray(jax.block_until_ready(fn(params, ids)), np.float64)
  seconds = time.perf_counter() - t0
  np.save(case["out"], theta)
  print(json.dumps(dict(seconds=seconds, peak_rss_mib=_peak_rss_mib(),
                        baseline_rss_mib=baseline, num_params=models.count_params(params))))


def run_scale() -> None:
  """Exact-blocked vs sketched kernels of --preset, a fresh subprocess per case."""
  import subprocess
  import sys
  import tempfile

  sizes = [int(s) for s in _SIZES.value]
  dims = [int(k) for k in _SKETCH_DIMS.value]
  print(f"model {_PRESET.value} (random init, all parameters), seq_len {_SEQ_LEN.value}, "
        f"output: mean log-likelihood per sequence; block_size {_BLOCK_SIZE.value}; "
        f"{_SKETCH.value} sketch; {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs")
  header = (f"{'n':>5} {'kernel':<18} {'time s':>9} {'peak RSS MiB':>12} {'(model MiB)':>11} "
            f"{'rel. error':>10} {'predicted':>9}")
  print(header)
  print("-" * len(header), flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    for n in sizes:
      cases = [dict(kernel="exact")] + [dict(kernel="sketched", k=k) for k in dims]
      exact = None
      for case in cases:
        name = "exact-blocked" if case["kernel"] == "exact" else f"sketched k={case['k']}"
        if case["kernel"] == "exact" and n > _EXACT_MAX_N.value:
          nb = -(-n // _BLOCK_SIZE.value)
          print(f"{n:>5} {name:<18} not run (n > --exact_max_n: {nb * (nb + 1) // 2} block "
                f"pairs, {nb * (nb + 1) * _BLOCK_SIZE.value} per-example Jacobians)", flush=True)
          continue
        case.update(n=n, preset=_PRESET.value, seq_len=_SEQ_LEN.value,
                    block_size=_BLOCK_SIZE.value, sketch=_SKETCH.value,
                    out=os.path.join(tmp, f"{n}_{name.replace(' ', '')}.npy"))
        try:
          proc = subprocess.run([sys.executable, "-m", "experiments.bench_ntk_speed",
                                 f"--case={json.dumps(case)}"], capture_output=True, text=True,
                                timeout=_CASE_TIMEOUT.value)
        except subprocess.TimeoutExpired:
          print(f"{n:>5} {name:<18} timed out (> {_CASE_TIMEOUT.value}s)", flush=True)
          continue
        if proc.returncode != 0:
          print(f"{n:>5} {name:<18} failed ({proc.returncode}): "
                f"{proc.stderr.strip().splitlines()[-1:]}", flush=True)
          continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        theta = np.load(case["out"])
        err = pred = ""
        if case["kernel"] == "exact":
          exact = theta
        elif exact is not None:
          norm = np.linalg.norm(exact)
          err = f"{np.linalg.norm(theta - exact) / norm:.3f}"
          pred = f"{ntk.sketch_rms_error(exact, case['k']) / norm:.3f}"
        print(f"{n:>5} {name:<18} {res['seconds']:>9.1f} {res['peak_rss_mib']:>12.0f} "
              f"{res['baseline_rss_mib']:>11.0f} {err:>10} {pred:>9}", flush=True)
  print("(time: one evaluation including compilation; peak RSS: VmHWM of a fresh process per "
        "case, model MiB: its RSS before the kernel; rel. error: ||Theta_hat - Theta||_F / "
        "||Theta||_F against exact at the same n, predicted: the docstring's RMS)")


def main(argv):
  del argv
  if _CASE.value:
    run_case(json.loads(_CASE.value))
    return
  if _MODE.value == "scale":
    run_scale()
    return
  for impl in _IMPLS.value:
    if impl not in ntk.IMPLEMENTATIONS:
      raise app.UsageError(f"--implementations: {impl!r} is not one of {ntk.IMPLEMENTATIONS}")
  sizes = [int(s) for s in _SIZES.value]
  config, model, params = build_model()
  print(f"model: gpt2 arch, {config.n_layers} layers, d_model {config.d_model}, "
        f"{config.n_heads} heads, vocab {config.vocab_size}, seq_len {_SEQ_LEN.value}, "
        f"{models.count_params(params)} parameters; output: mean log-likelihood per sequence; "
        f"device {jax.devices()[0].device_kind} x{len(jax.devices())}, "
        f"{os.cpu_count()} CPUs")
  rows = []
  for n in sizes:
    rows += run_size(n, model, params, config, _REPEATS.value)
  print_table(rows)
  if _OUT.value:
    with open(_OUT.value, "w", newline="") as fh:
      writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)


if __name__ == "__main__":
  app.run(main)
