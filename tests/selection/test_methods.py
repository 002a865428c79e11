"""The method registry: every list of methods is the registry's, and each record says true facts."""

import jax
import numpy as np
import pytest

from configs import selection as selection_config
from experiments import reproduce_selection
from helpers.synthetic_curves import synthetic_curves
from lensllm_jax import laws, selection
from lensllm_jax.selection import budgeted, methods


def test_lists_are_the_registry():
  names = [m.name for m in methods.REGISTRY]
  assert len(set(names)) == len(names)
  assert list(methods.METHODS) == names
  # The published tables' order (Lin et al. 2024, Tables 1-2), then LensLLM.
  assert selection_config.PUBLISHED_METHODS == (
      "ZeroShot", "SubTuning", "ModelSize", "VanillaFit", "RectifiedFit", "AtS", "LensLLM")
  assert budgeted.BUDGET_METHODS == ("VanillaFit", "RectifiedFit", "LensLLM")
  assert tuple(selection.FITTED_LAWS) == budgeted.BUDGET_METHODS
  assert set(methods.DETERMINISTIC_METHODS) | set(methods.FITTED_METHODS) == set(names)
  assert not set(methods.DETERMINISTIC_METHODS) & set(methods.FITTED_METHODS)
  assert reproduce_selection.LAW_OF == {"VanillaFit": "vanilla", "RectifiedFit": "rectified",
                                        "LensLLM": "lensllm", "AtS": "ats"}


def test_fitted_laws_match_the_method_functions():
  """FITTED_LAWS' (law, zero-shot) pair gives the fit of the method's own function."""
  curves, _ = synthetic_curves(num_models=4, seed=3)
  meta = selection.metadata_of(curves)
  view = selection.visible_view(curves, 102400)
  for name, (factory, zero) in selection.FITTED_LAWS.items():
    m = methods.METHODS[name]
    assert factory().num_params == laws.get_law(m.law).num_params
    assert zero == (m.reads == "all")
    direct = m.function(view, meta, key=jax.random.key(5), num_restarts=2)
    batched = methods.run_fitted_batch(name, [view], meta, key=jax.random.key(5),
                                       num_restarts=2)[0]
    np.testing.assert_allclose(batched.predicted, direct.predicted, rtol=1e-9)


def test_needs_key_is_enforced():
  curves, _ = synthetic_curves(num_models=4, seed=3)
  meta = selection.metadata_of(curves)
  view = selection.visible_view(curves, 102400)
  for m in methods.REGISTRY:
    if m.needs_key:
      with pytest.raises(ValueError, match="PRNG key"):
        methods.run_method(m.name, view, meta)
    else:
      assert methods.run_method(m.name, view, meta).method == m.name


def test_record_is_checked():
  with pytest.raises(ValueError, match="reads"):
    methods.Method("X", selection.zero_shot, reads="some")
  with pytest.raises(ValueError, match="law"):
    methods.Method("X", selection.zero_shot, reads="all", budgeted=True)
