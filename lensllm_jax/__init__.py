"""lensllm_jax: LensLLM (Zeng et al., ICML 2025) and its baselines in JAX.

The public surface is a set of modules, each one concept:

  errors       the bad-input error types (curve file, config, checkpoint, data, workdir)
  rundir       output directories: one writer (lock), a manifest of what produced them
  benchmarks   fine-tuning curve files (public format of Lin et al. 2024)
  laws         vanilla, rectified and LensLLM laws of test loss vs data size
  fitting      jit-compiled float64 fitting of many curves at once
  phases       pre-power -> power phase transition (AtS test)
  selection    ZeroShot, SubTuning, ModelSize, VanillaFit, RectifiedFit, AtS, LensLLM
  pooled       LensLLM+ : the pooled curve-mode predictor
  methods      the registry of all methods by name (METHODS, run_method)
  protocol     leave-one-dataset-out choice of hyper-parameters
  metrics      PearCorr, RelAcc, Spearman, Kendall, curve RMSE
  budgeted     compute accounting and budgeted selection with early stopping
  published    the published tables of Lin et al. (2024)
  ntk          empirical NTKs, F(Theta, t), kernel distance, NTK recorder
  nt_compat    makes neural-tangents 0.6.5 import on current JAX
  hessian      matrix-free Hessian spectra (Lanczos, Hutchinson, SLQ)
  pac_bayes    Hessian-based PAC-Bayes layer quantities (Ju et al. 2022)
  models       Flax GPT-2 / Llama causal LMs and Hugging Face conversion
  nlp_metrics  heavy-tailed self-regularisation alpha of weight matrices
  textdata     datasets loading, formatting, nested subsets, tokenisation
  training     optax train step, evaluation, early stopping, orbax checkpoints
  sharding     data-parallel meshes over all devices
  zoo, study_tasks   the project's own model zoo and downstream tasks
  xla_workarounds    guards against known XLA bugs that silently change numbers

Modules load on first use (`lensllm_jax.ntk` or `from lensllm_jax import ntk`),
so `import lensllm_jax` is cheap. Importing does no I/O and changes one
setting: it turns off XLA:CPU's YNNPACK reduce fusions, which compute some
fusions wrongly in jaxlib 0.10.2 (`xla_workarounds`; it only appends a flag to
XLA_FLAGS, and leaves XLA_FLAGS alone if it already names that flag).
"""

import importlib

from lensllm_jax import xla_workarounds

xla_workarounds.disable_cpu_ynn_fusions()

__version__ = "0.1.0"

_SUBMODULES = (
    "benchmarks", "budgeted", "errors", "fitting", "hessian", "laws", "methods", "metrics", "models",
    "nlp_metrics", "nt_compat", "ntk", "pac_bayes", "phases", "pooled", "protocol",
    "published", "rundir", "selection", "sharding", "study_tasks", "textdata", "training", "zoo",
)
__all__ = list(_SUBMODULES)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES))
