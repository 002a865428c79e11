"""The fitted selection cells do not depend on the CPU's vector instructions (issue 29).

The vanilla law's Huber objective has flat faces of minimisers on the public
curves (docs/laws.md, "Canonical point"): before the canonical stage of
`fitting.fit_curves`, where the optimiser stopped on a face was decided by
rounding, and `XLA_FLAGS=--xla_cpu_max_isa=SSE4_2` moved 8 VanillaFit cells of
results/selection against the native (AVX-512) run of the same machine.
Here the README's binary runs VanillaFit on a slice of each public file (the
models whose fits sat on such faces) twice, natively and limited to SSE4.2,
each in a fresh process with the compilation cache off (tests/conftest.py):
the selection cells (6 decimals, as printed) must be identical, the held-out
RMSE of every fit equal to the 6 significant digits printed, up to one unit of
the last digit, and the fit statuses of fits.csv and the notes under the tables
(notes.csv, which count "degenerate" fits) identical: the status reads the
fitted curve, not the parameters that still move along the valley.
"""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import pytest

from helpers import REPO_ROOT
from lensllm_jax.curves import benchmarks

# Models whose VanillaFit prediction moved by more than 1e-6 between the two ISAs
# before the canonical stage (flan: 7 of 30, gigaword: 4 of 30).
SLICES = {
  "flan": ("MBZUAI/LaMini-GPT-774M", "cerebras/Cerebras-GPT-1.3B", "gpt2-large", "gpt2",
           "google/switch-base-32", "google/mt5-base", "google/t5-v1_1-base"),
  "gigaword": ("MBZUAI/LaMini-GPT-1.5B", "facebook/opt-6.7b", "gpt2-large",
               "microsoft/phi-1_5"),
}
FAILED = ("degenerate", "nonfinite", "no_data")


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _slice_files(directory: pathlib.Path, shared_benchmarks) -> list[str]:
  paths = []
  for name, models in SLICES.items():
    curves = benchmarks.load_curves(shared_benchmarks / f"{name}.csv")
    idx = [curves.models.index(m) for m in models]
    part = benchmarks.CurveSet(f"{name}_slice", "", models, curves.sizes[idx],
                               tuple(curves.families[i] for i in idx), curves.data_sizes,
                               curves.losses[idx])
    path = directory / f"{name}_slice.csv"
    benchmarks.write_curves(part, path)
    paths.append(str(path))
  return paths


@pytest.mark.slow
def test_vanilla_cells_identical_natively_and_under_sse4_2(tmp_path, shared_benchmarks):
  files = _slice_files(tmp_path, shared_benchmarks)
  procs = {}
  for isa, flags in (("native", ""), ("sse4_2", "--xla_cpu_max_isa=SSE4_2")):
    env = dict(os.environ, XLA_FLAGS=flags)  # lensllm_jax appends its own flag on import
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs[isa] = subprocess.Popen(
      [sys.executable, "-m", "experiments.reproduce_selection", "--config=configs/selection.py",
       f"--config.benchmarks={tuple(files)!r}", "--config.methods=('VanillaFit',)",
       "--config.budget.enabled=False", "--config.figures=False", f"--output_dir={tmp_path / isa}"],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for isa, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (isa, err[-3000:])
  native = _rows(tmp_path / "native" / "selection.csv")
  sse = _rows(tmp_path / "sse4_2" / "selection.csv")
  assert len(native) == 2 * 7 * 3  # files x ratios x (PearCorr, RelAcc, Spearman)
  assert native == sse
  # The failure statuses (converged vs max_steps is where the optimiser stopped, which
  # may move, docs/laws.md) and the notes that count them.
  failed = [[(r["dataset"], r["max_data_num"], r["model"], r["status"]) for r in
             _rows(tmp_path / isa / "fits.csv") if r["status"] in FAILED] for isa in procs]
  assert failed[0] == failed[1]
  notes = [_rows(tmp_path / isa / "notes.csv") if (tmp_path / isa / "notes.csv").exists()
           else [] for isa in procs]
  assert notes[0] == notes[1]
  rmse = [_rows(tmp_path / isa / "rmse.csv") for isa in procs]
  assert [r["model"] for r in rmse[0]] == [r["model"] for r in rmse[1]]
  for a, b in zip(*rmse, strict=True):
    x, y = float(a["rmse"]), float(b["rmse"])
    assert abs(x - y) <= 1.01e-5 * abs(x), (a, b)  # the 6th significant digit
