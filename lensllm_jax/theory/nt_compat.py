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

Checked on both ends of the supported range (jax 0.10.2 and 0.12.0.1, CI:
.ci/run and .ci/newest). If a future JAX drops a name that none of the
sources defines, `install()` raises one ImportError naming every missing
name; the project's own kernel, `ntk.make_ntk_fn(..., implementation=
"jacrev")` (reverse-mode Jacobians contracted explicitly), needs no
neural-tangents and is the fallback.

Known limit: with these names restored, `empirical_ntk_fn` works with
JACOBIAN_CONTRACTION and NTK_VECTOR_PRODUCTS (the two the project uses);
STRUCTURED_DERIVATIVES (and AUTO, which may pick it) still fails on jax 0.10
and 0.12 (errors such as "linearize() got multiple values for argument
'has_aux'" or "'ArrayImpl' object has no attribute 'map'"): it walks JAX's
internal linearize/jaxpr machinery, whose signatures changed, so it is not
shimmed here.
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


_FALLBACK = ("the project's own kernel needs no neural-tangents: "
             "lensllm_jax.theory.ntk.make_ntk_fn(..., implementation='jacrev')")


def _restore_name(target_name: str, attr: str, sources: tuple[str, ...]) -> bool:
  """Sets `target.attr` from the first source defining it; False if none does."""
  target = importlib.import_module(target_name)
  if hasattr(target, attr):
    return True
  for source_name in sources:
    try:
      source = importlib.import_module(source_name)
    except ImportError:
      continue
    if hasattr(source, attr):
      setattr(target, attr, getattr(source, attr))
      return True
  return False


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
  """Restores the names neural-tangents 0.6.5 needs. Idempotent.

  Raises:
    ImportError naming every JAX name that no known module defines any more
    on this JAX version, and the fallback kernel.
  """
  import jax

  missing = [f"{target}.{attr} (looked in {', '.join(sources)})"
             for target, attr, sources in _MISSING_NAMES
             if not _restore_name(target, attr, sources)]
  from jax._src import util as src_util
  missing += [f"jax.util.{name} (looked in jax._src.util)" for name in _UTIL_NAMES
              if not hasattr(src_util, name)]
  if missing:
    raise ImportError(f"nt_compat: jax {jax.__version__} no longer defines names that "
                      f"neural-tangents 0.6.5 imports: {'; '.join(missing)}; {_FALLBACK}")
  _restore_jax_util()
  _stub_experimental()


def import_neural_tangents() -> types.ModuleType:
  """Installs the shims, then imports and returns `neural_tangents`.

  Raises:
    ImportError if neural-tangents is not installed, or if it still fails to
    import on this JAX (the message names the JAX names it lacks and the
    fallback kernel).
  """
  if importlib.util.find_spec("neural_tangents") is None:
    raise ImportError(
        "neural-tangents is not installed; install it without its "
        "dependencies: pip install --no-deps neural-tangents==0.6.5; or use " + _FALLBACK)
  install()
  try:
    return importlib.import_module("neural_tangents")
  except (ImportError, AttributeError) as e:
    # A name this shim does not know about yet (a newer JAX moved it).
    import jax

    raise ImportError(f"nt_compat: neural-tangents 0.6.5 does not import on jax "
                      f"{jax.__version__}: {e}; {_FALLBACK}") from e
