"""End-to-end tests of experiments/lensllm_plus.py (LensLLM+ = the protocol-chosen candidate).

One run of the binary on small files (10 models, D* = 102400, ratios 8 and
128, a 2-setting grid, the committed CurvePFN) is shared by the tests. The
grid's two settings disagree across the files (the second wins on a and t, the
first on b), so some nested PooledLensLLM settings differ from their fold's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from configs import lensllm_plus as plus_config
from experiments import common, lensllm_plus
from lensllm_jax import errors
from lensllm_jax.curves import benchmarks
from lensllm_jax.plus import candidates, pfn, protocol
from lensllm_jax.selection import pooled

pytestmark = pytest.mark.slow  # end-to-end runs of the LensLLM+ binary

GRID = [pooled.PooledConfig(strength=0.0, pooled=()),
        pooled.PooledConfig(strength=1.0, pooled=("beta", "E"))]
RATIOS = (8, 128)


def _small(curves, rows, name, last=None):
  keep = np.ones(curves.data_sizes.size, bool) if last is None else curves.data_sizes <= last
  return dataclasses.replace(curves, name=name, models=tuple(curves.models[i] for i in rows),
                             sizes=curves.sizes[rows],
                             families=tuple(curves.families[i] for i in rows),
                             data_sizes=curves.data_sizes[keep], losses=curves.losses[rows][:, keep])


@pytest.fixture(scope="module")
def small_run(shared_benchmarks, tmp_path_factory):
  """(config, data dir, output dir) of one binary run on files a, b (reported) and t."""
  flan = benchmarks.load_curves(str(shared_benchmarks / "flan.csv"))
  giga = benchmarks.load_curves(str(shared_benchmarks / "gigaword.csv"))
  rows = np.arange(0, 30, 3)
  tmp = tmp_path_factory.mktemp("plus")
  data = tmp / "data"
  data.mkdir()
  benchmarks.write_curves(_small(flan, rows, "a", last=102400.0), data / "a.csv")
  benchmarks.write_curves(_small(giga, rows, "b", last=102400.0), data / "b.csv")
  benchmarks.write_curves(_small(giga, rows + 1, "t", last=102400.0), data / "t.csv")
  cfg = plus_config.get_config()
  cfg.update(benchmarks=("a", "b"), data_dir=str(data), ratios=RATIOS, num_restarts=2,
             num_steps=20, budget=dict(levels=(1.0,)), train_only_benchmarks=(str(data / "t.csv"),))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(protocol, "default_grid", lambda: GRID)
    out = lensllm_plus.run(cfg, tmp / "out")
  return cfg, data, out


def _criteria(rows, fold, datasets):
  """candidate -> mean over `datasets` of protocol.criterion, from candidates.csv rows."""
  val = {}
  for r in rows:
    if r["fold"] == fold and r["dataset"] in datasets:
      val.setdefault((r["candidate"], r["dataset"], r["metric"]), {})[int(r["ratio"])] = float(
        r["value"])
  out = {}
  for c in candidates.all_candidates():
    per = [protocol.criterion({m: np.array(list(val[(c.name, d, m)].values()))
                               for m in ("PearCorr", "RelAcc")}) for d in datasets]
    out[c.name] = float(np.mean(per))
  return out


def _forbid_fitting(monkeypatch):
  """A rerun of finished work must not fit: every fitting entry point raises."""

  def no_fit(*a, **k):
    raise AssertionError("a rerun of finished work must not fit")

  monkeypatch.setattr(protocol, "default_grid", lambda: GRID)
  monkeypatch.setattr(candidates, "file_predictions", no_fit)
  monkeypatch.setattr(candidates, "budgeted_candidate_selection", no_fit)
  monkeypatch.setattr(protocol, "evaluate_grid", no_fit)


def test_binary_reports_the_candidate_chosen_on_the_other_files(small_run):
  _, _, out = small_run
  chosen = common.read_rows(out / "candidates_chosen.csv")
  assert [c["held_out"] for c in chosen] == ["a", "b"]
  assert [c["trained_on"] for c in chosen] == ["b+t", "a+t"]
  cand_rows = common.read_rows(out / "candidates.csv")
  results = common.read_rows(out / "results.csv")
  assert {r["dataset"] for r in results} == {"a", "b"}  # the training-only file is never reported
  for c in chosen:
    others = c["trained_on"].split("+")
    crit = _criteria(cand_rows, c["held_out"], others)
    names = list(crit)
    best = names[int(np.argmax([crit[n] for n in names]))]
    # The argmax of the criterion recomputed from the CSV (6 decimals; ties to the earlier).
    assert crit[c["candidate"]] >= crit[best] - 1e-5
    assert float(c["train_criterion"]) == pytest.approx(crit[c["candidate"]], abs=1e-5)
    # results.csv's LensLLM+ rows are the chosen candidate's rows on the held-out file.
    ds = c["held_out"]
    plus = {(r["ratio"], r["metric"]): r["value"] for r in results
            if r["dataset"] == ds and r["method"] == "LensLLM+"}
    cand = {(r["ratio"], r["metric"]): r["value"] for r in cand_rows
            if r["fold"] == ds and r["dataset"] == ds and r["candidate"] == c["candidate"]}
    assert plus == cand and len(plus) == len(RATIOS) * len(protocol.METRICS)
  # The PooledLensLLM setting of each fold is one of the grid's, chosen on the same files.
  pooled_rows = common.read_rows(out / "chosen.csv")
  assert [p["trained_on"] for p in pooled_rows] == ["b+t", "a+t"]
  assert {p["config"] for p in pooled_rows} <= {g.name for g in GRID}
  inputs = {r["dataset"]: r for r in common.read_rows(out / "inputs.csv")}
  assert inputs["t"]["role"] == "train_only"


def _grid_criteria(out, dataset):
  """setting name -> protocol.criterion of one file, recomputed from grid.csv."""
  val = {}
  for r in common.read_rows(out / "grid.csv"):
    if r["dataset"] == dataset:
      val.setdefault(r["config"], {}).setdefault(r["metric"], []).append(float(r["value"]))
  return {g: protocol.criterion({m: np.array(v[m]) for m in ("PearCorr", "RelAcc")})
          for g, v in val.items()}


def _file_ratios(out):
  """file name -> its budget ratios (inputs.csv)."""
  return {r["dataset"]: [int(x) for x in r["ratios"].split()]
          for r in common.read_rows(out / "inputs.csv") if r["role"] in ("reported", "train_only")}


def test_pooled_is_scored_on_each_training_file_with_the_nested_setting(small_run):
  """The setting PooledLensLLM is scored with on training file t of a fold is the argmax of the
  grid criterion over the fold's OTHER training files (recomputed from grid.csv), and the
  PooledLensLLM rows of candidates.csv on t are that setting's predictions (predictions.csv)."""
  _, data, out = small_run
  folds = {r["held_out"]: r["trained_on"].split("+") for r in common.read_rows(out / "chosen.csv")}
  fold_setting = {r["held_out"]: r["config"] for r in common.read_rows(out / "chosen.csv")}
  nested = {(r["held_out"], r["scored_on"]): r for r in common.read_rows(out / "chosen_nested.csv")}
  assert set(nested) == {(h, t) for h, train in folds.items() for t in train}
  crit = {ds: _grid_criteria(out, ds) for ds in ("a", "b", "t")}
  ratios = _file_ratios(out)
  cand = common.read_rows(out / "candidates.csv")
  differ = 0
  for (held, t), row in nested.items():
    rest = [d for d in folds[held] if d != t]
    assert row["trained_on"] == "+".join(rest)
    means = [np.mean([crit[d][g.name] for d in rest]) for g in GRID]
    best = GRID[int(np.argmax(means))]  # ties to the earlier setting
    assert row["config"] == best.name
    assert float(row["train_criterion"]) == pytest.approx(max(means), abs=2e-6)
    differ += best.name != fold_setting[held]
    # candidates.csv's PooledLensLLM rows on t: the nested setting's predictions, scored here.
    curves = benchmarks.load_curves(str(data / f"{t}.csv"))
    truth = curves.column(float(curves.data_sizes.max()))
    rs = ratios[t]
    preds = lensllm_plus.read_predictions(out, t, rs)
    want = candidates.score_table(preds[candidates.pooled_key(best)].mean, truth)
    got = {(int(r["ratio"]), r["metric"]): float(r["value"]) for r in cand
           if r["fold"] == held and r["dataset"] == t and r["candidate"] == "PooledLensLLM"}
    assert set(got) == {(r, m) for r in rs for m in protocol.METRICS}
    for k, r in enumerate(rs):
      for m in ("PearCorr", "RelAcc"):
        assert got[(r, m)] == pytest.approx(want[m][k], abs=2e-6)
  # Some nested setting differs from its fold's (in-sample) one, so the checks above
  # fail under the in-sample rule.
  assert differ >= 1
  md = (out / "lensllm_plus.md").read_text()
  for (held, t), row in nested.items():
    assert f"| {held} | {t} | {row['trained_on']} | `{row['config']}` |" in md


