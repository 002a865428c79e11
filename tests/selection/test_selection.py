"""Selection methods: published numbers, budget enforcement, fitted laws."""

import dataclasses

import jax
import numpy as np
import pytest

from helpers.synthetic_curves import FAST, synthetic_curves
from lensllm_jax import selection
from lensllm_jax.curves import benchmarks
from lensllm_jax.selection import methods, metrics, published

D_STAR = 1_638_400

@pytest.fixture(scope="module")
def shared_sets(shared_benchmarks):
  return {n: benchmarks.load_curves(shared_benchmarks / f"{n}.csv") for n in ("flan", "gigaword")}


@pytest.mark.parametrize("dataset", ["flan", "gigaword"])
@pytest.mark.parametrize("method", ["ZeroShot", "SubTuning", "ModelSize", "AtS"])
def test_deterministic_methods_match_published(shared_sets, dataset, method):
  curves = shared_sets[dataset]
  meta = selection.metadata_of(curves, D_STAR)
  truth = curves.column(D_STAR)
  for ratio in published.RATIOS:
    res = methods.run_method(method, selection.visible_view(curves, D_STAR // ratio), meta)
    for metric, ours in (("PearCorr", metrics.pearson_corr(res.feature, truth)),
                         ("RelAcc", metrics.relative_accuracy(res.chosen, truth))):
      pub = published.published_value(dataset, method, metric, ratio)
      assert abs(100 * ours - 100 * pub) <= 0.1 + 1e-9, (dataset, method, metric, ratio, ours)


def test_view_holds_only_visible_columns(shared_sets):
  curves = shared_sets["flan"]
  view = selection.visible_view(curves, 12800)
  assert view.data_sizes.max() == 12800 and view.data_sizes[0] == 0
  assert view.losses.shape == (30, 8)
  assert not np.shares_memory(view.losses, curves.losses)
  with pytest.raises(ValueError):
    view.losses[0, 0] = 1.0  # read-only
  with pytest.raises(ValueError, match="exceed the budget"):
    selection.VisibleCurves(curves.data_sizes, curves.losses, np.ones(curves.losses.shape, bool),
                            max_data_num=12800)
  with pytest.raises(ValueError, match="above D_max"):
    selection.visible_view(curves, 12800, revealed=np.ones(curves.losses.shape, bool))
  meta_fields = {f.name for f in dataclasses.fields(selection.Metadata)}
  assert not any("loss" in f for f in meta_fields)


def _poisoned(curves, dmax, seed):
  rng = np.random.default_rng(seed)
  losses = curves.losses.copy()
  hidden = curves.data_sizes > dmax
  losses[:, hidden] = rng.uniform(0.01, 50.0, (losses.shape[0], hidden.sum()))
  return dataclasses.replace(curves, losses=losses)


def test_poisoned_hidden_columns_change_nothing(shared_sets):
  curves = shared_sets["gigaword"]
  meta = selection.metadata_of(curves, D_STAR)
  for dmax in (3200, 51200):
    base = {m: methods.run_method(m, selection.visible_view(curves, dmax), meta)
            for m in methods.DETERMINISTIC_METHODS}
    for seed in range(2):
      bad = _poisoned(curves, dmax, seed)
      for m, ref in base.items():
        res = methods.run_method(m, selection.visible_view(bad, dmax), meta)
        np.testing.assert_array_equal(res.feature, ref.feature)
        np.testing.assert_array_equal(res.ranking, ref.ranking)


def test_fitted_method_blind_to_hidden_columns():
  curves, _ = synthetic_curves(noise=0.01)
  meta = selection.metadata_of(curves, 409600)
  dmax = 25600
  key = jax.random.key(0)
  runs = []
  for c in (curves, _poisoned(curves, dmax, 1)):
    runs.append(selection.run_fitted_batch("LensLLM", [selection.visible_view(c, dmax)], meta,
                                           key=key, min_curves=28, **FAST)[0])
  np.testing.assert_array_equal(runs[0].predicted, runs[1].predicted)


def test_rank_ties_follow_file_order():
  np.testing.assert_array_equal(selection.rank_by([2.0, 1.0, 1.0, np.nan]), [1, 2, 0, 3])
  np.testing.assert_array_equal(selection.rank_by([1, 3, 3], higher_is_better=True), [1, 2, 0])


@pytest.mark.parametrize("method", ["RectifiedFit", "LensLLM"])
def test_saturating_fits_recover_exact_curves(method):
  """Exact rectified curves: the prediction at D* matches the generating law."""
  curves, p = synthetic_curves()
  target = 409600
  meta = selection.metadata_of(curves, target)
  views = [selection.visible_view(curves, target / r) for r in (4, 8, 16, 32)]
  results = selection.run_fitted_batch(method, views, meta, key=jax.random.key(1),
                                       min_curves=28, **FAST)
  truth = p["B"] / (p["D_l"] + target ** p["beta"]) + p["E"]
  for res in results[:2]:
    np.testing.assert_allclose(res.predicted, truth, rtol=2e-3)
    assert set(res.status) <= {"converged", "max_steps"}
  # The predictor is the fitted curve: L(D*) as `predicted`, and the generating
  # law on the held-out sizes D_max < D <= D*.
  res = results[0]
  np.testing.assert_array_equal(res.predictor.predict([target])[:, 0], res.predicted)
  d_held = curves.data_sizes[(curves.data_sizes > views[0].max_data_num)]
  exact = p["B"][:, None] / (p["D_l"][:, None] + d_held[None] ** p["beta"][:, None]) + p["E"][:, None]
  np.testing.assert_allclose(res.predictor.predict(d_held), exact, rtol=2e-3)
  assert res.predictor.parameters().shape == (7, 4)


def test_ats_predictor_is_the_least_squares_power_line():
  curves, _ = synthetic_curves(seed=2, noise=0.01)
  meta = selection.metadata_of(curves, 409600)
  view = selection.visible_view(curves, 51200)
  res = selection.ats(view, meta)
  line = res.predictor
  d_pos = view.data_sizes[view.data_sizes > 0]
  for m in range(curves.num_models):
    first = d_pos >= line.first_power_data_size[m]
    slope, intercept = np.polyfit(np.log(d_pos[first]), np.log(view.losses[m, 1:][first]), 1)
    np.testing.assert_allclose([line.intercept[m], line.slope[m]], [intercept, slope], rtol=1e-9)
  np.testing.assert_allclose(line.predict([409600.0])[:, 0], res.predicted, rtol=1e-12)
  assert np.isnan(line.predict([0.0])).all()  # no D = 0 on a log-log line
  assert line.parameters().shape == (curves.num_models, 3)


def test_vanilla_fit_recovers_exact_vanilla_curves():
  rng = np.random.default_rng(3)
  m = 7
  alpha, b = rng.uniform(0.5, 1.5, m), rng.uniform(5, 50, m)
  beta, e = rng.uniform(0.2, 0.5, m), rng.uniform(0.5, 2.0, m)
  d = np.concatenate([[0.0], 200.0 * 2.0 ** np.arange(12)])
  dd = np.where(d > 0, d, 1.0)
  losses = (b[:, None] / dd[None] ** beta[:, None] + e[:, None]) ** alpha[:, None]
  losses[:, 0] = losses[:, 1] + 0.5  # zero-shot column: not used by VanillaFit
  curves = benchmarks.CurveSet("v", "<v>", tuple(map(str, range(m))), np.full(m, 10**8),
                               ("f",) * m, d, losses)
  target = 409600.0
  meta = selection.metadata_of(curves, target)
  res = selection.run_fitted_batch("VanillaFit", [selection.visible_view(curves, 102400)], meta,
                                   key=jax.random.key(2), min_curves=28, **FAST)[0]
  truth = (b / target ** beta + e) ** alpha
  # Few restarts / steps (FAST) and a nearly-L1 objective: 1.5 % after two doublings.
  np.testing.assert_allclose(res.predicted, truth, rtol=1.5e-2)


def test_lensllm_ntk_mode_passes_aux_through():
  """F(t, aux) = aux_c * exp(-t): curves built from it are fitted back."""
  import jax.numpy as jnp
  curves, p = synthetic_curves(seed=4)
  c = np.linspace(0.5, 3.0, 7)
  t_true = 0.7
  f = c * np.exp(-t_true)
  d = curves.data_sizes
  dd = np.where(d > 0, d, 1e-10)
  losses = p["B"][:, None] / (f[:, None] + dd[None] ** p["beta"][:, None]) + p["E"][:, None]
  curves = dataclasses.replace(curves, losses=losses)
  meta = selection.metadata_of(curves, 409600)
  res = selection.lensllm(selection.visible_view(curves, 102400), meta, key=jax.random.key(5),
                          f_term=lambda t, aux: aux["c"] * jnp.exp(-t), aux={"c": c},
                          **FAST)
  truth = p["B"] / (f + 409600 ** p["beta"]) + p["E"]
  np.testing.assert_allclose(res.predicted, truth, rtol=1e-2)
  np.testing.assert_allclose(res.predictor.predict([409600.0])[:, 0], truth, rtol=1e-2)
  with pytest.raises(ValueError, match="both f_term and aux"):
    selection.lensllm(selection.visible_view(curves, 102400), meta, key=jax.random.key(5),
                      aux={"c": c})
