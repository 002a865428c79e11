r"""Fixed cost of fine-tuning sweep runs: a cold smoke sweep and a warm-cache run, against targets.

  python -m experiments.bench_sweep_overhead [--config=configs/finetune_tiny.py:smoke] \
      [--dir=/tmp/bench_sweep] [--warm_size=200] [--out=FILE]

Runs `experiments.finetune_sweep` twice, each in a fresh process with a fresh
workdir, sharing one JAX persistent compilation cache that starts empty:

  cold   the whole sweep of the config (the smoke config: one model, sizes
         D = 0, 200, 400: the zero-shot evaluation and two fine-tuning runs),
         compiling everything: wall time and CPU time of the process,
         imports included, against the target of 8 s wall;
  warm   the same sweep again, every program now in the persistent cache:
         the run at D = --warm_size (the first fine-tuning run of the process)
         spends `outside` seconds outside its training steps and its
         evaluations, against the target of 0.15 s.

Every run's breakdown is read from the sweep's own log line
(`sweep.RUN_TIMING`, written after the run's row and its checkpoint clean-up):
the wall time of all the per-run work (subset, fine-tuning, test evaluation,
NTK snapshot, runs.jsonl row, checkpoint removal) = steps + eval + outside.
The load average is printed with each process (the machine may be shared:
quote it with the numbers). One JSON line per process goes to --out.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

import experiments.common  # noqa: F401  (defines --compilation_cache_dir)
from lensllm_jax.training import sweep

_CONFIG = flags.DEFINE_string("config", "configs/finetune_tiny.py:smoke",
                              "The sweep's config (a configs/*.py[:variant] path).")
_DIR = flags.DEFINE_string("dir", "", "Scratch directory for workdirs and the compilation "
                           "cache (default: a fresh temporary directory, removed after).")
_WARM_SIZE = flags.DEFINE_integer("warm_size", 200, "D of the warm-cache run compared with "
                                  "the outside target.")
_OUT = flags.DEFINE_string("out", "", "Append one JSON line per process to this file.")

COLD_WALL_TARGET_S = 8.0
WARM_OUTSIDE_TARGET_S = 0.15
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_sweep(config: str, workdir: pathlib.Path, cache_dir: pathlib.Path) -> dict:
  """One sweep process: wall and CPU seconds, load average, per-run breakdowns {D: {...}}."""
  cmd = [sys.executable, "-m", "experiments.finetune_sweep", f"--config={config}",
         f"--workdir={workdir}", f"--compilation_cache_dir={cache_dir}"]
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), LENSLLM_PROGRESS="off")
  cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  runs = {}
  for line in proc.stderr.splitlines():
    m = re.search(sweep.RUN_TIMING_PATTERN, line)
    if m:
      runs[int(m["d"])] = {k: float(v) for k, v in m.groupdict().items()
                           if k not in ("model", "d")}
  return {"wall_s": wall, "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime
                                                                       + cpu0.ru_stime),
          "load": os.getloadavg(), "runs": runs}


def report(name: str, res: dict) -> None:
  load = ", ".join(f"{x:.2f}" for x in res["load"])
  print(f"{name}: wall {res['wall_s']:.2f} s, CPU {res['cpu_s']:.2f} s (load average {load})")
  for d, r in sorted(res["runs"].items()):
    print(f"  D={d:<5d} {r['total']:.3f} s = steps {r['steps']:.3f} + eval {r['eval']:.3f} "
          f"+ outside {r['outside']:.3f} (NTK snapshot {r['ntk']:.3f}, row + clean-up "
          f"{r['bookkeeping']:.3f})")


def main(argv):
  del argv
  scratch = pathlib.Path(_DIR.value or tempfile.mkdtemp(prefix="bench_sweep_"))
  cache = scratch / "jax_cache"
  for path in (cache, scratch / "cold", scratch / "warm"):
    shutil.rmtree(path, ignore_errors=True)
  try:
    cold = run_sweep(_CONFIG.value, scratch / "cold", cache)
    report("cold (empty compilation cache)", cold)
    warm = run_sweep(_CONFIG.value, scratch / "warm", cache)
    report("warm (persistent compilation cache filled by the cold run)", warm)
  finally:
    if not _DIR.value:
      shutil.rmtree(scratch, ignore_errors=True)
  d = _WARM_SIZE.value
  if d not in warm["runs"]:
    raise SystemExit(f"bench_sweep_overhead: error: the config has no run at D={d}")
  outside = warm["runs"][d]["outside"]
  print(f"cold sweep wall {cold['wall_s']:.2f} s / target {COLD_WALL_TARGET_S:.0f} s = "
        f"{cold['wall_s'] / COLD_WALL_TARGET_S:.2f}")
  print(f"warm D={d} outside {outside:.3f} s / target {WARM_OUTSIDE_TARGET_S} s = "
        f"{outside / WARM_OUTSIDE_TARGET_S:.2f}")
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      for name, res in (("cold", cold), ("warm", warm)):
        f.write(json.dumps({"process": name, "config": _CONFIG.value, **res}) + "\n")


if __name__ == "__main__":
  app.run(main)
