"""End-to-end test of the LensLLM study binary on the tiny preset (experiments.lensllm_study).

One run of `python -m experiments.lensllm_study --config=configs/study.py:tiny` into a temporary
directory (module-scoped fixture), then checks of its outputs against the
curve files it wrote and closed forms (cost ratios), not against itself.
"""

from __future__ import annotations

import csv
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO_ROOT
from lensllm_jax.curves import benchmarks

pytestmark = pytest.mark.slow  # end-to-end runs of the study binaries

METHODS = ("ZeroShot", "SubTuning", "ModelSize", "AtS", "VanillaFit", "RectifiedFit", "LensLLM",
           "LensLLM-NTK", "NLPMetrics")
TASKS = ("code2name", "translate")
RATIOS = (2, 4)


@pytest.fixture(scope="module")
def study(tmp_path_factory, compilation_cache_dir) -> pathlib.Path:
  work = tmp_path_factory.mktemp("study_tiny")
  out = work / "results"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.lensllm_study", "--config=configs/study.py:tiny", f"--workdir={work}",
       f"--output_dir={out}", f"--compilation_cache_dir={compilation_cache_dir}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
  if proc.returncode != 0:
    raise AssertionError(f"lensllm_study failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return out


def _rows(path: pathlib.Path) -> list[dict]:
  with path.open(newline="") as f:
    return list(csv.DictReader(f))


def test_outputs_exist(study):
  names = ["zoo.csv", "runs.csv", "pac_bayes_layers.csv", "ntk_spectra.csv", "selection.csv",
           "rmse.csv", "cost.csv", "phases.csv", "budgeted.csv", "summary.md"]
  for task in TASKS:
    names += [f"curves_{task}.csv", f"curves_{task}.png", f"phases_{task}.png",
              f"selection_{task}.png"]
  for name in names:
    path = study / name
    assert path.is_file() and path.stat().st_size > 0, name
  for png in study.glob("*.png"):
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_are_public_format_and_finite(study):
  runs = _rows(study / "runs.csv")
  for task in TASKS:
    curves = benchmarks.load_curves(str(study / f"curves_{task}.csv"))
    assert curves.models == ("gpt2-a", "gpt2-b", "llama-a", "llama-b")
    assert curves.data_sizes.tolist() == [0, 25, 50, 100, 200, 400, 800]
    assert np.all(np.isfinite(curves.losses)) and np.all(curves.losses > 0)
    assert set(curves.families) == {"GPT-2", "Llama"}
    # Same numbers as the per-run records.
    for r in runs:
      if r["task"] == task:
        i = curves.index(r["model"])
        j = int(np.flatnonzero(curves.data_sizes == float(r["data_size"]))[0])
        assert math.isclose(curves.losses[i, j], float(r["test_loss"]), rel_tol=1e-5)
    # Fine-tuning on the largest subset beats the zero-shot model.
    assert np.all(curves.losses[:, -1] < curves.losses[:, 0])


def test_selection_table_has_every_method_and_finite_values(study):
  rows = _rows(study / "selection.csv")
  got = {(r["task"], int(r["ratio"]), r["method"], r["metric"]) for r in rows}
  for task in TASKS:
    for ratio in RATIOS:
      for method in METHODS:
        for metric in ("PearCorr", "RelAcc", "Spearman"):
          assert (task, ratio, method, metric) in got
  for r in rows:
    if r["metric"] in ("PearCorr", "RelAcc"):
      v = float(r["value"])
      assert math.isfinite(v), r
      assert -1 - 1e-9 <= v <= 1 + 1e-9
      if r["metric"] == "RelAcc":
        assert v >= 0
  # A NaN cell (Spearman may be one) has its cause in notes.csv, listed under summary.md.
  nan = {(r["task"], r["ratio"], r["method"]) for r in rows if r["value"] == "nan"}
  notes = _rows(study / "notes.csv") if (study / "notes.csv").exists() else []
  assert nan <= {(r["dataset"], r["ratio"], r["method"]) for r in notes}
  assert ("## Notes" in (study / "summary.md").read_text()) == bool(notes)


def test_zero_shot_relacc_matches_the_curve_file(study):
  """RelAcc of ZeroShot recomputed from the public curve file alone."""
  rows = _rows(study / "selection.csv")
  for task in TASKS:
    curves = benchmarks.load_curves(str(study / f"curves_{task}.csv"))
    final = curves.losses[:, -1]
    chosen = int(np.argmin(curves.losses[:, 0]))
    expected = (final.max() - final[chosen]) / (final.max() - final.min())
    for ratio in RATIOS:
      got = next(float(r["value"]) for r in rows if r["task"] == task and
                 int(r["ratio"]) == ratio and r["method"] == "ZeroShot" and
                 r["metric"] == "RelAcc")
      assert math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-6)


def test_costs_follow_the_6ND_rule(study):
  """SubTuning reads D_max only: cost / FullTuning = D_max / D* = 1 / ratio; fitted
  methods read every D <= D_max: sum_{D <= D_max} D / D*."""
  rows = _rows(study / "cost.csv")
  grid = np.array([25, 50, 100, 200, 400, 800], float)
  for r in rows:
    ratio, method = int(r["ratio"]), r["method"]
    rel = float(r["relative_to_full"])
    dmax = 800 / ratio
    if method == "SubTuning":
      assert math.isclose(rel, 1 / ratio, rel_tol=1e-5)
    elif method in ("ZeroShot", "ModelSize", "NLPMetrics"):
      assert rel == 0
    else:
      assert math.isclose(rel, grid[grid <= dmax].sum() / 800, rel_tol=1e-5)


