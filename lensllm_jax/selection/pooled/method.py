"""PooledLensLLM: model selection by the pooled fit's predicted L(D*), on budget views.

`pooled_selection` (many views x settings in one batch) and `pooled_lensllm`
(one view, the signature of the methods in `selection`) rank the models by
L(D*) of the pooled fit, method name METHOD_NAME ("PooledLensLLM"). They read
only `core.VisibleCurves`, so the budget is enforced by construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from lensllm_jax import laws
from lensllm_jax.selection import core
from lensllm_jax.selection.pooled import backtest, empirical_bayes, objective, solver
from lensllm_jax.selection.pooled.config import DEFAULT_CONFIG, METHOD_NAME, PooledConfig

__all__ = ["pooled_lensllm", "pooled_selection"]


def _view_arrays(views, num_points: int):
  """Padded (d [V, Pp], log L [V, M, Pp], mask [V, M, Pp]) of budget views (all points)."""
  ds, ys, ms = [], [], []
  for v in views:
    p = v.data_sizes.size
    pad = num_points - p
    d = np.concatenate([v.data_sizes, np.full(pad, v.data_sizes[-1])])
    mk = np.concatenate([v.mask, np.zeros((v.num_models, pad), bool)], axis=1)
    y = np.log(np.where(v.mask, v.losses, 1.0))
    y = np.concatenate([y, np.zeros((v.num_models, pad))], axis=1)
    ds.append(d)
    ys.append(np.where(mk, y, 0.0))
    ms.append(mk)
  return np.stack(ds), np.stack(ys), np.stack(ms)


def pooled_selection(views, metadata, configs: Sequence[PooledConfig], *, key: jax.Array,
                     num_restarts: int = 8, num_steps: int = 60, fit_options=None,
                     name: str = METHOD_NAME, num_points: int = 0):
  """The pooled fit on several budget views x settings: results[view][config].

  Step 1: independent LensLLM curve-mode fits of every model and view
  (`core.fit_law_views`, best of `num_restarts`); step 2: the pooled
  MAP fit of each (view, config) started there (`solver.fit_pooled`); the
  prediction is L(D*) of the pooled fit. The AtS phase test (for the point
  weights) reads the same view. Only `VisibleCurves` views are read, so the
  budget is enforced by construction.

  Args:
    views: sequence of `core.VisibleCurves` over the same M models.
    metadata: `core.Metadata` (sizes for covariates, D*).
    configs: settings to run on every view.
    key: PRNG key of the independent fits' restarts.
    num_restarts, fit_options: passed to the independent fits.
    num_steps: Levenberg-Marquardt steps of the pooled fit (`solver.fit_pooled`).
    name: method name in the results.
    num_points: pad the point axis to at least this many points (fixed
      shapes across calls: one compile for a sequence of growing views).

  Returns:
    list over views of lists over configs of `core.SelectionResult`
    (predicted = feature = L(D*) [M]; predictor: `core.LawPredictor` of
    the pooled fit (raw params [M, 4] of `laws.lensllm_law()`); extras:
    config, objective, data_sizes, mask, independent_raw [M, 4], ...).
  """
  views = list(views)
  for v in views:
    if not isinstance(v, core.VisibleCurves):
      raise TypeError(f"{name} reads budget views only (core.VisibleCurves, built by "
                      f"selection.visible_view), got {type(v).__name__}")
  configs = list(configs)
  # Covariates first: a missing zero-shot loss is refused before any fit.
  needs_zero_shot = any(c.covariates == "size_zero_shot" for c in configs)
  cov = [objective.view_covariates(v, metadata, needs_zero_shot, name) for v in views]
  law = laws.lensllm_law()
  chosen_strength = [[c.strength] * len(views) for c in configs]
  if any(c.backtest for c in configs):
    def select(cut_views, candidates):
      return pooled_selection(cut_views, metadata, candidates, key=key,
                              num_restarts=num_restarts, num_steps=num_steps,
                              fit_options=fit_options)

    chosen_strength = backtest.backtest_strengths(views, configs, select)
  resolved = [[dataclasses.replace(c, strength=chosen_strength[j][i], backtest=0)
               for j, c in enumerate(configs)] for i in range(len(views))]
  indep = core.fit_law_views("LensLLM", law, views, metadata, key=key, use_zero_shot=True,
                             num_restarts=num_restarts, fit_options=fit_options)
  num_points = max(int(num_points), max(v.data_sizes.size for v in views))
  d, y, mk = _view_arrays(views, num_points)
  nv = len(views)
  first_d = []
  for v in views:
    a = core.ats(v, metadata)
    first_d.append(a.predictor.first_power_data_size)
  # Problems: view-major, config-minor.
  vi = np.repeat(np.arange(nv), len(configs))
  ci = np.tile(np.arange(len(configs)), nv)
  pcfg = [resolved[i][c] for i, c in zip(vi, ci, strict=True)]
  weights = np.stack([objective.pre_power_weights(d[i], first_d[i], configs[c].pre_power_weight)
                      for i, c in zip(vi, ci, strict=True)])
  init = np.stack([indep[i].predictor.raw_params for i in vi])
  eb = [None] * nv
  if any(c.empirical_bayes or c.huber_relative for c in configs):
    eb = [empirical_bayes.empirical_bayes_strength(indep[i].predictor.raw_params, d[i], y[i],
                                                   mk[i]) for i in range(nv)]
  # A relative Huber threshold becomes delta * sigma of the view (visible data only).
  pcfg = [dataclasses.replace(pc, huber_relative=False, huber_delta=pc.huber_delta * max(
              np.sqrt(eb[i][1]["s2"]), 1e-12)) if pc.huber_relative else pc
          for i, pc in zip(vi, pcfg, strict=True)]
  group = np.stack([pc.strength * eb[i][0] if pc.empirical_bayes else pc.arrays()[0]
                    for i, pc in zip(vi, pcfg, strict=True)])
  # Two starts per problem (independent fits; the same with the median beta),
  # the lower MAP objective wins: the joint problem is non-convex.
  n = init.shape[0]
  starts = np.concatenate([init, solver.median_beta_start(init)])
  both = solver.fit_pooled(starts, np.concatenate([d[vi]] * 2), np.concatenate([y[vi]] * 2),
                           np.concatenate([mk[vi]] * 2), pcfg * 2,
                           covariates=np.stack([cov[i] for i in vi] * 2),
                           weights=np.concatenate([weights] * 2),
                           group_strength=np.concatenate([group] * 2), num_steps=num_steps)
  obj = np.where(np.isfinite(both.objective), both.objective, np.inf)
  pick = np.where(obj[n:] < obj[:n], n + np.arange(n), np.arange(n))
  fit = solver.PooledFit(both.raw_params[pick], both.objective[pick],
                         both.data_objective[pick], both.law)
  pred = fit.predict(np.array([metadata.target_data_num]))[..., 0]  # [V * C, M]
  out = []
  for i, v in enumerate(views):
    row = []
    for j, cfg in enumerate(configs):
      k = i * len(configs) + j
      p = pred[k]
      bad = ~np.isfinite(p)
      feature = p.copy()
      if bad.any():
        feature[bad] = core.last_visible_loss(v)[0][bad]
      status = tuple("nonfinite" if b else "ok" for b in bad)
      row.append(core.SelectionResult(
          name, feature, core.rank_by(feature), predicted=p, status=status,
          predictor=core.LawPredictor(law, fit.raw_params[k]),
          extras={"config": cfg, "objective": float(fit.objective[k]),
                  "data_sizes": v.data_sizes,
                  "mask": v.mask, "independent_raw": indep[i].predictor.raw_params,
                  "group_strength": group[k], "strength": chosen_strength[j][i],
                  "empirical_bayes": None if eb[i] is None else eb[i][1]}))
    out.append(row)
  return out


def pooled_lensllm(visible, metadata, *, key: jax.Array, config: PooledConfig | None = None,
                   num_restarts: int = 8, num_steps: int = 60, fit_options=None):
  """The pooled LensLLM fit's selection on one budget view (signature of `selection` methods).

  Args:
    visible: `core.VisibleCurves` (the budget-limited curves).
    metadata: `core.Metadata`.
    key: PRNG key of the independent fits.
    config: settings; default `DEFAULT_CONFIG` (the leave-one-dataset-out
      choice is made by `protocol.leave_one_out`; pass it here).

  Returns:
    `core.SelectionResult` named `METHOD_NAME` ("PooledLensLLM").
  """
  cfg = DEFAULT_CONFIG if config is None else config
  return pooled_selection([visible], metadata, [cfg], key=key, num_restarts=num_restarts,
                          num_steps=num_steps, fit_options=fit_options)[0][0]
