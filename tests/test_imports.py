"""The imports of the code form a DAG: no module imports, even inside a function, one that imports it back.

The graph is read from the source with `ast` (no module is imported): every
`import` / `from ... import` statement anywhere in a file, at module level or
inside a function, is an edge to the named module of the same package (a
`from pkg import name` is an edge to `pkg.name` when that is a module, else
to `pkg`). Importing a submodule also runs its parent packages' `__init__`;
those implicit edges are left out (a package's `__init__` importing its own
submodules is the usual layout, not a cycle a reader has to untangle).
"""

from __future__ import annotations

import ast
import pathlib
import re

from helpers import REPO_ROOT

PACKAGES = ("lensllm_jax", "experiments", "configs")


def _module_files(root: pathlib.Path, packages) -> dict[str, pathlib.Path]:
  out = {}
  for pkg in packages:
    for path in sorted((root / pkg).rglob("*.py")):
      parts = list(path.relative_to(root).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def import_graph(root: pathlib.Path, packages=PACKAGES) -> dict[str, set[str]]:
  """module -> modules of `packages` it imports (module- and function-level)."""
  files = _module_files(root, packages)
  graph: dict[str, set[str]] = {m: set() for m in files}
  for mod, path in files.items():
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
          anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
          anchor = anchor[:len(anchor) - (node.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                   for a in node.names]
      for t in targets:
        # `import a.b.c` names a.b.c; keep the longest prefix that is one of our modules.
        while t and t not in files:
          t = t.rpartition(".")[0]
        if t and t != mod:
          graph[mod].add(t)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search)."""
  state: dict[str, int] = {}  # 1 = on the stack, 2 = done
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_package_imports_are_acyclic():
  graph = import_graph(REPO_ROOT)
  # The walk sees the layering (so an empty graph cannot pass silently) ...
  assert {"lensllm_jax.selection.pooled", "lensllm_jax.selection.core"} <= graph[
      "lensllm_jax.selection.methods"]
  # ... nested packages included.
  assert {"lensllm_jax.selection.core", "lensllm_jax.selection.pooled.solver"} <= graph[
      "lensllm_jax.selection.pooled.method"]
  assert "lensllm_jax.selection.methods" not in graph["lensllm_jax.selection.core"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _subpackage(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if parts[0] == "lensllm_jax" and len(parts) > 1 else None


def test_subpackages_import_only_the_ones_above_them():
  """The tree reads top-down as the data flows: each subpackage of `lensllm_jax`
  imports only subpackages listed before it in `lensllm_jax.SUBPACKAGES` (and
  `xla_workarounds`), never one below it."""
  import lensllm_jax

  order = {name: i for i, name in enumerate(lensllm_jax.SUBPACKAGES)}
  on_disk = {p.name for p in (REPO_ROOT / "lensllm_jax").iterdir()
             if (p / "__init__.py").exists()}
  assert on_disk == set(order), "lensllm_jax.SUBPACKAGES must list every subpackage"
  graph = import_graph(REPO_ROOT)
  upward = []
  for mod, deps in graph.items():
    src = _subpackage(mod)
    if src not in order:
      continue
    for dep in deps:
      dst = _subpackage(dep)
      if dst in order and order[dst] > order[src]:
        upward.append(f"{mod} -> {dep}")
  assert not upward, "imports against the data flow: " + ", ".join(sorted(upward))


def test_package_docstring_lists_every_subpackage():
  import lensllm_jax

  doc = lensllm_jax.__doc__
  for name in lensllm_jax.SUBPACKAGES:
    assert f"\n  {name} " in doc, f"lensllm_jax's docstring does not describe {name}"
  # Every package below lensllm_jax, nested ones included (e.g. selection/pooled), lists
  # its modules and its subpackages in its docstring.
  root = REPO_ROOT / "lensllm_jax"
  packages = sorted(p.parent for p in root.rglob("__init__.py") if p.parent != root)
  assert {root / "selection", root / "selection" / "pooled", root / "plus" / "pfn"} <= set(
      packages)
  for pkg in packages:
    name = ".".join(pkg.relative_to(REPO_ROOT).parts)
    init_doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text())) or ""
    members = [p.stem for p in pkg.glob("*.py") if p.stem != "__init__"]
    members += [p.name for p in pkg.iterdir() if (p / "__init__.py").exists()]
    for module in sorted(members):
      assert f"  {module} " in init_doc, f"{name}'s docstring does not list {module}"


def test_cycle_hidden_in_a_function_is_found(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from . import c\n  return c\n")
  (pkg / "c.py").write_text("import numpy\n\ndef g():\n  import pkg.a\n")
  graph = import_graph(tmp_path, ("pkg",))
  assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"}
  assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
  (pkg / "c.py").write_text("import numpy\n")
  assert find_cycle(import_graph(tmp_path, ("pkg",))) is None


# The modules of experiments/ that are not binaries (docs/binaries.md): code two binaries share.
SHARED_EXPERIMENT_MODULES = {"experiments.common", "experiments.reporting",
                             "experiments.hessian_common"}


def _is_binary(path: pathlib.Path) -> bool:
  return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
             for node in ast.parse(path.read_text()).body)


def test_binaries_import_no_other_binary():
  """A binary imports only the shared modules of experiments/, never another binary (its
  flags, helpers or main); the modules that are not binaries are exactly the documented ones."""
  files = _module_files(REPO_ROOT, ("experiments",))
  shared = {m for m, path in files.items() if m != "experiments" and not _is_binary(path)}
  assert shared == SHARED_EXPERIMENT_MODULES
  doc = (REPO_ROOT / "docs" / "binaries.md").read_text()
  for m in sorted(shared):
    assert f"experiments/{m.split('.')[-1]}.py" in doc, f"docs/binaries.md does not name {m}"
  graph = import_graph(REPO_ROOT)
  binaries = set(files) - shared - {"experiments"}
  assert {"experiments.reproduce_selection", "experiments.lensllm_study"} <= binaries
  assert "experiments.reporting" in graph["experiments.reproduce_selection"]
  wrong = sorted(f"{m} -> {dep}" for m in files for dep in graph[m] if dep in binaries)
  assert not wrong, "a module of experiments/ imports a binary: " + ", ".join(wrong)
  # Figures are drawn in experiments/reporting.py only: no binary imports matplotlib.
  drawing = sorted(m for m in binaries if m != "experiments" and any(
      isinstance(node, (ast.Import, ast.ImportFrom)) and "matplotlib" in ast.unparse(node)
      for node in ast.walk(ast.parse(files[m].read_text()))))
  assert not drawing, "binaries drawing figures (move them to reporting): " + ", ".join(drawing)
  assert "matplotlib" in files["experiments.reporting"].read_text()


def _literal_all(tree: ast.Module) -> list[str] | None:
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
      return [ast.literal_eval(e) for e in node.value.elts]
  return None


def _public_names(path: pathlib.Path) -> list[str]:
  """A module's `__all__`, or without one its top-level functions, classes and UPPER_CASE
  constants (not type aliases)."""
  tree = ast.parse(path.read_text())
  names = _literal_all(tree)
  if names is not None:
    return names
  names = []
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.append(node.name)
    elif isinstance(node, ast.Assign):
      names += [t.id for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()]
  return [n for n in names if not n.startswith("_")]


# A package whose __init__ re-exports a chosen API rather than every module's names: the
# models are built through `models.build(config)`; their Flax blocks stay in their modules.
_CURATED_PACKAGES = {"lensllm_jax/models"}


def test_packages_reexport_and_list_their_public_names():
  """Each subpackage's `__init__` (nested ones too) re-exports the public names of its modules
  and its nested packages (`theory.ntk`, `plus.pfn`: their names as `theory.ntk.NAME`) in
  `__all__`, and its docstring names every name of `__all__`."""
  problems = []
  for init in sorted((REPO_ROOT / "lensllm_jax").rglob("__init__.py")):
    pkg = init.parent
    if pkg == REPO_ROOT / "lensllm_jax":
      continue
    rel = pkg.relative_to(REPO_ROOT).as_posix()
    tree = ast.parse(init.read_text())
    exported = _literal_all(tree) or []
    doc = ast.get_docstring(tree) or ""
    problems += [f"{rel}: docstring does not name {n}" for n in exported
                 if not re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", doc)]
    if rel in _CURATED_PACKAGES:
      continue
    for child in sorted(p for p in pkg.glob("*.py") if p.name != "__init__.py"):
      problems += [f"{rel}: {n} of {child.name} is not re-exported"
                   for n in _public_names(child) if n not in exported]
    problems += [f"{rel}: the package {p.name} is not re-exported" for p in pkg.iterdir()
                 if (p / "__init__.py").exists() and p.name not in exported]
  assert not problems, "\n".join(problems)
