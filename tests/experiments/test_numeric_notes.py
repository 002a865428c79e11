"""Numerics that say when they fail: degenerate fits, correlations against a constant truth,
fits that were not run; every NaN cell of the selection tables comes with a note."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from configs import selection as selection_config
from experiments import common
from experiments import reproduce_selection as rs
from helpers.synthetic_curves import synthetic_curves
from lensllm_jax import laws, selection
from lensllm_jax.curves import benchmarks
from lensllm_jax.laws import fitting
from lensllm_jax.selection import budgeted, metrics


def _fit(law, d, losses, **kw):
  return fitting.fit_curves(law, d, np.log(losses), key=jax.random.key(0), num_restarts=2,
                            options=fitting.FitOptions(max_steps=200), **kw)


def test_flat_and_rising_curves_are_degenerate_clean_ones_unchanged():
  curves, truth = synthetic_curves(num_models=3, seed=1)
  d = curves.data_sizes
  losses = curves.losses.copy()
  losses[1] = 2.5  # flat
  losses[2] = curves.losses[2][::-1]  # rising with D
  law = laws.rectified_law()
  res = _fit(law, d, losses)
  assert list(res.status) == ["converged", "degenerate", "degenerate"]
  assert not res.converged[1:].any()
  assert "do not decrease" in fitting.degenerate_reason(res, 1)
  # The clean curve's fit is the one of a batch without the damaged curves.
  alone = _fit(law, d, losses[:1])
  np.testing.assert_array_equal(res.raw_params[0], alone.raw_params[0])
  assert fitting.degenerate_reason(res, 0) == ""


def test_degenerate_reads_the_fitted_curve_not_the_parameters():
  """The selection rule alone, on given restarts: an overflowing fitted curve is
  "degenerate"; an amplitude B far beyond AMPLITUDE_LIMIT whose curve is finite (B / D_l
  = e^2, D_l = e^70: a point far out along a valley, docs/laws.md) is a minimiser,
  "converged". Parameters are kept either way."""
  law = laws.rectified_law()
  raw = np.array([[[0.5, 1.0, 0.3, 0.2]], [[352538.0, 1.0, 0.3, 0.2]], [[80.0, 1.0, 0.3, 0.2]],
                  [[2.0, 70.0, 0.3, 0.2]]])
  d = np.broadcast_to(200.0 * 2.0 ** np.arange(5), (4, 5))
  one = np.ones((4, 1))
  res = fitting._select_best(law, raw, 0.1 * one, 1e-12 * one, 10 * one.astype(int),
                             np.zeros((4, 1), int), np.array([5, 5, 5, 5]), np.zeros(4, bool),
                             grid=(d, np.ones((4, 5), bool), None))
  # Curve 1: L = inf; curve 2: L ~ e^80 / D^0.85 > 1e30; curve 3: L = e^2 + e^0.2 everywhere.
  assert res.params["B"][3] == pytest.approx(np.exp(72.0)) and res.params["B"][3] > 1e30
  assert list(res.status) == ["converged", "degenerate", "degenerate", "converged"]
  np.testing.assert_array_equal(res.raw_params, raw[:, 0])
  assert "curve overflowed" in fitting.degenerate_reason(res, 1)
  assert "curve overflowed" in fitting.degenerate_reason(res, 2)
  assert fitting.degenerate_reason(res, 3) == ""


def test_correlation_with_a_truth_constant_to_rounding_is_nan():
  truth = np.full(7, 0.1) * 3  # identical floats; their mean differs from them in the last bit
  assert np.any(truth - truth.mean() != 0)
  feature = np.arange(7.0)
  for fn in (metrics.pearson_corr, metrics.spearman_corr, metrics.kendall_tau):
    assert np.isnan(fn(feature, truth)), fn
    assert np.isnan(fn(feature, truth * (1 + 1e-14 * np.arange(7)))), fn
  assert metrics.relative_accuracy(3, truth) == 1.0
  assert "constant to rounding" in metrics.undefined_reason(feature, truth)
  # A truth that really varies (spread 1e-9 relative) keeps its correlation.
  varied = 0.3 * (1 + 1e-9 * np.arange(7))
  assert metrics.pearson_corr(feature, varied) == pytest.approx(1.0)
  assert metrics.undefined_reason(feature, varied) == ""


def _cfg(path, **kw):
  cfg = selection_config.get_config()
  cfg.update(benchmarks=(str(path),), ratios=(4, 8), budget=dict(enabled=False), figures=False,
             num_restarts=2, max_steps=50)
  cfg.update(kw)
  return cfg


@pytest.mark.slow
def test_every_nan_cell_and_unrun_fit_has_a_note(tmp_path):
  curves, _ = synthetic_curves(seed=5)
  tie = curves.losses.copy()
  tie[:, -1] = 0.1 * 3  # every model ties at D*
  path = tmp_path / "tie.csv"
  benchmarks.write_curves(dataclasses.replace(curves, losses=tie), path)
  methods = ("ZeroShot", "SubTuning", "ModelSize", "RectifiedFit")
  out = rs.run(_cfg(path, methods=methods, max_steps=0), tmp_path / "out")
  rows = common.read_rows(out / "selection.csv")
  nan_cells = {(r["method"], r["ratio"]) for r in rows if r["value"] == "nan"}
  assert {m for m, _ in nan_cells} == set(methods)  # PearCorr / Spearman of every method
  notes = common.read_rows(out / "notes.csv")
  noted = {(r["method"], r["ratio"]) for r in notes if "constant to rounding" in r["note"]}
  assert nan_cells <= noted
  assert {r["method"] for r in notes if "max_steps=0" in r["note"]} == {"RectifiedFit"}
  md = (out / "selection.md").read_text()
  assert "## Notes" in md and "tie RectifiedFit (ratios 4, 8): config.max_steps=0" in md
  assert "Notes" in (out / "headline.md").read_text()
  # A clean file has no notes and no notes.csv.
  clean = tmp_path / "clean.csv"
  benchmarks.write_curves(curves, clean)
  out2 = rs.run(_cfg(clean, methods=methods), tmp_path / "out2")
  assert not (out2 / "notes.csv").exists() and "## Notes" not in (out2 / "selection.md").read_text()


def test_score_notes_say_why_each_score_is_nan():
  """common.score_notes, the one text of every binary's NaN notes: a truth constant to
  rounding, a non-finite prediction (RMSE), nothing for a clean result."""
  from lensllm_jax import selection

  truth = np.array([1.0, 2.0, 3.0])
  clean = selection.SelectionResult("X", truth + 0.1, selection.rank_by(truth), predicted=truth)
  assert common.score_notes(clean, truth, with_rmse=True) == []
  tie = np.full(3, 0.3)
  tie[1] = 0.1 * 3  # 0.30000000000000004: constant to rounding
  notes = common.score_notes(clean, tie)
  assert len(notes) == 1 and "constant to rounding" in notes[0]
  assert np.isnan(metrics.pearson_corr(clean.feature, tie))
  bad = dataclasses.replace(clean, predicted=np.array([1.0, np.inf, 3.0]))
  assert common.score_notes(bad, truth, with_rmse=True) == [
      "RMSE is NaN: the predicted L(D*) is not finite for 1 of 3 models"]
  ranks_only = dataclasses.replace(clean, predicted=None)
  assert common.score_notes(ranks_only, truth, with_rmse=True) == [
      "RMSE is NaN: the method predicts no L(D*) (it only ranks)"]


def test_fit_laws_rows_say_why_a_cell_is_nan():
  from experiments import fit_laws

  row = {"status": "converged", "rmse_fit": 0.1, "rmse_heldout": float("nan"),
         "pred_last": 2.0, "B": 1.0}
  assert fit_laws.nan_note(row, True, False) == (
      "rmse_heldout: no held-out point (config.max_data_size not set or above every D)")
  row.update(status="nonfinite", pred_last=float("nan"), B=float("nan"))
  assert fit_laws.nan_note(row, True, True) == (
      "rmse_heldout, pred_last, B: the fit's status is nonfinite (its parameters or predicted "
      "curve are not finite)")
  assert fit_laws.nan_note({"status": "converged", "rmse_fit": 0.1}, True, True) == ""


@pytest.mark.parametrize("damaged", [True, False])
def test_lensllm_plus_notes_a_degenerate_baseline_fit_naming_its_model(tmp_path, damaged):
  """A tiny curve file whose model m1 is flat: RectifiedFit's fits of m1 end "degenerate"
  (file_predictions' statuses, what lensllm_plus stores in fit_status.csv), and the
  notes.csv rows of lensllm_plus name RectifiedFit's degenerate model at every ratio; the
  clean file has no note."""
  from experiments import lensllm_plus
  from lensllm_jax.curves import benchmarks
  from lensllm_jax.plus import candidates

  curves, _ = synthetic_curves(num_models=4, seed=1)
  if damaged:
    losses = curves.losses.copy()
    losses[1] = 2.5  # flat
    curves = dataclasses.replace(curves, losses=losses)
  benchmarks.write_curves(curves, tmp_path / "tiny.csv")
  curves = benchmarks.load_curves(str(tmp_path / "tiny.csv"))
  ratios = (8, 16)
  ctx = candidates.BaseContext(key=jax.random.key(0), predictor=None, num_restarts=2)
  truth, preds = candidates.file_predictions(curves, ratios, ctx=ctx, only=["RectifiedFit"])
  status = preds["RectifiedFit"].status
  assert status.shape == (len(ratios), 4)
  assert (status[:, 1] == "degenerate").all() == damaged
  assert not np.isin(status[:, [0, 2, 3]], ["degenerate", "nonfinite"]).any()
  notes = lensllm_plus.prediction_notes(
      "RectifiedFit", "RectifiedFit", preds["RectifiedFit"].mean, truth, ratios, "tiny", 60,
      status, curves.models)
  said = [(r["ratio"], r["note"]) for r in notes if "fits" in r["note"]]
  if damaged:
    assert said == [(r, "1 of 4 fits in a degenerate limit (the fitted curve overflowed, or the "
                        "visible curve is flat or rising): m1 (status in fit_status.csv)")
                    for r in ratios]
  else:
    assert notes == []


@pytest.mark.parametrize("damaged", [True, False])
def test_budgeted_rows_note_a_degenerate_fit_naming_its_model(tmp_path, damaged):
  """reproduce_selection's budgeted rows (cost.csv z=..., notes.csv): a tiny file whose model
  m1 is flat has its early-stopping fits of m1 end "degenerate" (the fits the decisions read,
  `BudgetedResult.fit_status` / `fit_status_ever`), and each level's note names m1; the clean
  file has no note."""
  curves, _ = synthetic_curves(num_models=4, seed=1)
  if damaged:
    losses = curves.losses.copy()
    losses[1] = 2.5  # flat
    curves = dataclasses.replace(curves, losses=losses)
  target = float(curves.data_sizes[-1])
  truth = curves.column(target)
  budget = budgeted.BudgetOptions((1.0, 2.0), "RectifiedFit", target / 64)
  got = budgeted.budgeted_selection(curves, budget, key=jax.random.key(0), num_restarts=2,
                                    fit_options=fitting.FitOptions(max_steps=150),
                                    target_data_num=target)
  for r in got:
    assert (r.fit_status[1] == "degenerate") == damaged
    assert r.fit_status_ever.get("degenerate", np.zeros(4, bool)).tolist() == [
        False, damaged, False, False]
    assert not np.isin(np.asarray(r.fit_status)[[0, 2, 3]], ["degenerate", "nonfinite"]).any()
    assert r.history[-1]["fit_status"].tolist() == list(r.fit_status)
  out = tmp_path / "out"
  out.mkdir()
  rs.run_budgeted(curves, out, budget, target=target, key=jax.random.key(0),
                  full=budgeted.full_tuning_flops(curves.sizes, target), truth=truth,
                  num_restarts=2, fit_options=fitting.FitOptions(max_steps=150), t0=0.0)
  assert {r["setting"] for r in common.read_rows(out / "cost.csv")
          if r["method"] == "BudgetedRectifiedFit"} == {"z=1", "z=2"}
  notes = common.read_rows(out / "notes.csv") if (out / "notes.csv").exists() else []
  if not damaged:
    assert notes == []
    return
  said = sorted((r["method"], r["ratio"], r["note"]) for r in notes)
  assert said == sorted(
      ("BudgetedRectifiedFit", z, note) for z in ("z=1", "z=2") for note in (
          "final predictions: 1 of 4 fits in a degenerate limit (the fitted curve overflowed, "
          "or the visible curve is flat or rising): m1",
          "1 of 4 models had a fit in a degenerate limit (the fitted curve overflowed, or the "
          "visible curve is flat or rising) in some round of the early stopping: m1"))


@pytest.mark.parametrize("damaged", [True, False])
def test_select_notes_a_degenerate_fit_of_its_predictor(tmp_path, damaged):
  """experiments.select with a fitted predictor (RectifiedFit): a model whose curve is flat
  gets a degenerate fit, and selection.md says so naming it, as does the early-stopping
  tradeoff note of the replay procedure's predictor (`forecast.log_prediction_fn` passes the
  statuses on); a clean file, or a predictor that fits no law (AtS), has no such note."""
  from experiments import select
  from lensllm_jax.plus import forecast

  curves, _ = synthetic_curves(num_models=4, seed=1)
  keep = curves.data_sizes <= 3200
  losses = curves.losses[:, keep].copy()
  if damaged:
    losses[1] = 2.5  # flat
  curves = dataclasses.replace(curves, data_sizes=curves.data_sizes[keep], losses=losses)
  target = 25600.0
  fc = select.predict_and_write(curves, target, "RectifiedFit", tmp_path / "fit",
                                key=jax.random.key(0))
  assert (fc.fit_status[1] == "degenerate") == damaged
  said = "1 of 4 fits in a degenerate limit" in (tmp_path / "fit" / "selection.md").read_text()
  assert said == damaged
  fc = select.predict_and_write(curves, target, "AtS", tmp_path / "ats", key=jax.random.key(0))
  assert fc.fit_status is None
  assert "degenerate" not in (tmp_path / "ats" / "selection.md").read_text()
  meta = selection.metadata_of(curves, target)
  view = selection.VisibleCurves(data_sizes=curves.data_sizes, losses=curves.losses,
                                 mask=curves.measured, max_data_num=3200.0)
  _, _, status = forecast.log_prediction_fn("RectifiedFit", meta)([view], 0)
  assert status.shape == (1, 4) and (status[0, 1] == "degenerate") == damaged
  assert forecast.log_prediction_fn("AtS", meta)([view], 0)[2] is None
