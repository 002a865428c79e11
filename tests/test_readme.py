"""The README and docs/: examples run as written, links resolve, generated tables are fresh.

Every ```python block of README.md and docs/*.md runs as written; a sketch that
needs files a fresh clone does not have (a Hugging Face checkpoint) is fenced
```py instead.
"""

from __future__ import annotations

import re

import pytest

from experiments import update_readme
from helpers import REPO_ROOT, run_with_host_devices

_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
_LINK = re.compile(r"\]\(([^)#\s]+)\)")
_DOCS = [REPO_ROOT / "README.md"] + sorted((REPO_ROOT / "docs").glob("*.md"))


def _examples() -> list[tuple[str, int, str]]:
  out = []
  for path in _DOCS:
    for i, code in enumerate(_BLOCK.findall(path.read_text())):
      out.append((path.relative_to(REPO_ROOT).as_posix(), i, code))
  return out


def test_readme_is_a_short_index():
  text = (REPO_ROOT / "README.md").read_text()
  assert len(text.splitlines()) <= 300
  first = re.search(r"```\n(.*?)```", text, re.DOTALL).group(1).splitlines()
  # Exactly two commands: set up and run the main job; then the test suite (.ci/run runs it).
  assert len(first) == 2, first
  assert first[0].startswith("bash setup.sh && .venv/bin/python -m experiments.")
  assert "shared" not in first[0]
  assert first[1] in (REPO_ROOT / ".ci" / "run").read_text()
  assert "python -m experiments.update_readme --check" in (REPO_ROOT / ".ci" / "run").read_text()
  assert len(_examples()) >= 3, "README.md and docs/ should show runnable Python examples"


def test_links_resolve():
  missing = [(p.name, target) for p in _DOCS for target in _LINK.findall(p.read_text())
             if "://" not in target and not (p.parent / target).exists()]
  assert not missing, missing


def test_generated_tables_are_fresh():
  text = (REPO_ROOT / "README.md").read_text()
  assert "<!-- generated: " in text
  assert update_readme.splice(text, REPO_ROOT) == text, (
      "README.md is stale: run python -m experiments.update_readme")


@pytest.mark.slow
@pytest.mark.parametrize("where", [f"{f}:{i}" for f, i, _ in _examples()])
def test_example_runs(where):
  code = {f"{f}:{i}": c for f, i, c in _examples()}[where]
  # One device, as a user on a laptop would have; the helper just runs it.
  out = run_with_host_devices(code, num_devices=1, timeout=300)
  assert out.strip(), "every example prints something"
