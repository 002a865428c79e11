"""LLM selection methods on fine-tuning curves (docs/selection.md).

Protocol. Target D* (default 1,638,400 samples); a budget D_max. A method
sees the zero-shot loss L(0), the losses at D <= D_max and the model
metadata, and outputs a per-model feature (the predicted L(D*) for fitting
methods) and a ranking, best first.

The budget is enforced structurally: methods receive a `VisibleCurves` view,
built by `visible_view`, that holds COPIES of the visible columns only (and
refuses to hold a data size above its budget), plus a `Metadata` record
(names, sizes, families, D*) that holds no loss at all. No method ever gets
the `CurveSet`. A per-model `mask` lets the budgeted procedure of
`budgeted.py` reveal different points for different models.

Every method has the signature

    method(visible: VisibleCurves, metadata: Metadata, **options) -> SelectionResult

Methods (published names):
- ZeroShot: feature L(0), lower is better.
- SubTuning: feature L at the largest visible D of each model, lower is better.
- ModelSize: feature log(parameter count), larger is better.
- AtS: phase-transition test (`phases.py`), then a least-squares line in
  log-log space through the power-phase points (D > 0 only, as published),
  predicted L(D*) = exp(intercept + slope log D*).
- VanillaFit: L(D) = (B / D^beta + E)^alpha fitted on the D > 0 points.
- RectifiedFit: L(D) = B / (D_l + D^beta) + E fitted on all visible points
  including the zero-shot point (Lin et al.'s "OurFit").
- LensLLM: L(D) = B / (F + D^beta) + E, curve mode (F a fitted scalar per
  model), or with F(t, aux) from the NTK given as `f_term` with per-model `aux`.

Not published: PooledLensLLM (`pooled.pooled_lensllm`): the LensLLM curve-mode law
fitted to all models jointly with a hierarchical prior. The registry of all
methods (`methods.REGISTRY`, `run_method`, `run_fitted_batch`) is `methods.py`.

Ties in the feature keep file order (a stable sort), which picks the same
top model as the published code (pandas average ranks + argmin).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax import laws
from lensllm_jax.laws import fitting, phases

TARGET_DATA_NUM = 1_638_400
BUDGETS = (204800, 102400, 51200, 25600, 12800, 6400, 3200)


def _frozen(a, dtype) -> np.ndarray:
  out = np.array(a, dtype=dtype, copy=True)
  out.setflags(write=False)
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class VisibleCurves:
  """The part of the curves a method may read.

  Attributes:
    data_sizes: [P] float64 visible data sizes, ascending, all <= max_data_num.
    losses: [M, P] float64 losses, nan where `mask` is False.
    mask: [M, P] bool, True where the loss has been revealed (paid for).
    max_data_num: the budget D_max.

  The arrays are private read-only copies; construction fails if any data size
  exceeds the budget, so a view can never carry hidden columns.
  """
  data_sizes: np.ndarray
  losses: np.ndarray
  mask: np.ndarray
  max_data_num: float

  def __post_init__(self):
    d = _frozen(self.data_sizes, np.float64).reshape(-1)
    losses = np.array(self.losses, dtype=np.float64, copy=True)
    mask = np.array(self.mask, dtype=bool, copy=True)
    if losses.ndim != 2 or losses.shape[1] != d.size or mask.shape != losses.shape:
      raise ValueError(f"VisibleCurves: losses {losses.shape} / mask {mask.shape} do not "
                       f"match data_sizes [{d.size}]")
    if np.any(d > self.max_data_num):
      raise ValueError(f"VisibleCurves: data sizes {d[d > self.max_data_num].tolist()} exceed "
                       f"the budget D_max={self.max_data_num}")
    if np.any(np.diff(d) <= 0):
      raise ValueError(f"VisibleCurves: data sizes must increase, got {d.tolist()}")
    losses[~mask] = np.nan
    if np.any(~np.isfinite(losses[mask])):
      raise ValueError("VisibleCurves: a revealed loss is not finite")
    losses.setflags(write=False)
    mask.setflags(write=False)
    object.__setattr__(self, "data_sizes", d)
    object.__setattr__(self, "losses", losses)
    object.__setattr__(self, "mask", mask)
    object.__setattr__(self, "max_data_num", float(self.max_data_num))

  @property
  def num_models(self) -> int:
    return self.losses.shape[0]

  def column(self, data_size: float) -> np.ndarray:
    """[M] losses at one visible data size (nan where not revealed)."""
    hits = np.flatnonzero(self.data_sizes == data_size)
    if hits.size != 1:
      raise KeyError(f"D={data_size} is not visible (visible: {self.data_sizes.tolist()})")
    return self.losses[:, hits[0]]


@dataclasses.dataclass(frozen=True, eq=False)
class Metadata:
  """Model metadata a method may read (no losses).

  Attributes:
    name: dataset name.
    models: [M] model ids.
    sizes: [M] parameter counts.
    families: [M] model families.
    target_data_num: D*, the data size whose loss is predicted.
  """
  name: str
  models: tuple[str, ...]
  sizes: np.ndarray
  families: tuple[str, ...]
  target_data_num: float = TARGET_DATA_NUM

  def __post_init__(self):
    object.__setattr__(self, "sizes", _frozen(self.sizes, np.int64))


def visible_view(curves, max_data_num: float, revealed=None) -> VisibleCurves:
  """The budget-limited view of a CurveSet.

  Args:
    curves: a `benchmarks.CurveSet` (data_sizes [P_all], losses [M, P_all]).
    max_data_num: budget D_max; columns with D > D_max are not copied.
    revealed: optional [M, P_all] bool, the points paid for (default: all
      points with D <= D_max). Revealed points above D_max are an error.

  Returns:
    VisibleCurves over the columns with D <= D_max.
  """
  d = np.asarray(curves.data_sizes, np.float64)
  keep = d <= max_data_num
  if not keep.any():
    raise ValueError(f"no data size <= D_max={max_data_num} in {curves.source}")
  if revealed is None:
    mask = np.ones((len(curves.models), int(keep.sum())), bool)
  else:
    revealed = np.asarray(revealed, bool)
    if revealed.shape != np.shape(curves.losses):
      raise ValueError(f"revealed {revealed.shape} != losses {np.shape(curves.losses)}")
    if revealed[:, ~keep].any():
      raise ValueError(f"revealed points above D_max={max_data_num}")
    mask = revealed[:, keep]
  return VisibleCurves(data_sizes=d[keep], losses=np.asarray(curves.losses)[:, keep],
                       mask=mask, max_data_num=max_data_num)


def metadata_of(curves, target_data_num: float = TARGET_DATA_NUM) -> Metadata:
  """Metadata (no losses) of a CurveSet."""
  return Metadata(name=curves.name, models=tuple(curves.models), sizes=curves.sizes,
                  families=tuple(curves.families), target_data_num=float(target_data_num))


@dataclasses.dataclass(frozen=True, eq=False)
class LawPredictor:
  """A fitted law of test loss vs data size, one parameter row per model.

  Used by VanillaFit, RectifiedFit, LensLLM (independent fits) and PooledLensLLM
  (the pooled fit, in the raw parameters of `laws.lensllm_law()`).

  Attributes:
    law: the `laws.Law`.
    raw_params: [M, K] fitted raw parameters.
    aux: NTK mode: per-model pytree with leading axis [M], else None.
  """
  law: laws.Law
  raw_params: np.ndarray
  aux: Any = None

  def predict(self, data_size) -> np.ndarray:
    """[M, P] predicted losses at data sizes [P] (float64; nan where a fit failed)."""
    return np.asarray(self.law.predict(self.raw_params, np.asarray(data_size, np.float64),
                                       aux=self.aux))

  def parameters(self) -> np.ndarray:
    """[M, K] the numbers that define each model's curve (the raw parameters)."""
    return np.asarray(self.raw_params)