def test_stability_table_is_the_choice_recounted_without_each_training_file(small_run):
  """candidates_stability.csv and its table: each fold's choice with runner-up and margin,
  recounted from candidates.csv; without training file t, the choice on the one file s
  left, recounted from predictions.csv with PooledLensLLM at the grid's first setting (nothing
  left to nest it on)."""
  _, data, out = small_run
  rows = common.read_rows(out / "candidates_stability.csv")
  chosen = {c["held_out"]: c for c in common.read_rows(out / "candidates_chosen.csv")}
  cand_rows = common.read_rows(out / "candidates.csv")
  ratios = _file_ratios(out)
  names = [c.name for c in candidates.all_candidates()]

  def ranked(crit):
    order = sorted(range(len(names)), key=lambda k: (-crit[names[k]], k))
    return names[order[0]], names[order[1]]

  def crit_alone(s):
    curves = benchmarks.load_curves(str(data / f"{s}.csv"))
    truth = curves.column(float(curves.data_sizes.max()))
    base = lensllm_plus.read_predictions(out, s, ratios[s])
    return {c.name: protocol.criterion(candidates.score_table(
      candidates.candidate_prediction(c, base, GRID[0]), truth))
      for c in candidates.all_candidates()}

  assert {(r["held_out"], r["left_out"]) for r in rows} == {
    (h, t) for h, c in chosen.items() for t in ["", *c["trained_on"].split("+")]}
  for r in rows:
    if not r["left_out"]:
      crit = _criteria(cand_rows, r["held_out"], r["trained_on"].split("+"))
      assert r["candidate"] == chosen[r["held_out"]]["candidate"]
    else:
      (s,) = r["trained_on"].split("+")
      assert s not in (r["held_out"], r["left_out"])
      crit = crit_alone(s)
    best, second = ranked(crit)
    assert (r["candidate"], r["runner_up"]) == (best, second)
    assert float(r["train_criterion"]) == pytest.approx(crit[best], abs=2e-6)
    assert float(r["margin"]) == pytest.approx(crit[best] - crit[second], abs=4e-6)
  md = (out / "lensllm_plus.md").read_text()
  for r in rows:
    where = f"without {r['left_out']}: " if r["left_out"] else "all: "
    assert (f"| {r['held_out']} | {where}{r['trained_on']} | `{r['candidate']}` | "
            f"{float(r['train_criterion']):.4f} | `{r['runner_up']}` |") in md
  for held in chosen:
    moved = sum(r["candidate"] != chosen[held]["candidate"] for r in rows
                if r["held_out"] == held and r["left_out"])
    assert f"- {held}: the choice changes in {moved} of 2 runs" in md


