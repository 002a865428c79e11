"""Tests of `experiments.select` predict / replay and `lensllm_jax.plus.forecast`."""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lensllm_jax import errors, selection
from lensllm_jax.curves import benchmarks
from lensllm_jax.plus import candidates, forecast, pfn

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """Six flan models measured up to D = 3200, with two unmeasured cells."""
  flan = benchmarks.load_curves("flan")
  keep = flan.data_sizes <= 3200
  losses = flan.losses[:6][:, keep].copy()
  losses[1, 3] = np.nan  # model 1 not run at D = 800
  losses[4, -1] = np.nan  # model 4 not run at D = 3200
  curves = dataclasses.replace(flan, name="small", models=flan.models[:6], sizes=flan.sizes[:6],
                               families=flan.families[:6], data_sizes=flan.data_sizes[keep],
                               losses=losses)
  path = tmp_path_factory.mktemp("curves") / "small.csv"
  benchmarks.write_curves(curves, path)
  return benchmarks.load_curves(path)


def _view_meta(curves, target):
  d = curves.data_sizes
  return (selection.VisibleCurves(data_sizes=d, losses=curves.losses, mask=curves.measured,
                                  max_data_num=d.max()),
          selection.metadata_of(curves, target))


def test_off_grid_target_is_the_predictors_own_prediction(small):
  target = 3_000_000.0  # not a column of any file
  fc, _ = forecast.forecast(small, target, predictor="AtS")
  view, meta = _view_meta(small, target)
  np.testing.assert_allclose(fc.predicted, selection.ats(view, meta).predicted, rtol=1e-12)
  assert np.all(fc.lower == fc.predicted) and np.all(fc.sd_log == 0)  # AtS: no uncertainty
  # LensLLM+ = the stored candidate (0.25 AtS + 0.75 CurvePFN), computed here from its parts.
  fc, _ = forecast.forecast(small, target)
  cand = forecast.recommended_candidate()
  assert (cand.base, cand.ats_weight) == ("CurvePFN", 0.25)
  curve = pfn.curve_pfn_selection(view, meta)
  ats = selection.ats(view, meta).predicted
  np.testing.assert_allclose(fc.predicted, ats ** 0.25 * curve.predicted ** 0.75, rtol=1e-9)
  summary = curve.extras["predictive"]
  np.testing.assert_allclose(fc.sd_log, 0.75 * summary.sd_log, rtol=1e-9)
  np.testing.assert_allclose(np.log(fc.lower), 0.25 * np.log(ats) + 0.75 * summary.quantiles_log[0.1],
                             rtol=1e-9)
  assert np.all(fc.lower < fc.predicted) and np.all(fc.predicted < fc.upper)
  assert list(fc.ranking) == list(np.argsort(fc.predicted, kind="stable"))


def test_empty_cells_are_ignored_not_read(small):
  """A model's empty cell weighs exactly as a column nobody has (per-model predictors)."""
  drop = small.data_sizes != 800
  without = dataclasses.replace(small, data_sizes=small.data_sizes[drop],
                                losses=small.losses[:, drop])
  for name in ("AtS", "LensLLM+"):
    a, _ = forecast.forecast(small, 1e6, predictor=name)
    b, _ = forecast.forecast(without, 1e6, predictor=name)
    assert a.predicted[1] == pytest.approx(b.predicted[1], rel=1e-6)
    assert a.predicted[0] != pytest.approx(b.predicted[0], rel=1e-6)  # its 800 point counts


def test_bad_input_is_named(small):
  with pytest.raises(errors.ConfigError, match="below the largest measured size 3200"):
    forecast.forecast(small, 3000)
  thin = small.losses.copy()
  thin[2, 2:] = np.nan
  with pytest.raises(errors.CurveFileError, match=f"model '{small.models[2]}' has 1 "):
    forecast.forecast(dataclasses.replace(small, losses=thin), 1e6)
  with pytest.raises(errors.ConfigError, match="unknown predictor 'Nope'"):
    forecast.forecast(small, 1e6, predictor="Nope")
  one = dataclasses.replace(small, models=small.models[:1], sizes=small.sizes[:1],
                            families=small.families[:1], losses=small.losses[:1])
  with pytest.raises(errors.CurveFileError, match="at least 2"):
    forecast.forecast(one, 1e6)


def test_probability_next_is_better():
  assert forecast.prob_better(0.0, 0.1, 0.0, 0.1) == pytest.approx(0.5)
  # log L_a - log L_b = 0.2, sd of the difference 0.2 -> Phi(1).
  assert forecast.prob_better(0.2, 0.12, 0.0, 0.16) == pytest.approx(0.8413447, rel=1e-6)
  assert forecast.prob_better(0.0, 0.0, 0.1, 0.0) == 0.0


def test_stored_choice_is_the_lensllm_plus_runs_choice():
  rows = list(csv.DictReader(open(ROOT / "results/lensllm_plus/candidates_chosen.csv")))
  stored = json.loads(forecast.CHOICE_FILE.read_text())
  assert stored["candidate"] == forecast.choice_record(rows, source="x", command="y")["candidate"]
  assert {r["candidate"] for r in rows} == {stored["candidate"]}  # every fold chose it
  assert stored["candidate"] in [c.name for c in candidates.all_candidates()]
  split = forecast.choice_record([{**rows[0], "candidate": "AtS"}, rows[1]], source="", command="")
  assert split["candidate"] == "AtS"  # one fold each: the larger training criterion wins


def _run(*args):
  return subprocess.run([sys.executable, "-m", "experiments.select", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_predict_writes_the_pick_first_and_refuses_bad_input(small, tmp_path):
  out = tmp_path / "out"
  r = _run("--config=configs/select.py", f"--config.curves={small.source}",
           "--config.target_data_num=3000000", f"--output_dir={out}")
  assert r.returncode == 0, r.stderr[-2000:]
  rows = list(csv.DictReader(open(out / "selection.csv")))
  best = min(rows, key=lambda row: float(row["predicted"]))
  first = (out / "selection.md").read_text().splitlines()[0]
  assert first.startswith(f"fine-tune {best['model']}: predicted test loss ")
  assert "at D = 3000000; next best " in first
  assert first in r.stderr  # the log's line
  assert json.loads((out / "selection.json").read_text())["models"][0]["model"] == best["model"]
  assert (out / "selection.png").stat().st_size > 0
  thin = tmp_path / "thin.csv"
  text = pathlib.Path(small.source).read_text().splitlines()
  cells = text[3].split(",")
  cells[3:7] = [""] * 4  # only D = 0 and D = 200 left
  thin.write_text("\n".join([*text[:3], ",".join(cells), *text[4:]]) + "\n")
  for args, needle in [
      ((f"--config.curves={small.source}", "--config.target_data_num=1000"), "below the largest"),
      ((f"--config.curves={thin}", "--config.target_data_num=9000"), f"model '{cells[0]}' has 1"),
      ((f"--config.curves={small.source}", "--config.target_data_num=9000",
        "--config.predictor=ZeroShot"), "config.predictor='ZeroShot': unknown")]:
    r = _run("--config=configs/select.py", *args, f"--output_dir={tmp_path / 'bad'}")
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-1500:]
    assert lines[0].startswith("select: error: ")


def test_docs_select_tables_are_the_replay_outputs():
  from experiments import update_readme
  text = (ROOT / "docs/select.md").read_text()
  assert text.count("<!-- generated: ../results/select/") == 2
  assert update_readme.splice(text, ROOT / "docs") == text, (
      "docs/select.md is stale: python -m experiments.update_readme --readme=docs/select.md")