@dataclasses.dataclass(frozen=True, eq=False)
class PowerLinePredictor:
  """AtS's least-squares line in log-log space: L(D) = exp(a + b log D), D > 0.

  Attributes:
    intercept: [M] a.
    slope: [M] b.
    first_power_data_size: [M] D of each model's first power-phase point (the
      line is fitted from there on).
  """
  intercept: np.ndarray
  slope: np.ndarray
  first_power_data_size: np.ndarray

  def predict(self, data_size) -> np.ndarray:
    """[M, P] predicted losses at data sizes [P]; nan at D <= 0 (the line has no D = 0)."""
    d = np.asarray(data_size, np.float64)
    with np.errstate(divide="ignore"):
      log_d = np.log(np.where(d > 0, d, np.nan))
    return np.exp(self.intercept[:, None] + self.slope[:, None] * log_d[None, :])

  def parameters(self) -> np.ndarray:
    """[M, 3] (intercept, slope, first power-phase D) per model."""
    return np.stack([self.intercept, self.slope, self.first_power_data_size], axis=1)


# What `SelectionResult.predictor` holds: anything with these two methods.
Predictor = LawPredictor | PowerLinePredictor


@dataclasses.dataclass(frozen=True, eq=False)
class SelectionResult:
  """Output of a selection method.

  Attributes:
    method: method name.
    feature: [M] the feature correlated with L(D*) by PearCorr (see module doc).
    ranking: [M] model indices, best first.
    predicted: [M] predicted L(D*) for predicting methods, else None.
    status: [M] per-model status ("ok", "converged", "max_steps", "nonfinite",
      ...) or None.
    predictor: for the methods that predict the curve (AtS, the fitted laws,
      PooledLensLLM), the fitted curves: `predictor.predict(data_sizes [P])` ->
      [M, P] losses and `predictor.parameters()` -> [M, K]; None otherwise.
    extras: method-specific diagnostics (transition index, fit objective, ...).
  """
  method: str
  feature: np.ndarray
  ranking: np.ndarray
  predicted: np.ndarray | None = None
  status: tuple[str, ...] | None = None
  predictor: Predictor | None = None
  extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def chosen(self) -> int:
    """Index of the selected (top-ranked) model."""
    return int(self.ranking[0])