def test_tables_agree_with_the_csvs(small_run):
  _, _, out = small_run
  md = (out / "lensllm_plus.md").read_text()
  results = common.read_rows(out / "results.csv")
  chosen = {c["held_out"]: c["candidate"] for c in common.read_rows(out / "candidates_chosen.csv")}
  for ds, pick in chosen.items():
    def mean(metric, ds=ds):
      return np.mean([float(r["value"]) for r in results if r["dataset"] == ds
                      and r["method"] == "LensLLM+" and r["metric"] == metric])
    row = (f"| {ds} | **LensLLM+** (= {pick}) | {100 * mean('PearCorr'):.1f} | "
           f"{100 * mean('RelAcc'):.1f} | {mean('RMSE'):.4f} |")
    assert row in md
  budget = common.read_rows(out / "budgeted.csv")
  assert {(r["dataset"], r["candidate"]) for r in budget} == set(chosen.items())
  for r in budget:
    assert f"| {r['dataset']} | BudgetedLensLLM+ (= {r['candidate']}) | {r['setting']} | " \
           f"{float(r['relative_to_ats8']):.4f} |" in md
  assert "Target check" in md and "AtS@8 RelAcc" in md
  # candidates.md: the chosen candidate's mean criterion on the training files is the
  # criterion the choice maximised (candidates_chosen.csv).
  cmd = (out / "candidates.md").read_text()
  for c in common.read_rows(out / "candidates_chosen.csv"):
    fold = cmd.split(f"## Fold {c['held_out']} ")[1].split("\n\n")[1]
    row = [r for r in fold.splitlines() if r.startswith(f"| **{c['candidate']}** |")]
    assert len(row) == 1 and row[0].endswith(f" | {float(c['train_criterion']):.4f} |")


