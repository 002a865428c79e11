"""End-to-end test of experiments/reproduce_selection on a synthetic 7-model file."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from configs import selection as selection_config
from experiments import reproduce_selection as rs
from helpers import REPO_ROOT
from helpers.synthetic_curves import FAST, synthetic_curves
from lensllm_jax import errors
from lensllm_jax.curves import benchmarks
from lensllm_jax.selection import budgeted

pytestmark = pytest.mark.slow  # end-to-end runs of the selection binary

RATIOS = [4, 8, 16, 32]  # D* = 409600 (the synthetic grid's largest D)


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory):
  curves, _ = synthetic_curves(noise=0.01, seed=5)
  path = tmp_path_factory.mktemp("bench") / "toy7.csv"
  benchmarks.write_curves(curves, path)
  return path


def _config(synthetic_file, **overrides):
  cfg = selection_config.get_config()
  cfg.update(benchmarks=(str(synthetic_file),), ratios=tuple(RATIOS),
             num_restarts=FAST["num_restarts"], max_steps=FAST["fit_options"].max_steps,
             budget=dict(levels=(1.0, 4.0)))
  cfg.update(overrides)
  return cfg


def test_end_to_end_in_process_and_rerun(synthetic_file, tmp_path):
  out = tmp_path / "out"
  rs.run(_config(synthetic_file), out)
  for f in ("selection.csv", "rmse.csv", "cost.csv", "selection.md", "selection.tex",
            "selection_vs_ratio_toy7.png", "curves_toy7.png", "pareto_toy7.png"):
    assert (out / f).stat().st_size > 0, f
  curves = benchmarks.load_curves(synthetic_file)
  truth = curves.column(409600)

  sel = _rows(out / "selection.csv")
  assert list(sel[0]) == list(rs.SELECTION_HEADER)
  assert len(sel) == 7 * len(RATIOS) * 3
  val = {(r["method"], int(r["ratio"]), r["metric"]): float(r["value"]) for r in sel}
  assert val[("ZeroShot", 8, "PearCorr")] == pytest.approx(
      scipy.stats.pearsonr(curves.losses[:, 0], truth)[0], abs=1e-6)
  l_dmax = curves.column(409600 / 16)
  chosen = truth[np.argmin(l_dmax)]
  assert val[("SubTuning", 16, "RelAcc")] == pytest.approx(
      (truth.max() - chosen) / (truth.max() - truth.min()), abs=1e-6)
  assert val[("ModelSize", 4, "Spearman")] == pytest.approx(
      scipy.stats.spearmanr(np.log(curves.sizes), truth)[0], abs=1e-6)
  # Curves follow the rectified law (1 % noise): fitted methods select well.
  assert val[("RectifiedFit", 4, "PearCorr")] > 0.9

  rmse = _rows(out / "rmse.csv")
  assert list(rmse[0]) == list(rs.RMSE_HEADER)
  laws_seen = {r["law"] for r in rmse}
  assert laws_seen == {"vanilla", "rectified", "lensllm", "ats"}
  assert len(rmse) == 4 * len(RATIOS) * 8  # 7 models + ALL
  pooled = {(r["law"], int(r["max_data_num"])): float(r["rmse"]) for r in rmse
            if r["model"] == "ALL"}
  assert pooled[("rectified", 102400)] < 0.1

  cost = _rows(out / "cost.csv")
  assert list(cost[0]) == list(rs.COST_HEADER)
  ats4 = [r for r in cost if r["method"] == "AtS" and r["setting"] == "ratio=4"][0]
  d = curves.data_sizes
  expect = 6 * curves.sizes.astype(float).sum() * d[(d > 0) & (d <= 102400)].sum()
  assert float(ats4["flops"]) == pytest.approx(expect, rel=1e-5)
  assert float(ats4["relative_flops"]) == pytest.approx(
      expect / budgeted.full_tuning_flops(curves.sizes, 409600), rel=1e-5)
  settings = {(r["method"], r["setting"]) for r in cost}
  assert ("BudgetedLensLLM", "z=1") in settings and ("BudgetedLensLLM", "z=4") in settings
  assert ("FullTuning", "D*=409600") in settings

  md = (out / "selection.md").read_text()
  assert "## PearCorr, toy7" in md and "| LensLLM |" in md
  assert "\\begin{tabular}" in (out / "selection.tex").read_text()

  # Rerun: everything is skipped, the CSVs are unchanged.
  before = {f: (out / f).read_bytes() for f in ("selection.csv", "rmse.csv", "cost.csv")}
  rs.run(_config(synthetic_file, figures=False), out)
  for f, content in before.items():
    assert (out / f).read_bytes() == content, f


def _binary(*args):
  return subprocess.run([sys.executable, "-m", "experiments.reproduce_selection", *args],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_binary_subprocess_and_errors(synthetic_file, tmp_path):
  out = tmp_path / "bin"
  proc = _binary("--config=configs/selection.py", f"--config.benchmarks=('{synthetic_file}',)",
                 "--config.methods=('ZeroShot','ModelSize','AtS')", "--config.ratios=(4,8)",
                 "--config.budget.enabled=False", "--config.figures=False", f"--output_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(_rows(out / "selection.csv")) == 3 * 2 * 3
  with pytest.raises(errors.ConfigError, match="Oracle"):
    rs.run(_config(synthetic_file, methods=("ZeroShot", "Oracle"), ratios=(4,)), out)
  with pytest.raises(errors.CurveFileError, match="nope.csv"):
    rs.run(_config(tmp_path / "nope.csv", methods=("ZeroShot",), ratios=(4,)), out)
  with pytest.raises(errors.ConfigError, match="ratio 4096"):
    rs.run(_config(synthetic_file, methods=("ZeroShot",), ratios=(4096,)), out)

