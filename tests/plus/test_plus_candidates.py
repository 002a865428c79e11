"""Tests of the protocol-chosen LensLLM+ candidates (lensllm_jax/plus/candidates.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lensllm_jax.curves import benchmarks
from lensllm_jax.plus import candidates
from lensllm_jax.selection import budgeted

GRID = np.array([0.0] + [200.0 * 2 ** k for k in range(8)])


def test_blend_is_a_weighted_geometric_mean():
  a, b = np.array([2.0, 3.0, 4.0]), np.array([1.0, np.nan, 16.0])
  got = candidates.blend(a, b, 0.25)
  np.testing.assert_allclose(got, [2.0 ** 0.25, 3.0, 4.0 ** 0.25 * 16.0 ** 0.75])
  np.testing.assert_allclose(candidates.blend(a, b, 1.0), a)
  names = [c.name for c in candidates.all_candidates()]
  assert names[0] == "PooledLensLLM" and names[-1] == "AtS" and len(set(names)) == len(names)
  assert "0.5AtS+CurvePFN" in names and "0.75AtS+Spectral" in names


def test_choice_reads_only_the_training_tables():
  cands = candidates.all_candidates()

  def table(good):
    return {c.name: {"PearCorr": np.array([0.9 if c.name == good else 0.1]),
                     "RelAcc": np.array([1.0 if c.name == good else 0.5])} for c in cands}

  # Training files favour CurvePFN; the held-out file (never passed) would favour AtS.
  best, val = candidates.choose_candidate([table("CurvePFN"), table("CurvePFN")], cands)
  assert best.name == "CurvePFN" and val == pytest.approx(1.9)
  best, _ = candidates.choose_candidate([table("CurvePFN"), table("Spectral"),
                                              table("Spectral")], cands)
  assert best.name == "Spectral"


def _known_base(sd, degenerate_from=None):
  """A base predicting L(D*) = last visible loss / 2 with a fixed sd of log L(D*); with
  `degenerate_from`, it reports fit statuses: model 0's fit "degenerate" once a view holds
  that many D > 0 points, every other fit "converged"."""

  def base(views, meta, ctx):
    del meta, ctx
    pred = []
    for v in views:
      last = v.mask.shape[1] - 1 - np.argmax(v.mask[:, ::-1], axis=1)
      pred.append(v.losses[np.arange(v.mask.shape[0]), last] / 2)
    shape = (len(views), views[0].mask.shape[0])
    status = None
    if degenerate_from is not None:
      status = np.full(shape, "converged", dtype=object)
      status[:, 0] = np.where([v.mask[0, v.data_sizes > 0].sum() >= degenerate_from
                               for v in views], "degenerate", "converged")
    return candidates.BasePrediction(np.stack(pred), np.full(shape, sd), status=status)

  return base


def _toy_curves():
  # Three models with flat, well separated losses; sizes 1, 2, 4.
  losses = np.array([[3.0] * GRID.size, [2.0] * GRID.size, [1.0] * GRID.size])
  return benchmarks.CurveSet(name="toy", source="toy", models=("a", "b", "c"),
                             sizes=np.array([1, 2, 4]), families=("f",) * 3,
                             data_sizes=GRID, losses=losses)


def test_budgeted_selection_uses_the_candidates_own_sd(monkeypatch):
  curves = _toy_curves()
  ctx = candidates.BaseContext(key=jax.random.key(0), predictor=None)

  def run(cand, sd):
    monkeypatch.setitem(candidates.BASE_PREDICTORS, "Known", _known_base(sd))
    return candidates.budgeted_candidate_selection(
      curves, [1.0], cand, ctx=ctx, max_data_num=GRID[-1], min_points=2)[0]

  # A new base is one registry entry; its AtS blends follow.
  monkeypatch.setitem(candidates.BASE_PREDICTORS, "Known", _known_base(1.0))
  assert "0.25AtS+Known" in [c.name for c in candidates.all_candidates()]
  tight, wide = run(candidates.Candidate("Known"), 0.01), run(
    candidates.Candidate("Known"), 10.0)
  # Tight sd: after 2 fine-tuning points (200, 400) only the best model goes on; it is
  # the last one left, so the procedure ends there: 6 N D summed over the pairs paid.
  np.testing.assert_array_equal(tight.stopped_at, [400.0, 400.0, 400.0])
  assert tight.flops == pytest.approx(6 * (1 + 2 + 4) * (200 + 400))
  assert tight.selection.chosen == 2
  # Huge sd: nobody is ever stopped, every model pays the whole grid.
  np.testing.assert_array_equal(wide.stopped_at, [GRID[-1]] * 3)
  assert wide.flops == pytest.approx(6 * 7 * GRID.sum())
  # A blend with AtS: log L = w log L_AtS + (1 - w) log L_X, sd = (1 - w) sd_X.
  h = run(candidates.Candidate("Known", 0.25), 10.0).history[0]
  np.testing.assert_allclose(h["sd"], 0.75 * 10.0)
  # Flat curves: AtS's line predicts the flat loss l, X predicts l / 2.
  np.testing.assert_allclose(np.exp(h["log_pred"]), np.array([3.0, 2.0, 1.0]) * 0.5 ** 0.75,
                             rtol=1e-9)
  # AtS alone has no predictive sd: 0, so it stops all but the best at min_points.
  ats = run(candidates.Candidate("AtS", 1.0), 10.0)
  np.testing.assert_array_equal(ats.history[0]["sd"], 0.0)
  np.testing.assert_array_equal(ats.stopped_at, [400.0, 400.0, 400.0])
  # The fit statuses of a fitting base reach the result through the blend: those of the
  # rounds' decisions (model a's fit degenerate from its 3rd point on) and of the final fits.
  monkeypatch.setitem(candidates.BASE_PREDICTORS, "Known", _known_base(10.0, 3))
  fits = candidates.budgeted_candidate_selection(
    curves, [1.0], candidates.Candidate("Known", 0.25), ctx=ctx, max_data_num=GRID[-1],
    min_points=2)[0]
  assert fits.fit_status == ("degenerate", "converged", "converged")
  assert list(fits.fit_status_ever) == ["degenerate"]
  np.testing.assert_array_equal(fits.fit_status_ever["degenerate"], [True, False, False])
  assert [h["fit_status"][0] for h in fits.history] == ["converged", "converged"] + [
      "degenerate"] * (len(fits.history) - 2)
  assert wide.fit_status == ("", "", "") and wide.fit_status_ever == {}
  with pytest.raises(ValueError, match="exactly one"):
    budgeted.early_stopping_selection(curves, [1.0], name="x", max_data_num=GRID[-1],
                                      target_data_num=GRID[-1])


def test_blend_sd_is_inf_where_the_base_has_no_prediction():
  got = candidates.blend_sd([1.0, np.nan, -1.0], [0.4, 0.4, 0.4], 0.5)
  np.testing.assert_allclose(got, [0.2, np.inf, np.inf])


def test_pooled_is_scored_with_the_nested_setting_on_each_training_file(monkeypatch):
  """Three files x, y, z; grid settings g0, g1. g1 wins the fold holding out z only
  because of file x, where its PooledLensLLM prediction is perfect. In-sample (the old rule:
  g1 on x and y) PooledLensLLM would win the choice; nested (on x the setting chosen on y
  alone, g0, whose prediction is reversed) AtS wins."""
  from lensllm_jax.plus import protocol
  from lensllm_jax.selection import pooled

  g0, g1 = pooled.PooledConfig(strength=0.0, pooled=()), pooled.PooledConfig(strength=1.0)
  crit = {"x": (0.0, 2.0), "y": (1.0, 0.5), "z": (1.0, 1.0)}  # grid criterion of g0, g1

  def evaluate(curves, configs, *, key, options):
    del key
    n = len(options.ratios)
    return {c.name: {"PearCorr": np.full(n, crit[curves.name][k] - 1.0),
                     "RelAcc": np.ones(n)} for k, c in enumerate(configs)}, None

  truth = np.array([1.0, 2.0, 3.0, 4.0])
  pooled_pred = {("x", g1): truth, ("x", g0): truth[::-1], ("y", g1): truth}
  asked = {}

  def predict(curves, ratios, *, ctx, pooled_configs, target_data_num):
    del ctx, target_data_num
    asked[curves.name] = list(pooled_configs)
    preds = {"AtS": candidates.BasePrediction(np.array([[2.0, 1.0, 3.0, 4.0]] * len(ratios)))}
    for c in pooled_configs:
      preds[candidates.pooled_key(c)] = candidates.BasePrediction(np.stack(
        [pooled_pred.get((curves.name, c), truth)] * len(ratios)))
    return truth, preds

  def cs(name):
    return type("C", (), {"name": name, "source": name, "data_sizes": GRID})()

  monkeypatch.setattr(protocol, "default_grid", lambda: [g0, g1])
  cands = [candidates.Candidate("PooledLensLLM"), candidates.Candidate("AtS", 1.0)]
  folds, _ = candidates.leave_one_out(
    [cs("x"), cs("y"), cs("z")], key=jax.random.key(0),
    options=protocol.ProtocolOptions(ratios=(8,)), predictor=object(),
    grid_evaluate=evaluate, predict=predict, candidates=cands)
  fz = folds[2]
  assert fz.held_out == "z" and fz.trained_on == ("x", "y")
  # In-sample on {x, y}: g0 (0 + 1) / 2 = 0.5, g1 (2 + 0.5) / 2 = 1.25. Nested: on x the
  # choice over y alone (g0: 1 > 0.5), on y the choice over x alone (g1: 2 > 0).
  assert fz.pooled.config == g1 and fz.pooled.train_criterion == pytest.approx(1.25)
  assert fz.pooled.nested == {"x": (g0, pytest.approx(1.0)), "y": (g1, pytest.approx(2.0))}
  # PooledLensLLM on x is scored with g0's (reversed) prediction: PearCorr -1, it picks the
  # worst model (RelAcc 0); on y with g1's (perfect) one.
  for ds, pc, ra in (("x", -1.0, 0.0), ("y", 1.0, 1.0)):
    np.testing.assert_allclose(fz.tables[ds]["PooledLensLLM"]["PearCorr"], [pc], atol=1e-12)
    np.testing.assert_allclose(fz.tables[ds]["PooledLensLLM"]["RelAcc"], [ra], atol=1e-12)
  # AtS ([2, 1, 3, 4]): PearCorr 0.8, it picks loss 2 (RelAcc 2/3): criterion 1.4667 on
  # both files. Nested PooledLensLLM: (-1 + 2) / 2 = 0.5 < 1.4667: AtS. Under the in-sample rule
  # (g1 on x and y, perfect on both) PooledLensLLM would score 2 and win.
  assert fz.candidate.name == "AtS" and fz.train_criterion == pytest.approx(0.8 + 2 / 3)
  # Each file is predicted with its own fold's setting and its nested setting in every
  # other fold: x's own fold (on y, z: g0 1 > g1 0.75), nested in y's fold (on z alone: a
  # tie, the earlier g0) and in z's (g0). The old rule also predicted x with g1.
  assert [f.pooled.config for f in folds] == [g0, g1, g1]
  assert asked == {"x": [g0], "y": [g0, g1], "z": [g0, g1]}  # in fold order
  # The held-out file keeps the setting chosen on all of its training files.
  assert candidates.pooled_setting(fz.pooled, "z") == g1
  with pytest.raises(KeyError, match="neither"):
    candidates.pooled_setting(fz.pooled, "w")
  # A single training file leaves nothing to choose on: the grid's first setting.
  one = evaluate(cs("x"), [g0, g1], key=None, options=protocol.ProtocolOptions(ratios=(8,)))
  only = protocol.nested_choices({"x": one[0]}, [g1, g0])
  assert only["x"][0] == g1 and np.isnan(only["x"][1])


def _pearson(a, b):
  a, b = a - a.mean(), b - b.mean()
  return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_choice_without_each_training_file_matches_a_brute_force_recount(monkeypatch):
  """Four files (x, y reported; t1, t2 training-only), a 3-setting grid, random
  predictions. Each fold's choice on all its training files and without each one is
  recounted here by brute force: the nested PooledLensLLM setting by argmax of the grid
  criterion over the remaining files minus the scored one (none left: the first
  setting), each candidate's prediction, Pearson and relative accuracy by their
  definitions, the mean criterion, argmax, runner-up and margin."""
  from lensllm_jax.plus import protocol
  from lensllm_jax.selection import pooled

  grid = [pooled.PooledConfig(strength=s) for s in (0.0, 0.5, 2.0)]
  names = ("x", "y", "t1", "t2")
  rng = np.random.default_rng(7)
  ratios = (8, 16)
  grid_crit = {n: rng.uniform(0.5, 2.0, len(grid)) for n in names}
  truth = {n: rng.uniform(1.0, 3.0, 5) for n in names}
  preds = {(n, k): rng.uniform(1.0, 3.0, (len(ratios), 5))
           for n in names for k in ["AtS", "CurvePFN"] + [g.name for g in grid]}

  def evaluate(curves, configs, *, key, options):
    del key
    n = len(options.ratios)
    return {c.name: {"PearCorr": np.full(n, grid_crit[curves.name][k] - 1.0),
                     "RelAcc": np.ones(n)} for k, c in enumerate(configs)}, None

  def predict(curves, rs, *, ctx, pooled_configs, target_data_num):
    del ctx, target_data_num
    assert list(rs) == list(ratios)
    out = {k: candidates.BasePrediction(preds[(curves.name, k)]) for k in ("AtS", "CurvePFN")}
    out.update({candidates.pooled_key(c): candidates.BasePrediction(preds[(curves.name, c.name)])
                for c in pooled_configs})
    return truth[curves.name], out

  def cs(name):
    return type("C", (), {"name": name, "source": name, "data_sizes": GRID})()

  monkeypatch.setattr(protocol, "default_grid", lambda: grid)
  monkeypatch.setattr(protocol, "training_ratios", lambda c, r: list(r))
  cands = [candidates.Candidate("PooledLensLLM"), candidates.Candidate("PooledLensLLM", 0.5),
           candidates.Candidate("CurvePFN"), candidates.Candidate("CurvePFN", 0.25),
           candidates.Candidate("AtS", 1.0)]
  folds, _ = candidates.leave_one_out(
    [cs("x"), cs("y")], train_only=[cs("t1"), cs("t2")], key=jax.random.key(0),
    options=protocol.ProtocolOptions(ratios=ratios),
    predictor=object(), grid_evaluate=evaluate, predict=predict, candidates=cands,
    leave_each_out=True)

  def nested_setting(others):
    if not others:
      return grid[0]
    means = np.mean([grid_crit[o] for o in others], axis=0)
    return grid[int(np.argmax(means))]  # argmax: the first of equal values

  def criterion(cand, s, setting):
    ats = preds[(s, "AtS")]
    base = ats if cand.base == "AtS" else preds[
      (s, setting.name if cand.base == "PooledLensLLM" else cand.base)]
    p = ats ** cand.ats_weight * base ** (1 - cand.ats_weight)
    y = truth[s]
    pc = [_pearson(row, y) for row in p]
    ra = [(y.max() - y[np.argmin(row)]) / (y.max() - y.min()) for row in p]
    return np.mean(pc) + np.mean(ra)

  def recount(files):
    crit = [np.mean([criterion(c, s, nested_setting([o for o in files if o != s]))
                     for s in files]) for c in cands]
    order = sorted(range(len(cands)), key=lambda k: (-crit[k], k))
    return cands[order[0]], crit[order[0]], cands[order[1]], crit[order[1]]

  changed = renested = 0
  for f in folds:
    train = [n for n in names if n != f.held_out]
    assert f.choice.trained_on == tuple(train) and f.choice.candidate == f.candidate
    for t, choice in [(None, f.choice), *f.without.items()]:
      files = [n for n in train if n != t]
      best, val, second, second_val = recount(files)
      assert choice.trained_on == tuple(files)
      assert (choice.candidate, choice.runner_up) == (best, second)
      assert choice.criterion == pytest.approx(val, abs=1e-12)
      assert choice.margin == pytest.approx(val - second_val, abs=1e-12)
      assert choice.margin >= 0
      if t is not None:
        changed += choice.candidate != f.candidate
        renested += sum(nested_setting([o for o in files if o != s])
                        != f.pooled.nested[s][0] for s in files)
    assert list(f.without) == train
  # The case exercises both: some choice moves without a file, and some PooledLensLLM setting
  # is nested differently once a file is gone (the rule is not the full fold's).
  assert changed >= 1 and renested >= 1
