"""Fine-tuning curve files: the public format of Lin et al. (2024), reading and writing.

Modules:

  benchmarks  Fine-tuning curve files in the public format of Lin et al. (ICML 2024).

Every public name of these modules is re-exported here
(`from lensllm_jax.curves import NAME`):

  benchmarks: DEFAULT_URL_TEMPLATE, PACKAGED_DIR, CurveDownloadError, CurveFormatError, CurveSet,
    load_curves, parse_curves, require_complete, resolve_curve_file, write_curves
"""

from lensllm_jax.curves import benchmarks
from lensllm_jax.curves.benchmarks import (
  DEFAULT_URL_TEMPLATE,
  PACKAGED_DIR,
  CurveDownloadError,
  CurveFormatError,
  CurveSet,
  load_curves,
  parse_curves,
  require_complete,
  resolve_curve_file,
  write_curves,
)

__all__ = [
  "benchmarks",
  "DEFAULT_URL_TEMPLATE",
  "PACKAGED_DIR",
  "CurveDownloadError",
  "CurveFormatError",
  "CurveSet",
  "load_curves",
  "parse_curves",
  "require_complete",
  "resolve_curve_file",
  "write_curves",
]
