"""Settings of one pooled fit (`PooledConfig`), the pooled quantities and the method's name."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["COVARIATES", "DEFAULT_CONFIG", "METHOD_NAME", "POOLABLE", "PooledConfig"]

# The pooled fit's method name (tables, registry, candidate of `plus.candidates`); "LensLLM+"
# names only the candidate the leave-one-dataset-out protocol chooses
# (`plus.candidates.PLUS_NAME`).
METHOD_NAME = "PooledLensLLM"

POOLABLE = ("beta", "E", "Dt")
COVARIATES = ("none", "size", "size_zero_shot")


@dataclasses.dataclass(frozen=True)
class PooledConfig:
  """Settings (hyper-parameters) of one pooled fit.

  Attributes:
    strength: prior precision ratio s^2 / tau^2 (>= 0); 0 = independent fits.
    pooled: which shape quantities share the prior, a subset of POOLABLE
      ("beta": log beta, "E": log E, "Dt": log of the transition size D_t).
    covariates: prior mean model, one of COVARIATES: "none" (across-model
      mean), "size" (+ standardised log parameter count), "size_zero_shot"
      (+ standardised log zero-shot loss: every model's L(0) must be revealed,
      else `pooled_selection` refuses the view; the others need no zero-shot
      point, nor does the backtest).
    pre_power_weight: weight w of the points before each model's AtS phase
      transition (the zero-shot point included); power-phase points weigh 1.
    huber_delta: None for squared log residuals, else the Huber threshold (in
      log-loss units, or in noise sds if `huber_relative`) of a robust loss.
    huber_relative: if True, the threshold is huber_delta * sigma, sigma the
      point noise sd of the view (sqrt of the s^2 of
      `empirical_bayes_strength`, from the independent fits of the visible
      data): a scale-free threshold (1.345 sigma is the textbook Huber choice).
    empirical_bayes: if True, the prior strength of each pooled quantity g is
      estimated from the visible data (`empirical_bayes_strength`:
      s^2 / tau_g^2) and `strength` is a multiplier kappa on it.
    floor_prior: lambda_E >= 0 of a Gaussian prior centred at 0 on the floor
      E_m itself (loss units): adds lambda_E sum_m E_m^2 to J, pulling the
      saturation level down (0: none).
    backtest: k > 1 chooses the strength per budget view from the visible
      data alone: each strength of BACKTEST_STRENGTHS is fitted on the view
      cut at D_max / k, scored by PearCorr + RelAcc of its predictions of
      the observed losses at the view's largest D against them, and the
      best is refitted on the whole view (`strength` is then ignored; 0 off).
  """
  strength: float = 0.0
  pooled: tuple[str, ...] = ("beta", "E")
  covariates: str = "none"
  pre_power_weight: float = 1.0
  huber_delta: float | None = None
  empirical_bayes: bool = False
  floor_prior: float = 0.0
  backtest: int = 0
  huber_relative: bool = False

  def __post_init__(self):
    if not self.strength >= 0:
      raise ValueError(f"PooledConfig.strength must be >= 0, got {self.strength}")
    bad = [g for g in self.pooled if g not in POOLABLE]
    if bad:
      raise ValueError(f"PooledConfig.pooled: unknown {bad}; expected a subset of {POOLABLE}")
    if self.covariates not in COVARIATES:
      raise ValueError(f"PooledConfig.covariates={self.covariates!r}; expected one of "
                       f"{COVARIATES}")
    if not self.pre_power_weight > 0:
      raise ValueError(f"PooledConfig.pre_power_weight must be > 0, got {self.pre_power_weight}")
    if self.backtest < 0 or self.backtest == 1:
      raise ValueError(f"PooledConfig.backtest must be 0 (off) or > 1, got {self.backtest}")
    if not self.floor_prior >= 0:
      raise ValueError(f"PooledConfig.floor_prior must be >= 0, got {self.floor_prior}")
    if self.huber_delta is not None and not self.huber_delta > 0:
      raise ValueError(f"PooledConfig.huber_delta must be > 0 or None, got {self.huber_delta}")
    if self.huber_relative and self.huber_delta is None:
      raise ValueError("PooledConfig.huber_relative needs a huber_delta (in noise sds)")

  @property
  def name(self) -> str:
    """Short unique label, e.g. 's=0.001,pool=beta+E,cov=none,wpre=1,huber=none'."""
    s = "bt" if self.backtest else f"{self.strength:g}"
    return (f"s={s},pool={'+'.join(self.pooled) or '-'},cov={self.covariates},"
            f"wpre={self.pre_power_weight:g},huber="
            f"{'none' if self.huber_delta is None else f'{self.huber_delta:g}'}"
            + ("sd" if self.huber_relative else "")
            + (",eb" if self.empirical_bayes else "")
            + (f",floor={self.floor_prior:g}" if self.floor_prior else "")
            + (f",backtest={self.backtest}" if self.backtest else ""))

  def arrays(self) -> tuple[np.ndarray, ...]:
    """Traced form: (strength per group [3], covariate column mask [3], w_pre, delta, lambda_E).

    A relative Huber threshold must be resolved first (`pooled_selection` does).
    """
    if self.huber_relative:
      raise ValueError(f"{self.name}: resolve the relative Huber threshold (times the noise sd) "
                       "before fitting; pooled_selection does this")
    group = np.array([self.strength if g in self.pooled else 0.0 for g in POOLABLE])
    cols = {"none": [1, 0, 0], "size": [1, 1, 0], "size_zero_shot": [1, 1, 1]}[self.covariates]
    delta = np.inf if self.huber_delta is None else float(self.huber_delta)
    return (group, np.array(cols, np.float64), np.float64(self.pre_power_weight),
            np.float64(delta), np.float64(self.floor_prior))


# A middle-of-the-grid default for direct calls, NOT a tuned value; experiments
# choose settings with `protocol.leave_one_out` instead.
DEFAULT_CONFIG = PooledConfig(strength=1e-2, pooled=("beta",), covariates="none")
