r"""Wall and CPU time of the selection protocol binary, cold and warm (docs/speed.md).

    python -m experiments.bench_protocol_speed [--workdir=/tmp/protocol_speed]

Runs `python -m experiments.reproduce_selection` as a fresh process on three
curve files -- the public flan and gigaword files and a third file in the
public format written here (`synthetic3.csv`: 30 rectified-law curves on the
flan grid, log-normal noise 0.01, seed 0; generated, not public data) -- in
three settings, each into a fresh output directory:

  full_cold       the default protocol (7 methods + budgeted), empty compilation cache
  published_cold  the six published methods only (ZeroShot, SubTuning, ModelSize,
                  VanillaFit, RectifiedFit, AtS), no budgeted procedure, empty cache
  full_warm       the default protocol again, with the cache full_cold left behind

and prints wall seconds, user + system CPU seconds of the child, the
machine's load average before each run, and the ratio to the reference
code's 458.8 s. Figures are off (they are not part of the computation).
"""

from __future__ import annotations

import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from lensllm_jax.curves import benchmarks
from lensllm_jax.selection import methods

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_SECONDS = 458.8  # the reference code on the same three files
# The six methods of Lin et al. (2024), in the order of their tables.
PUBLISHED = tuple(m.name for m in methods.REGISTRY if m.paper == methods.LIN_2024)

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/protocol_speed", "Scratch directory (wiped).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory of flan.csv / gigaword.csv.")


def write_third_file(path: pathlib.Path, grid) -> None:
  """30 rectified-law curves B / (D_l + D^beta) + E with 1% log-normal noise (seed 0)."""
  rng = np.random.default_rng(0)
  m = 30
  d = np.asarray(grid, np.float64)
  beta = rng.uniform(0.2, 0.6, m)
  d_t = np.exp(rng.uniform(np.log(500.0), np.log(2e5), m))
  e = rng.uniform(0.8, 2.5, m)
  amp = rng.uniform(1.0, 4.0, m)
  d_l = d_t ** beta
  loss = amp[:, None] * d_l[:, None] / (d_l[:, None] + np.maximum(d, 1e-10)[None] **
                                        beta[:, None]) + e[:, None]
  loss *= np.exp(0.01 * rng.standard_normal(loss.shape))
  benchmarks.write_curves(benchmarks.CurveSet(
    name="synthetic3", source=str(path), models=tuple(f"synthetic/model-{i}" for i in range(m)),
    sizes=(10 ** rng.uniform(8, 10, m)).astype(np.int64), families=("synthetic",) * m,
    data_sizes=d, losses=loss), path)


def timed(args, env) -> dict:
  """Runs a child process; wall seconds and its user + system CPU seconds."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  load = os.getloadavg()[0]
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "experiments.reproduce_selection", *args],
                        env=env, cwd=REPO_ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode != 0:
    raise RuntimeError(f"reproduce_selection failed:\n{proc.stderr[-3000:]}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return {"wall": wall, "cpu": cpu, "load": load}


def main(argv):
  del argv
  work = pathlib.Path(_WORKDIR.value)
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  data_dir = _DATA_DIR.value
  flan = benchmarks.load_curves("flan", data_dir=data_dir)
  third = work / "synthetic3.csv"
  write_third_file(third, flan.data_sizes)
  files = [str(benchmarks.resolve_curve_file(n, data_dir=data_dir)) for n in ("flan", "gigaword")]
  files.append(str(third))
  base = ["--config=configs/selection.py", f"--config.benchmarks={tuple(files)!r}",
          "--config.figures=False"]
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  cache = work / "jax_cache"
  runs = {
    "full_cold": base + [f"--output_dir={work / 'full_cold'}", f"--compilation_cache_dir={cache}"],
    "published_cold": base + [f"--output_dir={work / 'published_cold'}", "--config.budget.enabled=False",
                              f"--config.methods={PUBLISHED!r}",
                              f"--compilation_cache_dir={work / 'cache_published'}"],
    "full_warm": base + [f"--output_dir={work / 'full_warm'}", f"--compilation_cache_dir={cache}"],
  }
  print(f"files: {', '.join(files)}")
  print("| run | wall s | CPU s (user+sys) | load avg (1 min) before | reference 458.8 s / wall |")
  print("|---|---|---|---|---|")
  for name, args in runs.items():
    r = timed(args, env)
    print(f"| {name} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['load']:.1f} | "
          f"{REFERENCE_SECONDS / r['wall']:.0f}x |", flush=True)


if __name__ == "__main__":
  app.run(main)
