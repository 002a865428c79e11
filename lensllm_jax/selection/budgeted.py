"""Compute cost accounting and budgeted selection with early stopping.

Cost (docs/selection.md). Fine-tuning a model with N parameters on D samples
of T tokens costs about 6 N D T FLOPs. T is the same for all (model, D)
pairs of a dataset, so it cancels in every ratio we report; we charge
6 N D per (model, D) pair read (the zero-shot point D = 0 is free) and
report FLOPs per token together with the ratio to FullTuning (every model
fine-tuned on D*: sum_m 6 N_m D*).

Budgeted selection (the LensLLM efficiency claim). All models start at the
zero-shot point. Step s reveals, for every still-active model, the loss at
D_s = 200 * 2^s (paying 6 N D_s), refits the law on each model's revealed
points and computes a Gaussian (Laplace / delta-method) uncertainty of the
predicted log L(D*):

    Sigma = s^2 (J^T J + lam I)^-1,    sd_m = sqrt(g_m^T Sigma_m g_m),

with J [n, K] the Jacobian of the log-loss residuals w.r.t. the raw
parameters at the fit, g = d log L(D*) / d raw, lam a tiny ridge
(1e-9 tr(J^T J) / K, so unidentified directions give a huge -- i.e.
conservative -- sd instead of an error), and s^2 the residual variance
pooled over the models of the run, sum RSS / sum (n - K) (one shared noise
level on log L: all models are evaluated on the same test set, and single
curves with n close to K would give degenerate estimates). The first-order
delta method is invariant to the parametrisation.

Huber objectives (VanillaFit: sum of Huber losses h of the log residuals,
threshold delta) get the sandwich (M-estimator) variance instead,

    Sigma = (E[psi^2] / E[psi']^2) (J^T J + lam I)^-1,    psi = h' = clip(r, -delta, delta),

with E[psi^2] = sum psi(r)^2 / sum (n - K) over the pool (the meat, from the
residuals) and E[psi'] = P(|e| < delta) = erf(delta / (sqrt(2) s)) for
e ~ N(0, s^2), s^2 the pooled residual variance above (the bread). The
empirical count of |r| < delta cannot serve as E[psi']: with delta much
smaller than the noise (VanillaFit's 1e-3) the fit interpolates about K
points, whose psi' = 1 would make the variance far too small. For the
squared objective psi(r) = r, psi' = 1 and the sandwich is the formula above;
for delta << s it tends to (pi / 2) s^2 (J^T J)^-1, the least-absolute-
deviations variance. The budget methods are `BUDGET_METHODS` (the fitted
methods with independent per-model fits); PooledLensLLM (a pooled MAP fit
with a prior) is not one of them: its budgeted run, as LensLLM+'s, is
`plus.candidates.budgeted_candidate_selection`.

Once each model has at
least `min_points` revealed D > 0 points (default K = 4, the number of law
parameters, so that n - K > 0 with the zero-shot point), an active model m
is stopped when it is confidently worse than the best active one:

    log L_m - z sd_m > min_j (log L_j + z sd_j)     (j active),

z the confidence level (one-sided normal quantile). The procedure ends when
one model is left or D_s reaches `max_data_num`. Final ranking: surviving
models by predicted L(D*), then stopped models by their last prediction.

The simulation is exact on public curves: a `CurveOracle` holds the curves
privately and releases a loss only when it is paid for; the procedure sees
`VisibleCurves` views of the paid points only.

Batching. A model's revealed points are its zero-shot point and a prefix of
the grid, and its fit draws its restarts from (key, model, prefix length)
(`prefix_uniforms`), so the fit is a function of (model, prefix): each is
computed once and shared by all steps and levels; a step fits, in one
compiled call of fixed shape, only the models active in some level that has
not ended. Steps before the first stopping decision are not fitted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax import laws
from lensllm_jax.curves import benchmarks
from lensllm_jax.selection import core, methods

FLOPS_PER_PARAM_SAMPLE = 6.0
# Methods `budgeted_selection` runs: independent per-model fits whose objective
# `laplace_log_sd` knows (squared error, or Huber through the sandwich); `Method.budgeted`.
BUDGET_METHODS = tuple(m.name for m in methods.REGISTRY if m.budgeted)


def pair_flops(sizes, data_sizes) -> np.ndarray:
  """[M, P] cost 6 N D of fine-tuning each model on each data size (per token)."""
  return FLOPS_PER_PARAM_SAMPLE * np.outer(np.asarray(sizes, np.float64),
                                           np.asarray(data_sizes, np.float64))


def full_tuning_flops(sizes, target_data_num: float) -> float:
  """Cost of FullTuning: every model fine-tuned on D* (per token)."""
  return float(pair_flops(sizes, [target_data_num]).sum())


def reads_flops(reads: str, sizes, data_sizes, max_data_num: float) -> float:
  """Cost of a fixed-budget method that reads the visible points `reads` names.

  Args:
    reads: one of `methods.READS` ("none", "zero", "last", "positive", "all").
    sizes: [M] parameter counts.
    data_sizes: [P] the D grid of the curve file.
    max_data_num: the budget D_max.
  """
  if reads not in methods.READS:
    raise ValueError(f"no cost rule for reads={reads!r}; known: {methods.READS}")
  d = np.asarray(data_sizes, np.float64)
  d = d[(d > 0) & (d <= max_data_num)]  # D = 0 is free
  if reads in ("none", "zero") or d.size == 0:
    return 0.0
  if reads == "last":
    d = d[-1:]
  return float(pair_flops(sizes, d).sum())


def method_flops(method: str, sizes, data_sizes, max_data_num: float) -> float:
  """`reads_flops` of a registry method: the points its record reads (`Method.reads`)."""
  reads = methods.METHOD_READS.get(method)
  if reads is None:
    raise ValueError(f"no cost rule for method {method!r}; known: {sorted(methods.METHOD_READS)}")
  return reads_flops(reads, sizes, data_sizes, max_data_num)


class CurveOracle:
  """Releases fine-tuning losses only when paid for (exact simulation).

  The full CurveSet is held privately; `view()` builds a VisibleCurves of the
  paid points only (unpaid entries are NaN copies, never the true values).
  Unmeasured cells (NaN) are allowed where nothing pays for them (the replay of
  an online run's curves.csv); paying for one is a KeyError naming it.
  """

  def __init__(self, curves):
    self._curves = curves
    if not np.asarray(curves.measured)[:, np.asarray(curves.data_sizes) == 0].all():
      raise benchmarks.CurveFormatError(f"{curves.source}: a zero-shot (D = 0) cell is empty")
    self._flops = pair_flops(curves.sizes, curves.data_sizes)
    self.revealed = np.zeros(np.shape(curves.losses), bool)
    self.revealed[:, np.asarray(curves.data_sizes) == 0] = True  # zero-shot is free
    self.flops = 0.0

  @property
  def data_sizes(self) -> np.ndarray:
    return np.asarray(self._curves.data_sizes, np.float64)

  def _column(self, data_size: float) -> int:
    cols = np.flatnonzero(self.data_sizes == data_size)
    if cols.size != 1:
      raise KeyError(f"D={data_size:g} is not on the grid of {self._curves.source} "
                     f"({self.data_sizes.tolist()})")
    return int(cols[0])

  def cost(self, models, data_size: float) -> float:
    """What `reveal(models, data_size)` would pay."""
    col = self._column(data_size)
    models = np.asarray(models, int)
    return float(self._flops[models[~self.revealed[models, col]], col].sum())

  def reveal(self, models, data_size: float) -> None:
    """Pays 6 N D for each listed model at `data_size` (once per pair)."""
    cols = [self._column(data_size)]
    models = np.asarray(models, int)
    unmeasured = models[~np.isfinite(np.asarray(self._curves.losses)[models, cols[0]])]
    if unmeasured.size:
      raise KeyError(f"{self._curves.source}: model {self._curves.models[unmeasured[0]]!r} "
                     f"is not measured at D={data_size:g}")
    new = models[~self.revealed[models, cols[0]]]
    self.flops += float(self._flops[new, cols[0]].sum())
    self.revealed[new, cols[0]] = True

  def view(self, max_data_num: float) -> core.VisibleCurves:
    keep = self.data_sizes <= max_data_num
    revealed = np.where(keep[None, :], self.revealed, False)
    return core.visible_view(self._curves, max_data_num, revealed)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _laplace_parts(law, raw, d, target_data_num, aux):
  """log L at d [C, P], its Jacobian [C, P, K] and d log L(D*) / d raw [C, K]."""
  dstar = jnp.asarray([target_data_num])

  def one(theta, a):
    jac = jax.jacfwd(lambda t: law.log_loss(t, d, a))(theta)
    grad = jax.jacfwd(lambda t: law.log_loss(t, dstar, a)[0])(theta)
    return law.log_loss(theta, d, a), jac, grad

  return jax.vmap(one, in_axes=(0, 0 if aux is not None else None))(raw, aux)


def laplace_log_sd(law, raw_params, data_sizes, mask, log_loss, target_data_num: float,
                   *, aux=None, pool: np.ndarray | None = None) -> np.ndarray:
  """Delta-method sd of the predicted log L(D*) per curve (float64).

  Squared-error laws: s^2 g^T (J^T J)^-1 g; Huber laws (law.loss == "huber"):
  the sandwich of the module docstring, with s^2 replaced by
  E[psi^2] / E[psi']^2.

  Args:
    law: the fitted `laws.Law` (its `loss` and `huber_delta` pick the variance).
    raw_params: [C, K] fitted raw parameters.
    data_sizes: [P] data sizes of the columns.
    mask: [C, P] bool, points used by the fit.
    log_loss: [C, P] observed log L (ignored where mask is False).
    target_data_num: D*.
    aux: per-curve aux with leading axis [C] (NTK mode) or None.
    pool: optional [C] int group ids; s^2 is pooled within each group
      (default: one group).

  Returns:
    [C] sd of log L(D*) (inf where not estimable, e.g. n <= K for the pool).
  """
  raw = np.asarray(raw_params, np.float64)
  c, k = raw.shape
  mask = np.asarray(mask, bool)
  # Pad the points (masked) so that every step of a run shares one compilation.
  d_np = np.asarray(data_sizes, np.float64)
  pad = max(16, d_np.size) - d_np.size
  d_np = np.concatenate([d_np, np.full(pad, d_np[-1])])
  mask = np.concatenate([mask, np.zeros((c, pad), bool)], 1)
  log_loss = np.concatenate([np.asarray(log_loss, np.float64), np.zeros((c, pad))], 1)
  safe = np.where(np.isfinite(raw), raw, 0.0)
  # Pad the curves to a multiple of 128 (rows of zeros; aux repeats its first row): the
  # early-stopping rounds fit fewer levels as levels end, and would each compile anew.
  rows = -(-c // 128) * 128 - c
  safe = np.concatenate([safe, np.zeros((rows, k))])
  if aux is not None:
    aux = jax.tree.map(lambda a: np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[:1],
                                                                          rows, 0)]), aux)
  with jax.enable_x64(True):
    pred, jac, grad = (np.asarray(x)[:c] for x in _laplace_parts(
        law, jnp.asarray(safe), jnp.asarray(d_np), float(target_data_num), aux))
  y = np.where(mask, np.asarray(log_loss, np.float64), 0.0)
  resid = np.where(mask, pred - y, 0.0)
  rss = (resid ** 2).sum(1)
  n = mask.sum(1)
  if law.loss not in ("squared", "huber"):
    raise ValueError(f"laplace_log_sd: no variance for the {law.loss!r} objective of law "
                     f"{law.name!r} (squared, huber)")
  huber = law.loss == "huber"
  psi2 = (np.clip(resid, -law.huber_delta, law.huber_delta) ** 2).sum(1) if huber else rss
  groups = np.zeros(c, int) if pool is None else np.asarray(pool, int)
  s2 = np.full(c, np.inf)
  for g in np.unique(groups):
    sel = groups == g
    dof = np.maximum(n[sel] - k, 0).sum()
    if dof > 0:
      s2[sel] = psi2[sel].sum() / dof
      if huber:
        # Bread E[psi'] = P(|e| < delta) under e ~ N(0, s^2) (see module docstring).
        scale = math.sqrt(rss[sel].sum() / dof)
        slope = math.erf(law.huber_delta / (math.sqrt(2.0) * scale)) if scale > 0 else 1.0
        s2[sel] = s2[sel] / slope ** 2 if slope > 0 else np.inf
  jac = np.where(mask[:, :, None], jac, 0.0)
  jtj = np.einsum("cpk,cpl->ckl", jac, jac)
  lam = 1e-9 * np.trace(jtj, axis1=1, axis2=2) / k + 1e-300
  sd = np.full(c, np.inf)
  for i in range(c):
    if not (np.all(np.isfinite(raw[i])) and np.isfinite(s2[i])):
      continue
    sol = np.linalg.solve(jtj[i] + lam[i] * np.eye(k), grad[i])
    sd[i] = np.sqrt(max(s2[i] * float(grad[i] @ sol), 0.0))
  return sd


@dataclasses.dataclass(frozen=True, eq=False)
class BudgetedResult:
  """Outcome of one budgeted run.

  Attributes:
    z: confidence level (normal quantile) of the stopping rule.
    selection: SelectionResult (feature = last predicted L(D*) [M]).
    flops: total FLOPs per token paid.
    revealed: [M, P] bool points paid for (over the file's grid).
    stopped_at: [M] D of the last point revealed for each model.
    history: per step dict(data_size, active [M] bool (paid at this step),
      log_pred [M], sd [M], stopped [M] bool (stopped by this step's
      decision), flops (spent so far)) (log_pred, sd NaN at the unfitted steps
      before the first stopping step, `fit_prefixes` path).
    ended_by: "one model left", "size cap" (the last step was paid) or
      "compute cap" (`max_flops`).
    fit_status: [M] status (`laws.STATUS_NAMES`) of the fit behind each model's
      final prediction (a stopped model's: its fit at its stop); "" where the
      predictor reports no fit status.
    fit_status_ever: status -> [M] bool, the models one of whose fits read by
      a stopping decision (any round) ended with that status ("converged" not
      or "ok" not listed).
  """
  z: float
  selection: core.SelectionResult
  flops: float
  revealed: np.ndarray
  stopped_at: np.ndarray
  history: tuple
  ended_by: str = "size cap"
  fit_status: tuple = ()
  fit_status_ever: dict = dataclasses.field(default_factory=dict)



def still_active(active, log_pred, sd, z: float) -> np.ndarray:
  """The early-stopping rule: drops models confidently worse than the best.

  Model m stays active unless log L_m - z sd_m > min over active j of
  (log L_j + z sd_j), i.e. its optimistic bound is worse than the best
  pessimistic bound. Shapes: active [M] bool, log_pred [M], sd [M].
  """
  bar = np.nanmin(np.where(active, log_pred + z * sd, np.inf))
  return active & ~(log_pred - z * sd > bar)

def prefix_uniforms(key: jax.Array, model: int, num_revealed: int,
                    num_restarts: int) -> np.ndarray:
  """[R, laws.NUM_INIT_UNIFORMS] restart draws of one budgeted fit.

  Keyed by (key, model index, number of revealed D > 0 points) only: the fit
  of a model on a given revealed prefix of the grid is then the same at every
  round and confidence level, so it is computed once (`early_stopping_selection`).
  """
  k = jax.random.fold_in(jax.random.fold_in(key, model), num_revealed)
  return laws.uniforms_from_key(k, (num_restarts, laws.NUM_INIT_UNIFORMS))


def _num_revealed(oracle: CurveOracle, steps) -> np.ndarray:
  """[M] number of revealed points with D in `steps` (the revealed prefix length)."""
  return oracle.revealed[:, np.isin(oracle.data_sizes, steps)].sum(1)


def early_stopping_selection(curves, levels: Sequence[float], *, name: str,
                             max_data_num: float, target_data_num: float,
                             min_points: int | None = None, progress=None, predict_views=None,
                             fit_prefixes=None, oracles=None, steps=None,
                             max_flops: float | None = None, on_step=None
                             ) -> list[BudgetedResult]:
  """The early-stopping procedure of the module docstring, with any fit of the law.

  Each level z has its own oracle (its own paid points): by default a
  `CurveOracle` of `curves` (replay of complete curves); `oracles` may be any
  objects with the oracle interface (`data_sizes` [P] with D = 0 first,
  `revealed` [M, P], `flops`, `reveal(models, d)`, `view(d)`,
  `cost(models, d)`), e.g. one that pays by fine-tuning (the online
  procedure of `experiments.select`): the decisions are this one code path.
  Give exactly one of `predict_views`, `fit_prefixes`.

  Args:
    curves: a CurveSet (only the default oracles read it), or None with `oracles`.
    levels: confidence levels z (normal quantiles), e.g. (0.5, 1, 2, 4).
    name: method name in the result ("Budgeted(name, z=...)").
    max_data_num: largest D that may be paid for.
    target_data_num: D*.
    min_points: D > 0 points needed before stopping anyone (default K, the
      number of law parameters).
    progress: optional callable(str) for log lines.
    predict_views: a predictor with its own uncertainty, predict_views(views,
      step) -> (predicted L(D*) [V, M], sd of log L(D*) [V, M]) (e.g. the
      curve PFN), or a third element: the fit statuses [V, M] of a predictor
      that fits (None: it fits nothing); needs `min_points`.
    fit_prefixes: independent per-model fits that depend only on (model,
      revealed points): fit_prefixes(view, models [B], num_revealed) -> (law,
      raw [B, K], mask [B, P], predicted [B], fit status [B]) fits the B rows of `view` (rows
      of models `models`, each with its zero-shot point and its first
      `num_revealed` D > 0 points). Each (model, num_revealed) pair is fitted
      once, all levels together: a step fits only the models active in some
      unfinished level; stopped models and other levels reuse the cached fits
      (their parameters also enter the pooled s^2 of `laplace_log_sd`).
      With `min_points` given, the steps before the first stopping decision
      are not fitted (nothing reads them; unless it is the last step).
    oracles: one oracle per level (default `CurveOracle(curves)` each).
    steps: the sizes D_s paid in turn (default the oracle grid's D in (0,
      max_data_num]); each must be on the oracle's grid.
    max_flops: compute cap: a level ends (reason "compute cap") before a step
      whose cost (`oracle.cost` of its active models) would take its spend
      above it; the first step is always paid.
    on_step: optional fn(level index, history entry) after each step's
      decision (the entry also holds "stopped" [M] bool, the models stopped
      at this step, "flops" so far, and "ended_by" once the level ends).

  Returns:
    One BudgetedResult per level.
  """
  if (predict_views is None) == (fit_prefixes is None):
    raise ValueError("early_stopping_selection: pass exactly one of predict_views / "
                     "fit_prefixes")
  if predict_views is not None and min_points is None:
    raise ValueError("early_stopping_selection: predict_views needs min_points")
  levels = [float(z) for z in levels]
  oracles = [CurveOracle(curves) for _ in levels] if oracles is None else list(oracles)
  grid = np.asarray(oracles[0].data_sizes, np.float64)
  if steps is None:
    steps = grid[(grid > 0) & (grid <= max_data_num)]
  steps = np.asarray(steps, np.float64)
  if steps.size == 0:
    raise ValueError(f"no D in (0, {max_data_num}] on the oracle's grid {grid.tolist()}")
  m = oracles[0].revealed.shape[0]
  active = [np.ones(m, bool) for _ in levels]
  done = [False for _ in levels]
  ended_by = ["size cap" for _ in levels]
  last = [None for _ in levels]
  histories = [[] for _ in levels]
  stopped_at = [np.zeros(m) for _ in levels]
  cache = {}  # fit_prefixes: (model, num_revealed) -> (raw [K], mask [P'], predicted, status)
  statuses = [np.full(m, "", dtype=object) for _ in levels]  # behind `last`
  ever = [{} for _ in levels]  # status -> [M] bool, over the rounds' decisions
  for s, d_s in enumerate(steps):
    for i in range(len(levels)):
      if (not done[i] and s > 0 and max_flops is not None and oracles[i].flops
          + oracles[i].cost(np.flatnonzero(active[i]), d_s) > max_flops):
        done[i], ended_by[i] = True, "compute cap"
    if all(done):
      break
    for i in range(len(levels)):
      if not done[i]:
        oracles[i].reveal(np.flatnonzero(active[i]), d_s)
        stopped_at[i][active[i]] = d_s
    fitted = [i for i in range(len(levels)) if not done[i]]
    views = [oracles[i].view(d_s) for i in fitted]
    # fit_prefixes: no decision reads the fits before the first stopping step (unless
    # it is the last step), so they are skipped (history holds NaN there).
    skip = (fit_prefixes is not None and min_points is not None and s + 1 < min_points
            and s + 1 < steps.size and m > 1)
    if skip:
      predicted = np.full((len(fitted), m), np.nan)
      sd_all = np.full(len(fitted) * m, np.nan)
      step_status = None
      need = min_points
    elif predict_views is not None:
      predicted, sd_views, *rest = predict_views(views, s)
      sd_all = np.asarray(sd_views, np.float64).reshape(-1)
      step_status = rest[0] if rest else None
      need = min_points
    else:
      law, raw, mask, predicted, step_status = _cached_prefix_fits(fit_prefixes, cache, views, [
          _num_revealed(oracles[i], steps) for i in fitted], s + 1)
      need = law.num_params if min_points is None else min_points
      ylog = np.concatenate([np.log(np.where(v.mask, v.losses, 1.0)) for v in views])
      sd_all = laplace_log_sd(law, raw, views[0].data_sizes, mask, ylog, target_data_num,
                              pool=np.repeat(np.arange(len(fitted)), m))
    for j, i in enumerate(fitted):
      if done[i]:
        continue
      logp = predicted[j] if skip else np.log(np.where(np.isfinite(predicted[j]),
                                                        predicted[j], np.inf))
      sd = sd_all[j * m:(j + 1) * m]
      # Stopped models keep their last prediction.
      if last[i] is not None:
        logp = np.where(active[i], logp, last[i][0])
        sd = np.where(active[i], sd, last[i][1])
      last[i] = (logp, sd)
      if step_status is not None:
        st = np.asarray(step_status[j], dtype=object)
        statuses[i] = np.where(active[i], st, statuses[i])
        for name_ in set(st[active[i]]) - {"converged", "ok", ""}:
          ever[i][name_] = ever[i].get(name_, np.zeros(m, bool)) | (active[i] & (st == name_))
      entry = {"data_size": float(d_s), "active": active[i].copy(),
               "log_pred": logp.copy(), "sd": sd.copy(), "fit_status": statuses[i].copy()}
      histories[i].append(entry)
      if s + 1 >= need:
        active[i] = still_active(active[i], logp, sd, levels[i])
      if active[i].sum() <= 1:
        done[i], ended_by[i] = True, "one model left"
      entry.update(stopped=entry["active"] & ~active[i], flops=oracles[i].flops)
      if done[i] or s + 1 == steps.size:
        entry["ended_by"] = ended_by[i]
      if on_step is not None:
        on_step(i, entry)
    if progress is not None:
      progress(f"D={int(d_s)}: active per level " +
               ", ".join(f"z={levels[i]:g}:{int(active[i].sum())}" for i in range(len(levels))))
  out = []
  for i, z in enumerate(levels):
    logp, _ = last[i]
    # Survivors first (by prediction), then stopped models (by prediction).
    order = np.lexsort((np.where(np.isfinite(logp), logp, np.inf), ~active[i]))
    pred = np.exp(logp)
    res = core.SelectionResult(
        f"Budgeted({name}, z={z:g})", pred, order, predicted=pred,
        status=tuple("active" if a else "stopped" for a in active[i]),
        extras={"active": active[i].copy()})
    out.append(BudgetedResult(z=z, selection=res, flops=oracles[i].flops,
                              revealed=oracles[i].revealed.copy(),
                              stopped_at=stopped_at[i].copy(), history=tuple(histories[i]),
                              ended_by=ended_by[i], fit_status=tuple(statuses[i]),
                              fit_status_ever={k: v.copy() for k, v in ever[i].items()}))
  return out


def _cached_prefix_fits(fit_prefixes, cache: dict, views, num_revealed, step_count: int):
  """(law, raw, mask, predicted, status) of the fitted levels from per-(model, prefix) fits.

  Fits (one `fit_prefixes` call) the models that have `step_count` revealed
  points in some view and no cached fit yet; every other row comes from `cache`.

  Args:
    fit_prefixes: see `early_stopping_selection`.
    cache: (model, num_revealed) -> (raw [K], mask [P'], predicted, status), and "law";
      updated.
    views: the V fitted levels' VisibleCurves (same columns).
    num_revealed: V arrays [M], revealed D > 0 points per model.
    step_count: the current step's number of revealed points (active models).

  Returns:
    (law, raw [V M, K], mask [V M, P], predicted [V, M], fit status [V, M]).
  """
  m = views[0].num_models
  p = views[0].data_sizes.size
  new = {}  # model -> row of the view it is read from
  for v, n in zip(views, num_revealed, strict=True):
    for j in np.flatnonzero(n == step_count):
      if (int(j), step_count) not in cache and int(j) not in new:
        new[int(j)] = (v.losses[j], v.mask[j])
  if new:
    models = np.asarray(sorted(new))
    rows = core.VisibleCurves(
        data_sizes=views[0].data_sizes, losses=np.stack([new[j][0] for j in models]),
        mask=np.stack([new[j][1] for j in models]), max_data_num=views[0].max_data_num)
    law, raw, mask, predicted, status = fit_prefixes(rows, models, step_count)
    cache["law"] = law
    for r, j in enumerate(models):
      cache[(int(j), step_count)] = (np.asarray(raw[r]), np.asarray(mask[r], bool),
                                     float(predicted[r]), str(status[r]))
  raws, masks, preds, statuses = [], [], [], []
  for n in num_revealed:
    for j in range(m):
      raw_j, mask_j, pred_j, status_j = cache[(j, int(n[j]))]
      raws.append(raw_j)
      masks.append(np.concatenate([mask_j, np.zeros(p - mask_j.size, bool)]))
      preds.append(pred_j)
      statuses.append(status_j)
  return (cache["law"], np.stack(raws), np.stack(masks),
          np.asarray(preds, np.float64).reshape(len(views), m),
          np.asarray(statuses, dtype=object).reshape(len(views), m))


@dataclasses.dataclass(frozen=True)
class BudgetOptions:
  """What `budgeted_selection` runs (config.budget of the binaries).

  Attributes:
    levels: confidence levels z (one-sided normal quantiles), one result each,
      e.g. (0.5, 1, 2, 4).
    method: a name in `BUDGET_METHODS` (LensLLM, RectifiedFit: squared loss;
      VanillaFit: Huber loss, sandwich variance).
    max_data_num: the largest D that may be paid for.
    min_points: D > 0 points each model needs before anyone is stopped
      (None: the method's law's number of parameters K).
  """
  levels: tuple[float, ...]
  method: str = "LensLLM"
  max_data_num: float = 204800.0
  min_points: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "levels", tuple(float(z) for z in self.levels))
    if not self.levels:
      raise ValueError("BudgetOptions.levels is empty")
    if self.method not in BUDGET_METHODS:
      raise ValueError(f"BudgetOptions.method {self.method!r} is not supported (budget methods: "
                       f"{', '.join(BUDGET_METHODS)}; LensLLM+ has its own "
                       f"plus.candidates.budgeted_candidate_selection)")


def budgeted_selection(curves, options: BudgetOptions, *, key: jax.Array,
                       num_restarts: int = 8, fit_options=None, min_curves: int = 0,
                       target_data_num: float = core.TARGET_DATA_NUM,
                       progress=None) -> list[BudgetedResult]:
  """`early_stopping_selection` with the independent per-model fits of a fitted method.

  Args:
    curves: a CurveSet (only the oracles read it).
    options: the levels, the method, the size cap and min_points (`BudgetOptions`).
    key: PRNG key; the fit of model j on its first n D > 0 points draws its
      restarts from `prefix_uniforms(key, j, n, num_restarts)`.
    num_restarts, fit_options: passed to the fits (`fitting.FitOptions`).
    min_curves: pad the fit batch to at least this many curves (compile reuse;
      default the number of models rounded up to a multiple of 32).
    target_data_num: D*.
    progress: optional callable(str) for log lines.

  Returns:
    One BudgetedResult per level of `options.levels`.
  """
  method = options.method
  meta = core.metadata_of(curves, target_data_num)
  # Fixed batch: every step and every file of up to `batch` models share one compilation.
  batch = max(min_curves, -(-len(curves.models) // 32) * 32)

  def fit_prefixes(view, models, num_revealed):
    u = np.stack([prefix_uniforms(key, int(j), num_revealed, num_restarts) for j in models])
    res = methods.run_fitted_batch(method, [view], meta, key=key, num_restarts=num_restarts,
                                   fit_options=fit_options, min_curves=batch, uniforms=u)[0]
    return (res.predictor.law, res.predictor.raw_params, res.extras["mask"], res.predicted,
            res.status)

  min_points = options.min_points
  if min_points is None:
    min_points = methods.FITTED_LAWS[method][0]().num_params
  return early_stopping_selection(curves, options.levels, name=method,
                                  max_data_num=options.max_data_num,
                                  target_data_num=target_data_num, min_points=min_points,
                                  progress=progress, fit_prefixes=fit_prefixes)