def rank_by(feature, *, higher_is_better: bool = False) -> np.ndarray:
  """Model indices best first; ties keep index order; nan ranks last."""
  f = np.asarray(feature, np.float64)
  key = -f if higher_is_better else f.copy()
  key = np.where(np.isfinite(key), key, np.inf)
  return np.argsort(key, kind="stable")


def _require_zero_shot(visible: VisibleCurves, method: str) -> np.ndarray:
  if visible.data_sizes[0] != 0:
    raise ValueError(f"{method} needs the zero-shot column D=0")
  l0 = visible.losses[:, 0]
  if np.any(~visible.mask[:, 0]):
    raise ValueError(f"{method}: zero-shot loss not revealed for models "
                     f"{np.flatnonzero(~visible.mask[:, 0]).tolist()}")
  return l0


def zero_shot(visible: VisibleCurves, metadata: Metadata) -> SelectionResult:
  """ZeroShot: rank by the zero-shot loss L(0) (feature L(0))."""
  del metadata
  l0 = _require_zero_shot(visible, "ZeroShot")
  return SelectionResult("ZeroShot", l0.copy(), rank_by(l0))


def last_visible_loss(visible: VisibleCurves) -> tuple[np.ndarray, np.ndarray]:
  """Loss at the largest revealed D of each model: (loss [M], D [M])."""
  m = visible.mask
  if not m.any(axis=1).all():
    raise ValueError("a model has no revealed point")
  last = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
  rows = np.arange(m.shape[0])
  return visible.losses[rows, last], visible.data_sizes[last]


def sub_tuning(visible: VisibleCurves, metadata: Metadata) -> SelectionResult:
  """SubTuning: rank by the loss at the largest visible D (D_max in the protocol)."""
  del metadata
  loss, d = last_visible_loss(visible)
  return SelectionResult("SubTuning", loss, rank_by(loss), extras={"data_size": d})


def model_size(visible: VisibleCurves, metadata: Metadata) -> SelectionResult:
  """ModelSize: larger is better; feature log(parameter count) as published."""
  feature = np.log(np.asarray(metadata.sizes, np.float64))
  if feature.size != visible.num_models:
    raise ValueError(f"metadata has {feature.size} models, curves have {visible.num_models}")
  return SelectionResult("ModelSize", feature, rank_by(feature, higher_is_better=True))


def _positive_part(visible: VisibleCurves):
  """Columns with D > 0: (data sizes [P+], losses [M, P+], mask [M, P+])."""
  pos = visible.data_sizes > 0
  return visible.data_sizes[pos], visible.losses[:, pos], visible.mask[:, pos]


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _ats_core(d, losses, mask, k, delta, published_convention):
  """Transition index, power-phase count and line (intercept, slope) per curve."""
  log_d = jnp.broadcast_to(jnp.log(d), losses.shape)
  log_l = jnp.log(jnp.where(mask, losses, 1.0))
  first, num = phases.phase_transition(log_d, log_l, mask, k=k, delta=delta,
                                       published_convention=published_convention)
  a, b = phases.power_phase_line(log_d, log_l, first, mask)
  return first, num, a, b


