"""The backtest: a prior strength per budget view chosen from its visible data alone.

A view with largest visible size D_max is cut at D_max / k; every strength
of BACKTEST_STRENGTHS is fitted on the cut view and scored by PearCorr +
RelAcc of its predicted losses at the view's largest visible D against the
observed ones; the best strength is then used on the whole view
(`PooledConfig.backtest` = k).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from lensllm_jax.selection import core, metrics
from lensllm_jax.selection.pooled.config import PooledConfig

__all__ = ["BACKTEST_STRENGTHS", "backtest_strengths", "cut_view"]

BACKTEST_STRENGTHS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)


def cut_view(view: core.VisibleCurves, max_data_num: float) -> core.VisibleCurves:
  """The part of a budget view with D <= max_data_num (a budget view itself)."""
  keep = view.data_sizes <= max_data_num
  return core.VisibleCurves(data_sizes=view.data_sizes[keep],
                            losses=np.where(view.mask, view.losses, 1.0)[:, keep],
                            mask=view.mask[:, keep], max_data_num=max_data_num)


def backtest_strengths(views: Sequence[core.VisibleCurves], configs: Sequence[PooledConfig],
                       select: Callable) -> list[list[float]]:
  """chosen[config][view]: the strength of each (config, view); see `PooledConfig.backtest`.

  Configs without a backtest keep their own strength. All configs with the
  same backtest factor share one `select` call on the cut views (one set of
  independent fits), candidates config-major.

  Args:
    views: the budget views (visible data only).
    configs: the settings.
    select: select(cut views, candidate configs) -> results[view][config] of
      `core.SelectionResult` with a `predictor` (`method.pooled_selection`
      with the caller's key and fit options).
  """
  chosen = [[c.strength] * len(views) for c in configs]
  for factor in sorted({c.backtest for c in configs if c.backtest}):
    js = [j for j, c in enumerate(configs) if c.backtest == factor]
    subs, targets, idx = [], [], []
    for i, v in enumerate(views):
      cut = cut_view(v, v.max_data_num / factor)
      last = np.flatnonzero(v.data_sizes > cut.data_sizes[-1])
      # Needs two fine-tuning points below the cut and a visible point above it.
      positive = cut.mask[:, cut.data_sizes > 0]  # the zero-shot column may be absent
      if (cut.data_sizes > 0).sum() < 2 or last.size == 0 or not positive.any(1).all():
        continue
      col = last[-1]
      subs.append(cut)
      targets.append((v.data_sizes[col], v.losses[:, col], v.mask[:, col]))
      idx.append(i)
    if not subs:
      continue
    cands = [dataclasses.replace(configs[j], strength=s, backtest=0)
             for j in js for s in BACKTEST_STRENGTHS]
    res = select(subs, cands)
    ns = len(BACKTEST_STRENGTHS)
    for q, j in enumerate(js):
      for k, i in enumerate(idx):
        d_t, obs, ok = targets[k]
        best, best_val = configs[j].strength, -np.inf
        for c, s in enumerate(BACKTEST_STRENGTHS):
          pred = res[k][q * ns + c].predictor.predict([d_t])[:, 0]
          good = ok & np.isfinite(pred)
          if good.sum() < 3:
            continue
          pc = metrics.pearson_corr(pred[good], obs[good])
          ra = metrics.relative_accuracy(int(np.argmin(pred[good])), obs[good])
          val = (pc if np.isfinite(pc) else -1.0) + ra
          if val > best_val:
            best, best_val = s, val
        chosen[j][i] = best
  return chosen
