r"""Benchmark: the default selection protocol on one large synthetic curve file.

    python -m experiments.bench_large_file [--models=500,5000] [--workdir=/tmp/bench_large]

For each model count M (ascending; the first is the reference), writes a
seeded synthetic curve file of M models on the public grid (D = 0, 200, ...,
1638400; rectified-law curves B / (D_l + D^beta) + E with 1 % log-normal
noise) and runs `experiments.reproduce_selection` with the default config
(`configs/selection.py`: the seven methods at the seven budget ratios, the
budgeted procedure at four levels; figures off; config.threads = --threads) as a
child process, whose progress lines pass through. Prints per M the wall and CPU
time (interpreter start and imports included), the peak resident memory of that process and each as a ratio to the reference run
(linear growth: the time and memory ratios equal the model-count ratio;
memory has a fixed part, the interpreter and compiled programs), and the
load average (wall times on a shared machine depend on it).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging

from experiments import common  # noqa: F401  (--compilation_cache_dir, shared by the binaries)
from lensllm_jax.curves import benchmarks

_MODELS = flags.DEFINE_list("models", ["500", "5000"], "Model counts, ascending.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_large_file", "Where files and outputs go.")
_THREADS = flags.DEFINE_integer(
    "threads", 1, "config.threads of the protocol (0: one per core). Default 1: with 2 threads "
    "the 500-model run hung (the batched eigh of two concurrent executions deadlocks XLA:CPU's "
    "intra-op pool; docs/development.md, known issues).")


def synthetic_file(path: pathlib.Path, num_models: int, seed: int = 0) -> None:
  """M rectified-law curves on the public grid (parameters as tests/_selection_synthetic)."""
  rng = np.random.default_rng(seed)
  d = np.concatenate([[0.0], 200.0 * 2.0 ** np.arange(14)])
  b = rng.uniform(2.0, 20.0, num_models)[:, None]
  dl = rng.uniform(0.5, 5.0, num_models)[:, None]
  beta = rng.uniform(0.2, 0.45, num_models)[:, None]
  e = rng.uniform(0.5, 2.0, num_models)[:, None]
  losses = b / (dl + np.where(d > 0, d, 1e-10)[None] ** beta) + e
  losses *= np.exp(0.01 * rng.standard_normal(losses.shape))
  benchmarks.write_curves(benchmarks.CurveSet(
      name=path.stem, source=str(path), models=tuple(f"model-{i}" for i in range(num_models)),
      sizes=(10 ** rng.uniform(7, 10, num_models)).astype(np.int64),
      families=tuple(f"fam{i % 7}" for i in range(num_models)), data_sizes=d, losses=losses),
      path)


def run_protocol(path: pathlib.Path, out: pathlib.Path) -> dict:
  """`python -m experiments.reproduce_selection` on one file as a child process (its progress
  lines pass through): {"seconds": wall, "cpu_seconds", "peak_rss_mib"} of that process
  (CPU time: less sensitive than wall time to other jobs on a shared machine)."""
  args = [sys.executable, "-m", "experiments.reproduce_selection",
          "--config=configs/selection.py", f"--config.benchmarks=('{path}',)",
          "--config.figures=False", f"--config.threads={_THREADS.value}",
          f"--output_dir={out}", f"--compilation_cache_dir={flags.FLAGS.compilation_cache_dir}"]
  t = time.perf_counter()
  proc = subprocess.Popen(args)
  _, status, usage = os.wait4(proc.pid, 0)
  seconds = time.perf_counter() - t
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise RuntimeError(f"reproduce_selection on {path} exited {proc.returncode}")
  return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
          "peak_rss_mib": usage.ru_maxrss / 1024}  # KiB on Linux


def main(argv):
  del argv
  work = pathlib.Path(_WORKDIR.value)
  work.mkdir(parents=True, exist_ok=True)
  rows = []
  for m in [int(x) for x in _MODELS.value]:
    path = work / f"synthetic{m}.csv"
    synthetic_file(path, m)
    out = pathlib.Path(str(path.with_suffix("")) + "_out")
    if out.exists():
      shutil.rmtree(out)
    logging.info("M=%d: %s (%.1f MB); running the default protocol ...", m, path,
                 path.stat().st_size / 1e6)
    stats = run_protocol(path, out)
    rows.append((m, stats["seconds"], stats["cpu_seconds"], stats["peak_rss_mib"]))
    logging.info("M=%d: protocol process %.1f s wall, %.1f s CPU, peak RSS %.0f MiB; "
                 "load average %s", m, stats["seconds"], stats["cpu_seconds"],
                 stats["peak_rss_mib"], " ".join(f"{x:.1f}" for x in os.getloadavg()))
  m0, s0, c0, r0 = rows[0]
  print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print("| models | process wall s | CPU s | peak RSS MiB | models / ref | wall / ref | "
        "CPU / ref | RSS / ref |")
  print("|---|---|---|---|---|---|---|---|")
  for m, s, c, rss in rows:
    print(f"| {m} | {s:.1f} | {c:.1f} | {rss:.0f} | {m / m0:.1f} | {s / s0:.2f} | "
          f"{c / c0:.2f} | {rss / r0:.2f} |")


if __name__ == "__main__":
  app.run(main)