def ats(visible: VisibleCurves, metadata: Metadata, *, k: int = 3, delta: float = 5.0,
        published_convention: bool = True) -> SelectionResult:
  """AtS (Lin et al. 2024): transition test, then a log-log line on the power phase.

  Uses only D > 0 points. predicted L(D*) = exp(a + b log D*), with (a, b) the
  least-squares line through log L vs log D of the power-phase points.

  Args:
    visible, metadata: see module docstring.
    k, delta, published_convention: passed to `phases.phase_transition`.

  Returns:
    SelectionResult with predicted = feature = L(D*) prediction [M], predictor
    a `PowerLinePredictor`, and extras "first_index" [M] (column into the D > 0
    visible sizes), "num_power" [M] and "data_sizes".
  """
  d, losses, mask = _positive_part(visible)
  if d.size == 0:
    raise ValueError("AtS needs at least one visible D > 0")
  # Pad (masked) to a fixed point count: one compilation for every budget.
  pad = _pad_to(d.size) - d.size
  d_p = np.concatenate([d, np.full(pad, d[-1])])
  losses_p = np.concatenate([np.asarray(losses, np.float64), np.ones((losses.shape[0], pad))], 1)
  mask_p = np.concatenate([np.asarray(mask), np.zeros((mask.shape[0], pad), bool)], 1)
  with jax.enable_x64(True):
    first, num, a, b = _ats_core(d_p, losses_p, mask_p, k, float(delta),
                                 bool(published_convention))
    first, num, a, b = (np.asarray(x) for x in (first, num, a, b))
  pred = np.exp(a + b * np.log(metadata.target_data_num))
  line = PowerLinePredictor(intercept=a, slope=b, first_power_data_size=d[first])
  return SelectionResult("AtS", pred, rank_by(pred), predicted=pred,
                         status=tuple("ok" for _ in range(pred.size)), predictor=line,
                         extras={"first_index": np.asarray(first), "num_power": np.asarray(num),
                                 "data_sizes": d})


def _pad_to(n: int) -> int:
  """Padded number of points: one compiled fit serves every budget of a grid."""
  return max(16, n)


def _fit_arrays(visible: VisibleCurves, use_zero_shot: bool, num_points: int, name: str):
  """Padded fit inputs of one view: (d [M, Pp], log L [M, Pp], mask [M, Pp], mask [M, P])."""
  d = visible.data_sizes
  mask = visible.mask.copy()
  if not use_zero_shot:
    mask &= (d > 0)[None, :]
  if not mask.any(axis=1).all():
    raise ValueError(f"{name}: a model has no usable point (D_max={visible.max_data_num})")
  m, p = mask.shape
  pad = num_points - p
  # Padding repeats the last data size; its mask is False so it never counts.
  d_pad = np.broadcast_to(np.concatenate([d, np.full(pad, d[-1])]), (m, num_points))
  log_l = np.where(mask, np.log(np.where(mask, visible.losses, 1.0)), 0.0)
  log_l = np.concatenate([log_l, np.zeros((m, pad))], axis=1)
  mask_pad = np.concatenate([mask, np.zeros((m, pad), bool)], axis=1)
  return d_pad, log_l, mask_pad, mask


