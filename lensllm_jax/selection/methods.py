"""The registry of selection methods: every method by its published name.

This module sits on top of the method modules and imports them; they never
import it (the package's imports form a DAG, `tests/test_imports.py`):

    laws, fitting, phases -> selection -> pooled -> methods -> budgeted

Every method has the signature of `selection`:

    method(visible: VisibleCurves, metadata: Metadata, **options) -> SelectionResult

- `DETERMINISTIC_METHODS`: ZeroShot, SubTuning, ModelSize, AtS (no PRNG key).
- `FITTED_METHODS`: VanillaFit, RectifiedFit, LensLLM (`selection`) and
  LensLLM+ (`pooled.lensllm_plus`); they need `key`.
- `METHOD_READS`: which visible points each method reads, the rule of the
  compute accounting (`budgeted.method_flops`, docs/selection.md): "none",
  "zero" (D = 0 only, free), "last" (the largest visible D), "positive" (all
  D > 0), "all".
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from lensllm_jax.selection import core, pooled

__all__ = [
  "DETERMINISTIC_METHODS",
  "FITTED_METHODS",
  "METHODS",
  "METHOD_READS",
  "Method",
  "run_method",
]

Method = Callable[..., core.SelectionResult]

DETERMINISTIC_METHODS: dict[str, Method] = {
    "ZeroShot": core.zero_shot,
    "SubTuning": core.sub_tuning,
    "ModelSize": core.model_size,
    "AtS": core.ats,
}

FITTED_METHODS: dict[str, Method] = {
    "VanillaFit": core.vanilla_fit,
    "RectifiedFit": core.rectified_fit,
    "LensLLM": core.lensllm,
    pooled.METHOD_NAME: pooled.lensllm_plus,
}

METHODS: dict[str, Method] = {**DETERMINISTIC_METHODS, **FITTED_METHODS}

METHOD_READS: dict[str, str] = {
    "ZeroShot": "zero", "SubTuning": "last", "ModelSize": "none", "AtS": "positive",
    "VanillaFit": "positive", "RectifiedFit": "all", "LensLLM": "all", pooled.METHOD_NAME: "all",
}


def run_method(name: str, visible: core.VisibleCurves, metadata: core.Metadata, *,
               key: jax.Array | None = None, **options) -> core.SelectionResult:
  """Runs a method by name; fitted methods need `key`."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
  if name in FITTED_METHODS:
    if key is None:
      raise ValueError(f"{name} needs a PRNG key (key=jax.random.key(...))")
    return METHODS[name](visible, metadata, key=key, **options)
  return METHODS[name](visible, metadata, **options)