def test_rmse_kernels_and_hessians_are_finite(study):
  rmse = _rows(study / "rmse.csv")
  laws = {r["law"] for r in rmse}
  assert laws == {"vanilla", "rectified", "lensllm-scalar-F", "lensllm-ntk-F", "ats"}
  for r in rmse:
    if r["model"] == "ALL" and r["law"] != "vanilla":
      assert math.isfinite(float(r["rmse"])) and float(r["rmse"]) >= 0, r
  runs = _rows(study / "runs.csv")
  for r in runs:
    kd = float(r["kernel_distance"])
    assert math.isfinite(kd) and -1e-6 <= kd <= 2
    if r["task"] == "code2name" and r["model"] == "gpt2-a" and int(r["data_size"]) > 0:
      assert math.isfinite(float(r["hessian_top"]))
      assert float(r["pac_sum_sqrt"]) >= 0
  pac = _rows(study / "pac_bayes_layers.csv")
  assert len(pac) == 6  # one block (h_0) x 6 subset sizes
  for r in pac:
    # Positive-part quadratic forms are >= 0 and bound the plain form from above.
    assert float(r["vhpv_max"]) >= -1e-6
    assert float(r["vhpv_max"]) >= float(r["vhv_max"]) - 1e-4 * abs(float(r["vhv_max"])) - 1e-6
  spectra = _rows(study / "ntk_spectra.csv")
  for r in spectra:
    # F(t) is non-increasing in t.
    f = [float(r[k]) for k in ("F_t0", "F_t1", "F_t10", "F_t100")]
    assert all(math.isfinite(x) for x in f)
    assert all(a >= b - 1e-9 for a, b in zip(f[:-1], f[1:], strict=True))
  summary = (study / "summary.md").read_text()
  for method in METHODS:
    assert method in summary


def test_eigenpairs_rebuild_the_spectra_and_kernels_only_reproduces_them(study,
                                                                         compilation_cache_dir):
  """ntk_eigenpairs.csv gives back ntk_spectra.csv's F(Theta, t) by the closed form
  F(t) = sum_k exp(-2 eta lambda_k t) p_k^2, and --kernels_only (no fine-tuning) rewrites
  the same eigenpairs from the cached zoo and kernels (checked against ntk_spectra.csv)."""
  eig = _rows(study / "ntk_eigenpairs.csv")
  for r in _rows(study / "ntk_spectra.csv"):
    mine = sorted((e for e in eig if (e["task"], e["model"]) == (r["task"], r["model"])),
                  key=lambda e: int(e["k"]))
    lam, p = (np.array([float(e[k]) for e in mine]) for k in ("eigval", "proj"))
    eta = float(mine[0]["eta"])
    assert len(mine) == int(r["n"]) and math.isclose(lam.max(), float(r["lambda_max"]),
                                                      rel_tol=1e-5)
    for t in (0, 1, 10, 100):
      f = float(np.sum(np.exp(-2 * eta * lam * t) * p ** 2))
      assert math.isclose(f, float(r[f"F_t{t}"]), rel_tol=1e-5, abs_tol=1e-12)
  again = study.parent / "kernels_only"
  again.mkdir()
  (again / "ntk_spectra.csv").write_bytes((study / "ntk_spectra.csv").read_bytes())
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.lensllm_study", "--config=configs/study.py:tiny",
       f"--workdir={study.parent}", f"--output_dir={again}", "--kernels_only",
       f"--compilation_cache_dir={compilation_cache_dir}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (again / "ntk_eigenpairs.csv").read_text() == (study / "ntk_eigenpairs.csv").read_text()


def test_ntk_dynamics_constant_f_rows_are_the_studys(study):
  """experiments.ntk_dynamics refits LensLLM-NTK from the eigenpairs file with
  the study's options: the same scores as the study's selection.csv; the dynamic-F rows
  exist and are finite."""
  from configs import study as study_config
  from experiments import ntk_dynamics

  # Two of the binary's four laws (compile time): the constant- and the dynamic-F NTK law.
  path = ntk_dynamics.run(study_config.get_config("tiny"), study,
                          methods=("LensLLM-NTK", "LensLLM-NTK-dynamic"))
  got = {(r["task"], int(r["ratio"]), r["method"], r["metric"]): float(r["value"])
         for r in _rows(path)}
  ref = {(r["task"], int(r["ratio"]), r["method"], r["metric"]): r["value"]
         for r in _rows(study / "selection.csv")}
  for task in TASKS:
    for ratio in RATIOS:
      for method in ("LensLLM-NTK",):
        for metric in ("PearCorr", "RelAcc"):
          assert got[(task, ratio, method, metric)] == pytest.approx(
            float(ref[(task, ratio, method, metric)]), abs=1e-6)
      for metric in ("RelAcc", "RMSE"):
        assert math.isfinite(got[(task, ratio, "LensLLM-NTK-dynamic", metric)])
  assert "LensLLM-NTK-dynamic" in (study / "ntk_dynamics.md").read_text()