def fit_law_views(name: str, law: laws.Law, views, metadata: Metadata, *, key: jax.Array,
                  use_zero_shot: bool, num_restarts: int = 8, aux: Any = None,
                  fit_options: fitting.FitOptions | None = None,
                  min_curves: int = 0, uniforms=None) -> list[SelectionResult]:
  """Law-fitting selection on several views at once (one `fit_curves` call).

  Fits `law` to log L of every model's revealed points (D > 0 only unless
  `use_zero_shot`) and predicts L(D*). All views' curves are stacked into
  one batch ([views * M, points], points padded and masked to a fixed count,
  curves padded with empty (fully masked) curves up to `min_curves`), so a whole grid of
  budgets -- or all confidence levels of the budgeted procedure -- costs one
  compiled call. A model whose prediction is not finite keeps predicted = nan
  and status "nonfinite"; its feature falls back to its last revealed loss
  (the published code substitutes the constant 4.0 instead).

  Args:
    name: method name for the results.
    law: a `laws.Law`.
    views: sequence of VisibleCurves over the same M models.
    metadata: Metadata (D* is metadata.target_data_num).
    key: PRNG key of the random restarts.
    use_zero_shot: whether the D = 0 point enters the fit.
    num_restarts: restarts per curve (restart 0 is the published-style start).
    aux: NTK mode: per-model pytree with leading axis [M] (shared by all views).
    fit_options: the fitting engine's settings (`fitting.FitOptions`; None: defaults).
    min_curves: pad the batch to at least this many curves (compile reuse).
    uniforms: optional [views * M, num_restarts, laws.NUM_INIT_UNIFORMS]
      restart draws per curve replacing those of `key` (`fitting.fit_curves`).

  Returns:
    One SelectionResult per view: predicted = feature [M] (L(D*)), status [M],
    predictor a `LawPredictor` (law, raw params [M, K], aux), extras
    {"objective" [M], "data_sizes" [P], "mask" [M, P] (points used)}.
  """
  views = list(views)
  num_points = _pad_to(max(v.data_sizes.size for v in views))
  parts = [_fit_arrays(v, use_zero_shot, num_points, name) for v in views]
  m = views[0].num_models
  d = np.concatenate([q[0] for q in parts])
  y = np.concatenate([q[1] for q in parts])
  mk = np.concatenate([q[2] for q in parts])
  extra = max(0, min_curves - d.shape[0])
  if extra:
    # Padding curves have no point: the engine stops them at their start (no steps).
    d = np.concatenate([d, np.repeat(d[:1], extra, 0)])
    y = np.concatenate([y, np.zeros((extra, y.shape[1]))])
    mk = np.concatenate([mk, np.zeros((extra, mk.shape[1]), bool)])
  if uniforms is not None:
    uniforms = np.asarray(uniforms, np.float64)
    uniforms = np.concatenate([uniforms, np.zeros((extra, *uniforms.shape[1:]))])
  aux_all = None
  if aux is not None:
    reps = d.shape[0] // m + 1
    aux_all = jax.tree.map(lambda a: np.concatenate([np.asarray(a)] * reps)[:d.shape[0]], aux)
  fit = fitting.fit_curves(law, d, y, mk, key=key, num_restarts=num_restarts, aux=aux_all,
                           uniforms=uniforms, options=fit_options)
  pred_all = law.predict(fit.raw_params, np.array([metadata.target_data_num]),
                         aux=aux_all)[:, 0]
  results = []
  for i, (v, q) in enumerate(zip(views, parts, strict=True)):
    sl = slice(i * m, (i + 1) * m)
    pred = pred_all[sl]
    status = [str(s) for s in fit.status[sl]]
    bad = ~np.isfinite(pred)
    for j in np.flatnonzero(bad):
      status[j] = "nonfinite"
    feature = pred.copy()
    if bad.any():
      feature[bad] = last_visible_loss(v)[0][bad]
    results.append(SelectionResult(
        name, feature, rank_by(feature), predicted=pred, status=tuple(status),
        predictor=LawPredictor(law, fit.raw_params[sl], aux),
        extras={"objective": fit.objective[sl], "data_sizes": v.data_sizes, "mask": q[3]}))
  return results


def vanilla_fit(visible: VisibleCurves, metadata: Metadata, *, key: jax.Array,
                num_restarts: int = 8, fit_options=None) -> SelectionResult:
  """VanillaFit: (B / D^beta + E)^alpha on the D > 0 points, Huber loss on log L."""
  return fit_law_views("VanillaFit", laws.vanilla_law(), [visible], metadata, key=key,
                       use_zero_shot=False, num_restarts=num_restarts,
                       fit_options=fit_options)[0]


def rectified_fit(visible: VisibleCurves, metadata: Metadata, *, key: jax.Array,
                  num_restarts: int = 8, fit_options=None) -> SelectionResult:
  """RectifiedFit ("OurFit"): B / (D_l + D^beta) + E on all points incl. D = 0."""
  return fit_law_views("RectifiedFit", laws.rectified_law(), [visible], metadata, key=key,
                       use_zero_shot=True, num_restarts=num_restarts,
                       fit_options=fit_options)[0]


def lensllm(visible: VisibleCurves, metadata: Metadata, *, key: jax.Array,
            num_restarts: int = 8, f_term: Callable | None = None, aux: Any = None,
            fit_options=None) -> SelectionResult:
  """LensLLM: B / (F + D^beta) + E on all points incl. D = 0.

  Args:
    f_term: None (curve mode, F a fitted scalar per model) or a jax-traceable
      F(t, aux) (e.g. `ntk.ntk_test_loss` on per-model eigenpairs), with
    aux: per-model pytree with leading axis [M] (required with f_term).
  """
  if (f_term is None) != (aux is None):
    raise ValueError("LensLLM: pass both f_term and aux (NTK mode) or neither (curve mode)")
  return fit_law_views("LensLLM", laws.lensllm_law(f_term), [visible], metadata, key=key,
                       use_zero_shot=True, num_restarts=num_restarts, aux=aux,
                       fit_options=fit_options)[0]