def test_rerun_skips_finished_work_and_refuses_changed_inputs(small_run, monkeypatch):
  cfg, data, out = small_run
  before = {p: (out / p).read_text() for p in ("predictions.csv", "grid.csv", "budgeted.csv",
                                               "results.csv", "lensllm_plus.md")}
  _forbid_fitting(monkeypatch)
  lensllm_plus.run(cfg, out)
  assert {p: (out / p).read_text() for p in before} == before
  # A changed fit setting or training file refuses to reuse the cached rows.
  cfg2 = plus_config.get_config()
  cfg2.update(dict(cfg))
  cfg2.seed = 1
  with pytest.raises(errors.WorkdirError, match="other inputs"):
    lensllm_plus.run(cfg2, out)
  t = benchmarks.load_curves(str(data / "t.csv"))
  benchmarks.write_curves(_small(t, np.arange(9), "t"), data / "t.csv")
  try:
    with pytest.raises(errors.WorkdirError, match="other inputs"):
      lensllm_plus.run(cfg, out)
  finally:
    benchmarks.write_curves(t, data / "t.csv")


def test_held_out_losses_never_change_its_choice(small_run, tmp_path, monkeypatch):
  """Reversing which model has which curve in file a (its truth and its visible points)
  leaves a's PooledLensLLM setting, chosen candidate and training criterion unchanged."""
  cfg, data, out = small_run
  a = benchmarks.load_curves(str(data / "a.csv"))
  data2 = tmp_path / "data"
  data2.mkdir()
  for name in ("b", "t"):
    (data2 / f"{name}.csv").write_bytes((data / f"{name}.csv").read_bytes())
  benchmarks.write_curves(dataclasses.replace(a, losses=a.losses[::-1].copy()), data2 / "a.csv")
  cfg2 = plus_config.get_config()
  cfg2.update(dict(cfg))
  cfg2.update(data_dir=str(data2), train_only_benchmarks=(str(data2 / "t.csv"),),
              budget=dict(enabled=False))
  monkeypatch.setattr(protocol, "default_grid", lambda: GRID)
  out2 = lensllm_plus.run(cfg2, tmp_path / "out")
  for name in ("candidates_chosen.csv", "chosen.csv"):
    before, after = (common.read_rows(o / name)[0] for o in (out, out2))
    assert before["held_out"] == "a" and before == after
  # Nor its fold's nested settings and the candidates' scores on its training files.
  for name in ("chosen_nested.csv", "candidates.csv"):
    before, after = ([r for r in common.read_rows(o / name)
                      if r.get("held_out", r.get("fold")) == "a" and r.get("dataset") != "a"]
                     for o in (out, out2))
    assert before and before == after
  scores = [{(r["ratio"], r["metric"]): r["value"] for r in common.read_rows(o / "results.csv")
             if r["dataset"] == "a" and r["method"] == "LensLLM+"} for o in (out, out2)]
  assert scores[0] != scores[1]  # the perturbation did reach a's own scores


def test_binary_needs_two_reported_files(shared_benchmarks, tmp_path):
  with pytest.raises(errors.ConfigError, match="at least 2"):
    cfg = plus_config.get_config("public")
    cfg.update(benchmarks=("flan",), data_dir=str(shared_benchmarks), ratios=(16,))
    lensllm_plus.run(cfg, tmp_path)


def test_reproduce_selection_reports_the_same_predictor(small_run, tmp_path, monkeypatch):
  """reproduce_selection with LensLLM+ in config.methods: LensLLM+ on a is the candidate with the
  best criterion on b alone (recomputed here from b's predictions), and its scores are
  that candidate's."""
  import jax

  from experiments import reproduce_selection

  _, data, _ = small_run
  monkeypatch.setattr(protocol, "default_grid", lambda: GRID)
  sets = [benchmarks.load_curves(str(data / f"{n}.csv")) for n in ("a", "b")]
  key = jax.random.key(3)
  got = reproduce_selection.choose_plus(sets, ["AtS", "LensLLM+"], tmp_path,
                                        ratios=list(RATIOS), key=key, target_data_num=None,
                                        num_restarts=2)
  chosen = {r["held_out"]: r for r in common.read_rows(tmp_path / "lensllm_plus_chosen.csv")}
  assert chosen["a"]["trained_on"] == "b"
  # One training file: nothing to choose its PooledLensLLM setting on, the grid's first.
  assert chosen["a"]["pooled_nested"] == f"b: {GRID[0].name}"
  pooled_cfg = GRID[0]
  ctx = candidates.BaseContext(key=jax.random.fold_in(key, 1),
                                    predictor=pfn.default_curve_predictor(),
                                    num_restarts=2)
  truth, preds = candidates.file_predictions(sets[1], RATIOS, ctx=ctx,
                                                  pooled_configs=[pooled_cfg])
  crit = {c.name: protocol.criterion(candidates.score_table(
    candidates.candidate_prediction(c, preds, pooled_cfg), truth))
    for c in candidates.all_candidates()}
  assert crit[chosen["a"]["candidate"]] == pytest.approx(max(crit.values()), abs=1e-9)
  assert float(chosen["a"]["train_criterion"]) == pytest.approx(max(crit.values()), abs=1e-6)
  assert [r.method for r in got["a"]] == ["LensLLM+"] * len(RATIOS)


