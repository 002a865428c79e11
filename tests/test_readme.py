"""The README's Python examples run as written (each in a fresh interpreter)."""

from __future__ import annotations

import re

import pytest
from conftest import REPO_ROOT, run_with_host_devices

_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _examples() -> list[str]:
  text = (REPO_ROOT / "README.md").read_text()
  return _BLOCK.findall(text)


def test_readme_has_examples():
  assert len(_examples()) >= 3, "README.md should show runnable Python examples"


@pytest.mark.parametrize("index", range(len(_examples())))
def test_readme_example_runs(index):
  code = _examples()[index]
  # One device, as a user on a laptop would have; the helper just runs it.
  out = run_with_host_devices(code, num_devices=1, timeout=300)
  assert out.strip(), "every README example prints something"
