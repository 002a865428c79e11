"""neural-tangents on the pinned JAX: the compatibility shim and empirical_ntk_fn.

References are independent of neural-tangents: an explicit jax.jacrev Jacobian
contracted with numpy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_with_host_devices
from lensllm_jax.theory import nt_compat


class _MLP(nn.Module):
  """Small MLP: [n, 5] -> [n, 3]."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(16)(x))
    x = jax.nn.gelu(nn.Dense(8)(x))
    return nn.Dense(3)(x)


def _jacrev_kernel(f, params, x1, x2):
  """Untraced reference: sum_p J1[a, i, p] J2[b, j, p] -> [n1, n2, 3, 3], float64."""
  j1 = jax.jacrev(f)(params, x1)
  j2 = jax.jacrev(f)(params, x2)
  out = 0.
  for a, b in zip(jax.tree.leaves(j1), jax.tree.leaves(j2), strict=True):
    a = np.asarray(a, np.float64).reshape(a.shape[0], a.shape[1], -1)
    b = np.asarray(b, np.float64).reshape(b.shape[0], b.shape[1], -1)
    out = out + np.einsum("aip,bjp->abij", a, b)
  return out


@pytest.mark.slow
def test_install_is_idempotent_and_shadows_nothing():
  # Fresh interpreter, so that nothing has been patched before the snapshot.
  code = """
  import importlib, sys
  import jax, jax.extend.core
  from lensllm_jax.theory import nt_compat
  targets = {(m, n) for m, n, _ in nt_compat._MISSING_NAMES}
  before = {}
  for m, n in targets:
    mod = importlib.import_module(m)
    if hasattr(mod, n):
      before[(m, n)] = getattr(mod, n)
  nt_compat.install()
  after1 = {(m, n): getattr(importlib.import_module(m), n) for m, n in targets}
  util1 = {n: getattr(sys.modules['jax.util'], n) for n in nt_compat._UTIL_NAMES}
  stub1 = sys.modules['neural_tangents.experimental']
  nt_compat.install()
  after2 = {(m, n): getattr(importlib.import_module(m), n) for m, n in targets}
  assert all(after1[k] is after2[k] for k in targets), 'second install changed a name'
  assert all(getattr(sys.modules['jax.util'], n) is v for n, v in util1.items())
  assert sys.modules['neural_tangents.experimental'] is stub1
  assert all(after1[k] is v for k, v in before.items()), 'a JAX name was shadowed'
  assert jax.core.Jaxpr is jax.extend.core.Jaxpr
  nt = nt_compat.import_neural_tangents()
  assert nt is nt_compat.import_neural_tangents()
  assert 'tensorflow' not in sys.modules
  print('ok', len(before), len(targets))
  """
  out = run_with_host_devices(code, num_devices=1)
  assert out.startswith("ok")


@pytest.mark.parametrize("implementation", [1, 2], ids=["jacobian_contraction", "ntk_vector_products"])
def test_empirical_ntk_fn_matches_jacrev(implementation):
  nt = nt_compat.import_neural_tangents()
  model = _MLP()
  x1 = jax.random.normal(jax.random.key(0), (6, 5))
  x2 = jax.random.normal(jax.random.key(1), (4, 5))
  params = model.init(jax.random.key(2), x1)["params"]

  def f(p, x):
    return model.apply({"params": p}, x)

  ref = _jacrev_kernel(f, params, x1, x2)
  full = nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=implementation)
  np.testing.assert_allclose(full(x1, x2, params), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
  if implementation != 1:
    return  # one implementation suffices for the trace convention
  # neural-tangents' trace averages over the traced axis.
  traced = nt.empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=implementation)
  ref_traced = np.einsum("abii->ab", ref) / 3
  np.testing.assert_allclose(traced(x1, x2, params), ref_traced, rtol=2e-5,
                             atol=2e-5 * np.abs(ref_traced).max())


def test_neural_tangents_agrees_with_the_projects_own_kernel():
  """Both neural-tangents implementations against ntk.make_ntk_fn('jacrev') (no nt)."""
  from lensllm_jax.theory import ntk

  model = _MLP()
  x1 = jax.random.normal(jax.random.key(3), (5, 5))
  x2 = jax.random.normal(jax.random.key(4), (3, 5))
  params = model.init(jax.random.key(5), x1)["params"]

  def f(p, x):
    return model.apply({"params": p}, x)

  own = ntk.make_ntk_fn(f, trace_axes=(-1,), implementation="jacrev")(params, x1, x2)
  nt = nt_compat.import_neural_tangents()
  for implementation in (1, 2):
    theirs = nt.empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0,
                                 implementation=implementation)(x1, x2, params)
    np.testing.assert_allclose(theirs, own, rtol=2e-5, atol=2e-5 * np.abs(own).max(),
                               err_msg=f"implementation {implementation}")


def test_a_jax_without_a_needed_name_gives_one_error_naming_it(monkeypatch):
  # A future JAX that defines a name nowhere: simulated with a name no JAX has.
  monkeypatch.setattr(nt_compat, "_MISSING_NAMES", nt_compat._MISSING_NAMES + (
      ("jax.core", "NoSuchName", ("jax.extend.core", "jax._src.core")),
      ("jax.core", "AlsoGone", ("jax._src.core",))))
  with pytest.raises(ImportError) as info:
    nt_compat.install()
  message = str(info.value)
  assert "jax.core.NoSuchName" in message and "jax.core.AlsoGone" in message
  assert "implementation='jacrev'" in message
  assert not hasattr(jax.core, "NoSuchName")