def test_every_nan_cell_has_a_note_naming_its_cause(small_run, tmp_path, monkeypatch):
  """One model's RectifiedFit prediction made infinite at ratio 8 on file a (in a copy of the
  run's predictions.csv): the rerun from the cached predictions has NaN cells, each with a
  note of its cause in notes.csv (per dataset, method and ratio) listed under the tables;
  so has a fit marked degenerate in fit_status.csv. The clean run has none."""
  import shutil

  cfg, data, out = small_run
  assert not (out / "notes.csv").exists()
  assert "## Notes" not in (out / "lensllm_plus.md").read_text()
  copy = tmp_path / "out"
  shutil.copytree(out, copy)
  rows = common.read_rows(copy / "predictions.csv")
  hit = [r for r in rows if (r["dataset"], r["key"], r["ratio"]) == ("a", "RectifiedFit", "8")]
  assert len(hit) == 1
  hit[0]["values"] = " ".join(["inf", *hit[0]["values"].split()[1:]])
  (copy / "predictions.csv").unlink()
  common.append_rows(copy / "predictions.csv", lensllm_plus.PRED_HEADER, rows)
  # Every job's fit statuses per file and ratio; LensLLM's fit of one model on file b marked
  # degenerate in the copy: the rerun notes it, naming the model.
  status = common.read_rows(copy / "fit_status.csv")
  jobs = {(r["dataset"], r["job"], r["ratio"]) for r in rows}
  assert {(r["dataset"], r["job"], r["ratio"]) for r in status} == jobs
  fits = {r["job"]: r["statuses"].split() for r in status if r["dataset"] == "b"}
  assert fits["AtS"] == [] and len(fits["LensLLM"]) == 10
  assert set(fits["LensLLM"]) <= {"converged", "max_steps"}
  hit = [r for r in status if (r["dataset"], r["job"], r["ratio"]) == ("b", "LensLLM", "128")]
  hit[0]["statuses"] = " ".join(["degenerate", *hit[0]["statuses"].split()[1:]])
  (copy / "fit_status.csv").unlink()
  common.append_rows(copy / "fit_status.csv", lensllm_plus.STATUS_HEADER, status)
  _forbid_fitting(monkeypatch)
  lensllm_plus.run(cfg, copy)
  nan = {(r["dataset"], r["method"], r["ratio"], r["metric"])
         for r in common.read_rows(copy / "results.csv") if r["value"] == "nan"}
  nan |= {(r["dataset"], r["candidate"], r["ratio"], r["metric"])
          for r in common.read_rows(copy / "candidates.csv") if r["value"] == "nan"}
  assert {c[3] for c in nan if c[:3] == ("a", "RectifiedFit", "8")} == {
      "PearCorr", "Spearman", "RMSE"}
  notes = common.read_rows(copy / "notes.csv")
  why = {}
  for r in notes:
    why.setdefault((r["dataset"], r["method"], r["ratio"]), []).append(r["note"])
  for ds, method, ratio, metric in nan:
    said = " ".join(why.get((ds, method, ratio), []))
    assert (f"{metric} is NaN" if metric == "RMSE" else "PearCorr and Spearman are NaN") in said
  assert why[("a", "RectifiedFit", "8")] == [
      "PearCorr and Spearman are NaN: the method's feature is not finite for every model",
      "RMSE is NaN: the predicted L(D*) is not finite for 1 of 10 models"]
  md = (copy / "lensllm_plus.md").read_text()
  assert ("- a RectifiedFit (ratios 8): RMSE is NaN: the predicted L(D*) is not finite for 1 "
          "of 10 models") in md.split("## Notes")[1]
  assert "## Notes" in (copy / "candidates.md").read_text()
  model = benchmarks.load_curves(str(data / "b.csv")).models[0]
  assert why[("b", "LensLLM", "128")] == [
      "1 of 10 fits in a degenerate limit (the fitted curve overflowed, or the visible curve is "
      f"flat or rising): {model} (status in fit_status.csv)"]
