"""Pooled (hierarchical) LensLLM curve-mode fits: all models of a task at once (PooledLensLLM).

The law is LensLLM's in curve mode (`laws.lensllm_law()`, F a fitted scalar):

    L_m(D) = B_m / (F_m + D^beta_m) + E_m,     m = 1..M models of one task,

with the raw parameters of `laws.lensllm_law()`:
theta_m = [log(B_m / F_m), softplus^-1(beta_m), log E_m, log F_m].

Independent per-model fits (the published LensLLM / rectified fits) are
unstable at small budgets: a handful of points cannot pin down the exponent
and the floor, and one wild extrapolation ruins the Pearson correlation of the
whole ranking. Here the models of a task are fitted JOINTLY, with an
empirical-Bayes (hierarchical) Gaussian prior that pulls per-model "shape"
quantities towards an across-model mean (or a regression on model
covariates). With

    phi_m = [log beta_m, log E_m, log D_t,m],   D_t,m = F_m^(1 / beta_m)

(D_t is the data size where D^beta = F, i.e. where the curve turns from the
pre-power to the power phase), the MAP objective is

    J(theta) = sum_{m,p} w_mp rho(r_mp)  +  strength * sum_{g in pooled} ||(I - H) phi_{:,g}||^2
               + lambda_E sum_m E_m^2,

    r_mp = log L_m(D_p; theta_m) - log L_mp   (observed, visible points only),
    rho(r) = r^2 (squared) or 2 huber_delta(r) (robust), w_mp point weights,
    H = X (X^T X)^+ X^T the hat matrix of the covariates X [M, C]
        (C = 1: the column of ones, i.e. shrinkage to the across-model mean;
         more columns: the prior mean is a linear function of standardised
         log model size and log zero-shot loss). The prior means are profiled
         out exactly (the hat matrix), which is the MAP of a flat hyper-prior.

(lambda_E, `floor_prior`, optional: a Gaussian prior at 0 on the floor E in
loss units.) `strength` = s^2 / tau^2 is the ratio of the point noise variance to the
prior variance; because the data term is a SUM over points, pooling is
automatically stronger when fewer points are visible. `strength = 0` gives
back independent per-model fits (the published LensLLM curve mode).

Optimisation: Levenberg-Marquardt on the stacked residual vector
(`solver`: `fitting.scale_by_gauss_newton`'s step with Marquardt's damping
schedule, 60 steps by default, float64), `jax.vmap`-ed over problems (budget
views x settings). It starts from independent fits (`fitting.fit_curves`, best of
several restarts per model: a continuation from strength 0) and from the same
fits with every beta set to the across-model median; the lower MAP objective
wins.

Selection: `pooled_lensllm` (one budget view, the signature of the methods in
`selection`) and `pooled_selection` (many views x settings in one batch)
rank models by the pooled fit's L(D*), method name "PooledLensLLM"
(`METHOD_NAME`); they accept only `core.VisibleCurves`. Settings are chosen
by `protocol.leave_one_out`; under that protocol this fit is the
PooledLensLLM candidate of `plus.candidates` (the early-stopping procedure
with it is `plus.candidates.budgeted_candidate_selection`), and LensLLM+ of
experiments.lensllm_plus is the candidate chosen there (the pooled fit, the
curve PFN, the dynamic-F law or a blend with AtS); single-view
`pooled_lensllm` is the pooled fit with the given (default: untuned) setting.

Measured outcome: results/lensllm_plus/lensllm_plus.md (written by
experiments.lensllm_plus; summarised in docs/lensllm_plus.md).

Everything here is pure; `fit_pooled` enables float64 inside the call.

Modules:

  config           Settings of one pooled fit (`PooledConfig`), the pooled quantities and the
                   method's name.
  objective        The pooled fit's MAP objective: residuals, shape quantities, covariates,
                   normal equations.
  solver           The pooled fit's solver: `fitting`'s Levenberg-Marquardt step on the MAP
                   objective, vmapped.
  empirical_bayes  Empirical-Bayes prior strengths of the pooled fit, from independent fits.
  backtest         The backtest: a prior strength per budget view chosen from its visible data.
  method           PooledLensLLM: model selection by the pooled fit's predicted L(D*).

Every public name of these modules is re-exported here
(`from lensllm_jax.selection.pooled import NAME`):

  config: COVARIATES, DEFAULT_CONFIG, METHOD_NAME, POOLABLE, PooledConfig
  objective: covariate_matrix, hat_matrix, normal_equations, pooled_objective,
    pre_power_weights, residual_vector, shape_quantities, view_covariates
  solver: PooledFit, fit_pooled, median_beta_start
  empirical_bayes: empirical_bayes_strength, paule_mandel_tau2
  backtest: BACKTEST_STRENGTHS, backtest_strengths, cut_view
  method: pooled_lensllm, pooled_selection
"""

from lensllm_jax.selection.pooled import (
  backtest,
  config,
  empirical_bayes,
  method,
  objective,
  solver,
)
from lensllm_jax.selection.pooled.backtest import (
  BACKTEST_STRENGTHS,
  backtest_strengths,
  cut_view,
)
from lensllm_jax.selection.pooled.config import (
  COVARIATES,
  DEFAULT_CONFIG,
  METHOD_NAME,
  POOLABLE,
  PooledConfig,
)
from lensllm_jax.selection.pooled.empirical_bayes import (
  empirical_bayes_strength,
  paule_mandel_tau2,
)
from lensllm_jax.selection.pooled.method import pooled_lensllm, pooled_selection
from lensllm_jax.selection.pooled.objective import (
  covariate_matrix,
  hat_matrix,
  normal_equations,
  pooled_objective,
  pre_power_weights,
  residual_vector,
  shape_quantities,
  view_covariates,
)
from lensllm_jax.selection.pooled.solver import PooledFit, fit_pooled, median_beta_start

__all__ = [
  "config",
  "objective",
  "solver",
  "empirical_bayes",
  "backtest",
  "method",
  "COVARIATES",
  "DEFAULT_CONFIG",
  "METHOD_NAME",
  "POOLABLE",
  "PooledConfig",
  "covariate_matrix",
  "hat_matrix",
  "normal_equations",
  "pooled_objective",
  "pre_power_weights",
  "residual_vector",
  "shape_quantities",
  "view_covariates",
  "PooledFit",
  "fit_pooled",
  "median_beta_start",
  "empirical_bayes_strength",
  "paule_mandel_tau2",
  "BACKTEST_STRENGTHS",
  "backtest_strengths",
  "cut_view",
  "pooled_lensllm",
  "pooled_selection",
]
