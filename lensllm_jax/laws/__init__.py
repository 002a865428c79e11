"""Laws of test loss against fine-tuning set size, their batched float64 fitting, phases.

Modules:

  forms        Fine-tuning laws L(D) in log space, with constraints by re-parametrisation.
  fitting      Batched fitting of fine-tuning laws: one jit-compiled optax loop for all curves.
  phases       Pre-power -> power phase transition test of Lin et al. (2024) ("AtS").
  dynamic_law  LensLLM with NTK dynamics: the pre-power term F decays as the fine-tuning set grows.

Every public name of these modules is re-exported here
(`from lensllm_jax.laws import NAME`):

  forms: Law, inverse_softplus, lensllm_law, rectified_law, tie_break_law, vanilla_law,
    LAW_FACTORIES, get_law,
    NUM_INIT_UNIFORMS, ZERO_DATA_SIZE, VANILLA_HUBER_DELTA, uniforms_from_key, LAW_CACHE_SIZE, f_term_key,
    law_cache_size
  fitting: AMPLITUDE_LIMIT, STATUS_NAMES, FitOptions, FitResult, degenerate_reason, fit_curves, initial_params,
    not_decreasing, TrustRegionState, scale_by_damped_newton, scale_by_gauss_newton
  phases: phase_transition, power_phase_line
  dynamic_law: ntk_dynamic_law, spectral_f, spectral_lensllm_law, study_steps
"""

from lensllm_jax.laws import dynamic_law, fitting, forms, phases
from lensllm_jax.laws.dynamic_law import (
  ntk_dynamic_law,
  spectral_f,
  spectral_lensllm_law,
  study_steps,
)
from lensllm_jax.laws.fitting import (
  AMPLITUDE_LIMIT,
  STATUS_NAMES,
  FitOptions,
  FitResult,
  TrustRegionState,
  degenerate_reason,
  fit_curves,
  initial_params,
  not_decreasing,
  scale_by_damped_newton,
  scale_by_gauss_newton,
)
from lensllm_jax.laws.forms import (
  LAW_CACHE_SIZE,
  LAW_FACTORIES,
  NUM_INIT_UNIFORMS,
  VANILLA_HUBER_DELTA,
  ZERO_DATA_SIZE,
  Law,
  f_term_key,
  get_law,
  inverse_softplus,
  law_cache_size,
  lensllm_law,
  rectified_law,
  tie_break_law,
  uniforms_from_key,
  vanilla_law,
)
from lensllm_jax.laws.phases import (
  phase_transition,
  power_phase_line,
)

__all__ = [
  "forms",
  "fitting",
  "phases",
  "dynamic_law",
  "Law",
  "inverse_softplus",
  "lensllm_law",
  "rectified_law",
  "tie_break_law",
  "vanilla_law",
  "LAW_FACTORIES",
  "get_law",
  "NUM_INIT_UNIFORMS",
  "ZERO_DATA_SIZE",
  "VANILLA_HUBER_DELTA",
  "uniforms_from_key",
  "LAW_CACHE_SIZE",
  "f_term_key",
  "law_cache_size",
  "AMPLITUDE_LIMIT",
  "STATUS_NAMES",
  "FitOptions",
  "FitResult",
  "degenerate_reason",
  "fit_curves",
  "initial_params",
  "not_decreasing",
  "TrustRegionState",
  "scale_by_damped_newton",
  "scale_by_gauss_newton",
  "phase_transition",
  "power_phase_line",
  "ntk_dynamic_law",
  "spectral_f",
  "spectral_lensllm_law",
  "study_steps",
]
