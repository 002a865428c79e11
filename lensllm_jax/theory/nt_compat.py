"""Makes `import neural_tangents` work on current JAX.

neural-tangents 0.6.5 (its last release) imports names that JAX has since
removed or moved, and its `experimental` subpackage imports TensorFlow via
jax2tf. `install()` restores exactly the missing names from the modules that
still define them (`jax.extend.core`, `jax._src.core`, `jax._src.util`,
`jax._src.ad_util`) and registers an empty `neural_tangents.experimental`
module, so the import never reaches TensorFlow.

Guarantees:
  * idempotent: calling `install()` twice changes nothing the second time;
  * nothing JAX still provides is replaced: a name is only set where
    `hasattr` says it is missing.

Use `import_neural_tangents()` rather than importing the package directly.

Known limit: with these names restored, `empirical_ntk_fn` works with
JACOBIAN_CONTRACTION and NTK_VECTOR_PRODUCTS; STRUCTURED_DERIVATIVES (and
AUTO, which may pick it) still fails on jax 0.10 ("linearize() got multiple
values for argument 'has_aux'"): it walks JAX's internal linearize/jaxpr
machinery, whose signatures changed, so it is not shimmed here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

# (module that neural-tangents imports from, name, [candidate sources]).
_MISSING_NAMES = (
    ("jax.core", "Jaxpr", ("jax.extend.core", "jax._src.core")),
    ("jax.core", "JaxprEqn", ("jax.extend.core", "jax._src.core")),
    ("jax.core", "Var", ("jax.extend.core", "jax._src.core")),
    ("jax.core", "Literal", ("jax.extend.core", "jax._src.core")),
    ("jax.core", "Primitive", ("jax.extend.core", "jax._src.core")),
    ("jax.core", "ShapedArray", ("jax._src.core",)),
    ("jax.core", "Value", ("jax._src.core",)),
    ("jax.core", "AbstractValue", ("jax._src.core",)),
    ("jax.core", "eval_context", ("jax._src.core",)),
    ("jax.interpreters.ad", "zeros_like_p", ("jax._src.ad_util",)),
)
_UTIL_NAMES = ("safe_map", "safe_zip")


def _restore_name(target_name: str, attr: str, sources: tuple[str, ...]) -> None:
  target = importlib.import_module(target_name)
  if hasattr(target, attr):
    return
  for source_name in sources:
    source = importlib.import_module(source_name)
    if hasattr(source, attr):
      setattr(target, attr, getattr(source, attr))
      return
  raise ImportError(
      f"nt_compat: cannot restore {target_name}.{attr}: none of {sources} "
      "defines it on this JAX version.")


def _restore_jax_util() -> None:
  """`jax.util` was removed as a module; neural-tangents imports from it."""
  import jax
  from jax._src import util as src_util

  module = sys.modules.get("jax.util")
  if module is None:
    try:
      module = importlib.import_module("jax.util")
    except ImportError:
      module = types.ModuleType("jax.util")
      module.__doc__ = "Stand-in created by lensllm_jax.theory.nt_compat."
      sys.modules["jax.util"] = module
      if not hasattr(jax, "util"):
        jax.util = module
  for name in _UTIL_NAMES:
    if not hasattr(module, name):
      setattr(module, name, getattr(src_util, name))


def _stub_experimental() -> None:
  """Registers an empty `neural_tangents.experimental` (it imports TF)."""
  name = "neural_tangents.experimental"
  if name in sys.modules:
    return
  stub = types.ModuleType(name)
  stub.__doc__ = ("Stub created by lensllm_jax.theory.nt_compat: the real subpackage "
                  "imports TensorFlow, which this project does not install.")
  stub.__path__ = []  # a package, so submodule imports fail cleanly
  sys.modules[name] = stub


def install() -> None:
  """Restores the names neural-tangents 0.6.5 needs. Idempotent."""
  import jax  # noqa: F401  (the targets below are its submodules)

  for target_name, attr, sources in _MISSING_NAMES:
    _restore_name(target_name, attr, sources)
  _restore_jax_util()
  _stub_experimental()


def import_neural_tangents() -> types.ModuleType:
  """Installs the shims, then imports and returns `neural_tangents`."""
  if importlib.util.find_spec("neural_tangents") is None:
    raise ImportError(
        "neural-tangents is not installed; install it without its "
        "dependencies: pip install --no-deps neural-tangents==0.6.5")
  install()
  return importlib.import_module("neural_tangents")
