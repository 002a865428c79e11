"""The registry of selection methods: one `Method` record per method, registered once.

This module sits on top of the method modules and imports them; they never
import it (the package's imports form a DAG, `tests/test_imports.py`):

    laws, fitting, phases -> core -> pooled -> methods -> budgeted

Every method function has the signature of `core`:

    method(visible: VisibleCurves, metadata: Metadata, **options) -> SelectionResult

`REGISTRY` holds the records in the order of the published tables (Lin et al.
2024, Tables 1-2; then LensLLM, then this project's pooled fit). Every list
of methods the package uses is derived from it:

- `METHODS`: name -> Method; `PUBLISHED_METHODS`: the names with a paper.
- `DETERMINISTIC_METHODS` / `FITTED_METHODS`: name -> Method, without / with a
  PRNG key (random restarts).
- `METHOD_READS`: which visible points each method reads, the rule of the
  compute accounting (`budgeted.method_flops`, docs/selection.md): "none",
  "zero" (D = 0 only, free), "last" (the largest visible D), "positive" (all
  D > 0), "all".
- `FITTED_LAWS`: name -> (law factory, uses the zero-shot point) of the
  methods fitted independently per model, which `run_fitted_batch` batches
  and `budgeted.budgeted_selection` runs (`BUDGET_METHODS`).
- `CURVES`: name -> the per-model curve a method extrapolates L(D) with
  (rmse.csv's law column, `Method.curve`).
- `PROPOSED_METHODS`: the methods the papers propose (`Method.proposed`), the
  others being their baselines; LensLLM+ is reported beside them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from lensllm_jax import laws
from lensllm_jax.selection import core, pooled

__all__ = [
  "CURVES",
  "DETERMINISTIC_METHODS",
  "FITTED_LAWS",
  "FITTED_METHODS",
  "METHODS",
  "METHOD_READS",
  "Method",
  "PROPOSED_METHODS",
  "PUBLISHED_METHODS",
  "REGISTRY",
  "run_fitted_batch",
  "run_method",
]

READS = ("none", "zero", "last", "positive", "all")
LIN_2024 = "Lin et al., Selecting Large Language Model to Fine-tune via Rectified Scaling Law, ICML 2024"
ZENG_2025 = ("Zeng et al., LensLLM: Unveiling Fine-Tuning Dynamics for LLM Selection, ICML 2025 "
             "(curve mode)")


@dataclasses.dataclass(frozen=True)
class Method:
  """Everything the package knows about one selection method.

  Attributes:
    name: the method's name in configs, tables and result files.
    function: method(visible, metadata, **options) -> core.SelectionResult.
    reads: the visible points it reads (compute accounting): one of `READS`.
    needs_key: whether it draws random restarts (takes `key=`).
    law: the `laws.get_law` name of the law it fits ("vanilla", "rectified",
      "lensllm"), None when it fits no law.
    budgeted: whether `budgeted.budgeted_selection` can run it (independent
      per-model fits whose objective `budgeted.laplace_log_sd` knows).
    paper: the paper that defines it; None for this project's own methods.
    proposed: whether its paper proposes it (Lin et al. 2024: the rectified law
      and AtS; Zeng et al. 2025: LensLLM), rather than comparing with it.
    curve: the name of the per-model curve it extrapolates L(D) with, for the
      held-out RMSE (rmse.csv's law column): its law's name for the
      independent fits, "ats" for AtS's power line; None for the methods
      with no per-model curve (and for the pooled fit, whose curves share
      parameters across models).
  """
  name: str
  function: Callable[..., core.SelectionResult]
  reads: str
  needs_key: bool = False
  law: str | None = None
  budgeted: bool = False
  paper: str | None = None
  proposed: bool = False
  curve: str | None = None

  def __post_init__(self):
    if self.reads not in READS:
      raise ValueError(f"Method {self.name}: reads={self.reads!r}, expected one of {READS}")
    if self.budgeted and self.law is None:
      raise ValueError(f"Method {self.name}: a budgeted method needs its law")
    if self.proposed and self.paper is None:
      raise ValueError(f"Method {self.name}: proposed=True needs the paper that proposes it")

  @property
  def uses_zero_shot(self) -> bool:
    """Whether its fit reads the D = 0 point."""
    return self.reads in ("zero", "all")


REGISTRY: tuple[Method, ...] = (
    Method("ZeroShot", core.zero_shot, reads="zero", paper=LIN_2024),
    Method("SubTuning", core.sub_tuning, reads="last", paper=LIN_2024),
    Method("ModelSize", core.model_size, reads="none", paper=LIN_2024),
    Method("VanillaFit", core.vanilla_fit, reads="positive", needs_key=True, law="vanilla",
           budgeted=True, paper=LIN_2024, curve="vanilla"),
    Method("RectifiedFit", core.rectified_fit, reads="all", needs_key=True, law="rectified",
           budgeted=True, paper=LIN_2024, proposed=True, curve="rectified"),
    Method("AtS", core.ats, reads="positive", paper=LIN_2024, proposed=True, curve="ats"),
    Method("LensLLM", core.lensllm, reads="all", needs_key=True, law="lensllm", budgeted=True,
           paper=ZENG_2025, proposed=True, curve="lensllm"),
    Method(pooled.METHOD_NAME, pooled.pooled_lensllm, reads="all", needs_key=True,
           law="lensllm"),
)

METHODS: dict[str, Method] = {m.name: m for m in REGISTRY}
PUBLISHED_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.paper)
DETERMINISTIC_METHODS: dict[str, Method] = {m.name: m for m in REGISTRY if not m.needs_key}
FITTED_METHODS: dict[str, Method] = {m.name: m for m in REGISTRY if m.needs_key}
METHOD_READS: dict[str, str] = {m.name: m.reads for m in REGISTRY}
FITTED_LAWS: dict[str, tuple[Callable[..., laws.Law], bool]] = {
    m.name: (laws.LAW_FACTORIES[m.law], m.uses_zero_shot) for m in REGISTRY if m.budgeted}
CURVES: dict[str, str] = {m.name: m.curve for m in REGISTRY if m.curve}
PROPOSED_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.proposed)


def run_method(name: str, visible: core.VisibleCurves, metadata: core.Metadata, *,
               key: jax.Array | None = None, **options) -> core.SelectionResult:
  """Runs a method by name; fitted methods need `key`."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
  method = METHODS[name]
  if method.needs_key:
    if key is None:
      raise ValueError(f"{name} needs a PRNG key (key=jax.random.key(...))")
    return method.function(visible, metadata, key=key, **options)
  return method.function(visible, metadata, **options)


def run_fitted_batch(name: str, views, metadata: core.Metadata, *, key: jax.Array,
                     num_restarts: int = 8, fit_options=None, min_curves: int = 0,
                     f_term: Callable | None = None, aux: Any = None,
                     uniforms=None) -> list[core.SelectionResult]:
  """A method of `FITTED_LAWS` (by name) on several budget views in one batched fit
  (`core.fit_law_views`); LensLLM takes `f_term` and `aux` for NTK mode."""
  if name not in FITTED_LAWS:
    raise ValueError(f"{name!r} is not a fitted method; fitted: {sorted(FITTED_LAWS)}")
  factory, zero = FITTED_LAWS[name]
  law = factory(f_term) if f_term is not None else factory()
  return core.fit_law_views(name, law, views, metadata, key=key, use_zero_shot=zero,
                            num_restarts=num_restarts, aux=aux, fit_options=fit_options,
                            min_curves=min_curves, uniforms=uniforms)
