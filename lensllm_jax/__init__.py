"""lensllm_jax: LensLLM (Zeng et al., ICML 2025) and its baselines in JAX.

The subpackages read top-down as the data flows; each imports only the ones
above it (`tests/test_imports.py`):

  curves     fine-tuning curve files (public format of Lin et al. 2024)
  models     Flax causal and encoder-decoder LMs, Hugging Face conversion, presets
  theory     empirical NTKs and F(Theta, t), Hessian spectra, PAC-Bayes, HT-SR metrics
  training   text data, sharding, optax fine-tuning with orbax checkpoints, the subset
             sweeps that write curve files, the zoo pre-trained here
  laws       laws of test loss vs data size, their batched float64 fitting, phases
  selection  the selection methods, their registry, metrics, compute and budget
  plus       LensLLM+: candidate predictors (pooled fits, curve PFNs) and the protocol

and five modules every layer may use: `errors` (the project's error types
for bad user input), `progress` (a bar or log lines for long loops), `rundir` (output directories and workdirs: manifests,
locks, append-only files that survive kills), `xla_workarounds` (guards
against known XLA bugs that silently change numbers, and the one place for the XLA
compiler options of the project's programs on CPU) and `host_memory` (glibc
malloc settings that let each XLA:CPU step reuse the last one's buffers; the
binaries apply them at start); `data/` holds the public
curve files with their notice and the PFN weights.

Subpackages load on first use (`lensllm_jax.laws` or `from lensllm_jax import
laws`), so `import lensllm_jax` is cheap. Importing reads only jaxlib's
installed version and, on jaxlib < 0.11, changes one setting: it turns off
XLA:CPU's YNNPACK reduce fusions, which compute some fusions wrongly in jaxlib
0.10.2 (`xla_workarounds`; it only appends a flag to XLA_FLAGS, and leaves
XLA_FLAGS alone if it already names that flag).
"""

import importlib

from lensllm_jax import xla_workarounds

xla_workarounds.disable_cpu_ynn_fusions()

__version__ = "0.1.0"

SUBPACKAGES = ("curves", "models", "theory", "training", "laws", "selection", "plus")
MODULES = ("errors", "progress", "rundir", "xla_workarounds", "host_memory")
__all__ = [*SUBPACKAGES, *MODULES]


def __getattr__(name):
  if name in SUBPACKAGES or name in MODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(SUBPACKAGES) | set(MODULES))
