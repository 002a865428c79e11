"""The committed results directories are accepted by their binaries under the current configs.

A manifest under results/ records the config that made the directory's numbers
(`lensllm_jax/rundir.py`). Each test runs the binary's own `run` on a copy of
the committed directory with the config that made it and its work replaced by
a sentinel: the binary checks its config, reads and hashes its inputs and binds
the manifest; reaching the work (or, for ntk_dynamics, its "same inputs: skip")
means a rerun would reuse the committed results, and the manifest is left
byte-identical. A renamed config field that the committed manifest does not
follow fails here (the rerun would refuse, or redo an hour of work).
"""

from __future__ import annotations

import shutil

import pytest

from configs import lensllm_plus as lensllm_plus_config
from configs import selection as selection_config
from configs import study as study_config
from experiments import lensllm_plus, ntk_dynamics, reproduce_selection
from helpers import REPO_ROOT


def _copy(name: str, tmp_path):
  out = tmp_path / name
  shutil.copytree(REPO_ROOT / "results" / name, out)
  return out


class _Reached(Exception):
  """The binary got past its manifest check to its work."""


def _reached(*args, **kwargs):
  raise _Reached


def test_ntk_dynamics_accepts_the_committed_study(tmp_path, monkeypatch):
  out = _copy("study", tmp_path)
  before = (out / ntk_dynamics.MANIFEST).read_bytes()
  monkeypatch.setattr(ntk_dynamics, "_run", _reached)
  path = ntk_dynamics.run(study_config.get_config("full"), out)  # same inputs: skipped
  assert path == out / "ntk_dynamics.csv"
  assert (out / ntk_dynamics.MANIFEST).read_bytes() == before


@pytest.mark.parametrize("binary,config,name", [
    (reproduce_selection, selection_config.get_config(), "selection"),
    (lensllm_plus, lensllm_plus_config.get_config(), "lensllm_plus")])
def test_binary_accepts_its_committed_results(binary, config, name, tmp_path, monkeypatch):
  out = _copy(name, tmp_path)
  before = (out / "manifest.json").read_bytes()
  monkeypatch.chdir(REPO_ROOT)  # lensllm_plus names the study's curve files by relative path
  monkeypatch.setattr(binary, "_run", _reached)
  with pytest.raises(_Reached):
    binary.run(config, out)
  assert (out / "manifest.json").read_bytes() == before
