"""The method registry: every list of methods is the registry's, and each record says true facts."""

import ast

import jax
import numpy as np
import pytest

from configs import selection as selection_config
from experiments import reporting
from helpers import REPO_ROOT
from helpers.synthetic_curves import synthetic_curves
from lensllm_jax import laws, selection
from lensllm_jax.plus import candidates
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
  assert methods.CURVES == {"VanillaFit": "vanilla", "RectifiedFit": "rectified", "AtS": "ats",
                            "LensLLM": "lensllm"}
  # Lin et al. (2024) propose the rectified law and AtS, Zeng et al. (2025) LensLLM.
  assert methods.PROPOSED_METHODS == ("RectifiedFit", "AtS", "LensLLM")
  assert candidates.BASELINES == ("AtS", "RectifiedFit", "LensLLM")
  # Each fitted law's curve is its law; the curves name distinct rmse.csv rows.
  assert all(methods.CURVES[m] == methods.METHODS[m].law for m in methods.FITTED_LAWS)
  assert len(set(methods.CURVES.values())) == len(methods.CURVES)
  # The study: the deterministic methods, the fitted laws, then its own two (its tables' order).
  assert reporting.ALL_METHODS == ("ZeroShot", "SubTuning", "ModelSize", "AtS", "VanillaFit",
                                   "RectifiedFit", "LensLLM", "LensLLM-NTK", "NLPMetrics")
  assert list(reporting.LAW_NAMES.items()) == [
      ("VanillaFit", "vanilla"), ("RectifiedFit", "rectified"), ("LensLLM", "lensllm-scalar-F"),
      ("LensLLM-NTK", "lensllm-ntk-F"), ("AtS", "ats")]


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
  with pytest.raises(ValueError, match="paper"):
    methods.Method("X", selection.zero_shot, reads="all", proposed=True)


# Where method names are data, not lists: the registry itself and the published tables (one
# method per key).
_NAME_TABLES = {"lensllm_jax/selection/methods.py", "lensllm_jax/selection/published.py"}


def _literal_name_lists(source: str, names) -> list[tuple[int, list[str]]]:
  """(line, names) of each tuple / list / set literal, or dict literal's keys, holding two or
  more of `names` as string constants."""
  out = []
  for node in ast.walk(ast.parse(source)):
    elts = (node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set))
            else node.keys if isinstance(node, ast.Dict) else [])
    found = [e.value for e in elts if isinstance(e, ast.Constant) and e.value in names]
    if len(found) >= 2:
      out.append((node.lineno, found))
  return out


def test_no_literal_list_of_method_names():
  """Every list of registry methods in the package, the binaries and the configs is derived
  from `methods.REGISTRY` (a field of the record says what the list means), never written out."""
  names = set(methods.METHODS)
  found = []
  for pkg in ("lensllm_jax", "experiments", "configs"):
    for path in sorted((REPO_ROOT / pkg).rglob("*.py")):
      rel = path.relative_to(REPO_ROOT).as_posix()
      if rel not in _NAME_TABLES:
        found += [f"{rel}:{line} {hit}" for line, hit in _literal_name_lists(path.read_text(),
                                                                              names)]
  assert not found, "literal lists of method names: " + "; ".join(found)
  # The check sees such a list (so an empty walk cannot pass).
  assert _literal_name_lists('X = ("AtS", "LensLLM")\nY = {"ZeroShot": 1, "AtS": 2}', names) == [
      (1, ["AtS", "LensLLM"]), (2, ["ZeroShot", "AtS"])]
