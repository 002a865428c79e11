"""Output directories: reruns keyed on the manifest, rows that survive kills, one writer."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import selection as selection_config
from experiments import common
from experiments import reproduce_selection as rs
from helpers import REPO_ROOT
from helpers.synthetic_curves import synthetic_curves
from lensllm_jax import errors, rundir
from lensllm_jax.curves import benchmarks

QUICK = dict(methods=("ZeroShot", "SubTuning", "AtS"), ratios=(4, 8),
             budget=dict(enabled=False), figures=False, num_restarts=2, max_steps=50)
FILES = ("selection.csv", "rmse.csv", "fits.csv", "cost.csv")


@pytest.fixture(scope="module")
def curve_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("curves") / "toy7.csv"
  benchmarks.write_curves(synthetic_curves(seed=5)[0], path)
  return path


def _cfg(path, **overrides):
  cfg = selection_config.get_config()
  cfg.update(benchmarks=(str(path),), **QUICK)
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def first_run(curve_file, tmp_path_factory):
  out = rs.run(_cfg(curve_file), tmp_path_factory.mktemp("first") / "out")
  return out, {f: (out / f).read_bytes() for f in FILES}


def _files(out):
  return {f: (out / f).read_bytes() for f in FILES}


@pytest.mark.slow
def test_rerun_same_manifest_skips_changed_one_refuses_overwrite_recomputes(
    curve_file, tmp_path, monkeypatch):
  out = tmp_path / "out"
  rs.run(_cfg(curve_file), out)
  before = _files(out)
  manifest = json.loads((out / rundir.MANIFEST).read_text())
  assert manifest["inputs"] == {"curves/toy7": rundir.sha256_file(curve_file)}
  assert manifest["config"]["num_restarts"] == 2 and "threads" not in manifest["config"]
  # Same manifest (threads and figures do not change results): nothing is recomputed.
  monkeypatch.setattr(rs.selection, "run_fitted_batch", None)  # a fit would fail
  rs.run(_cfg(curve_file, threads=1, figures=True), out)
  assert _files(out) == before
  monkeypatch.undo()
  # Another fit setting, or another file under the same name: refused, naming it.
  with pytest.raises(errors.WorkdirError, match=r"config\.num_restarts: 2 -> 3.*overwrite=True"):
    rs.run(_cfg(curve_file, num_restarts=3), out)
  other = tmp_path / "elsewhere" / "toy7.csv"
  curves = benchmarks.load_curves(curve_file)
  benchmarks.write_curves(dataclasses.replace(curves, losses=curves.losses * 1.01), other)
  with pytest.raises(errors.WorkdirError, match=r"input curves/toy7: sha256 [0-9a-f]{12} ->"):
    rs.run(_cfg(other), out)
  assert _files(out) == before
  # overwrite=True: the old results go, the new ones equal a fresh directory's.
  rs.run(_cfg(other, overwrite=True), out)
  fresh = rs.run(_cfg(other), tmp_path / "fresh")
  assert _files(out) == _files(fresh) != before
  # ... also with the same manifest (code changed, inputs not): everything is recomputed.
  (out / "selection.csv").write_text((out / "selection.csv").read_text().replace("0.", "9."))
  rs.run(_cfg(other, overwrite=True), out)
  assert _files(out) == _files(fresh)


def test_directory_without_manifest_is_refused(curve_file, tmp_path):
  out = tmp_path / "legacy"
  out.mkdir()
  (out / "selection.csv").write_text("dataset,ratio,max_data_num,method,metric,value\r\n")
  with pytest.raises(errors.WorkdirError, match="no manifest.json"):
    rs.run(_cfg(curve_file), out)


@pytest.mark.parametrize("damage", ["cut_mid_row", "cut_two_rows", "zero_bytes", "header_only",
                                    "every_file_cut"])
@pytest.mark.slow
def test_killed_appends_recover_to_the_uninterrupted_files(curve_file, first_run, tmp_path,
                                                           damage):
  """A row cut by a kill (no newline), a file left empty or with its header only: the rerun
  drops the partial unit, redoes it and ends with byte-identical CSVs."""
  src, want = first_run
  out = tmp_path / "out"
  out.mkdir()
  for f in (*FILES, rundir.MANIFEST):
    (out / f).write_bytes((src / f).read_bytes())
  sel = want["selection.csv"]
  if damage == "cut_mid_row":
    (out / "selection.csv").write_bytes(sel[:len(sel) - 9])
  elif damage == "cut_two_rows":
    lines = sel.splitlines(keepends=True)
    (out / "selection.csv").write_bytes(b"".join(lines[:-2]) + lines[-2][:7])
  elif damage == "zero_bytes":
    (out / "selection.csv").write_bytes(b"")
  elif damage == "header_only":
    (out / "selection.csv").write_bytes(sel.splitlines(keepends=True)[0])
  else:
    for f in FILES:
      (out / f).write_bytes(want[f][:len(want[f]) - 5])
  rs.run(_cfg(curve_file), out)
  assert _files(out) == want
  assert "selection.md" in os.listdir(out)


def test_append_rows_never_glues_a_row_to_a_cut_one(tmp_path):
  path = tmp_path / "t.csv"
  path.write_bytes(b"")  # 0 bytes: the header is written
  common.append_rows(path, ("a", "b"), [{"a": 1, "b": 2}])
  with path.open("ab") as f:
    f.write(b"3,4")  # cut: no newline
  assert common.read_rows(path) == [{"a": "1", "b": "2"}]
  common.append_rows(path, ("a", "b"), [{"a": 5, "b": 6}])
  assert path.read_bytes() == b"a,b\r\n1,2\r\n5,6\r\n"
  with pytest.raises(errors.WorkdirError, match=r"t\.csv: header 'a,b', expected 'a,c'"):
    common.append_rows(path, ("a", "c"), [{"a": 7, "c": 8}])
  path.write_bytes(b"a,b\r\n1,2,3\r\n")
  with pytest.raises(errors.WorkdirError, match=r"t\.csv, line 2"):
    common.read_rows(path)


def test_manifest_merge_rules():
  old = {"version": "1", "config": {"sizes": [1, 2], "models": [{"name": "a", "x": 1}],
                                    "task": "t"}, "inputs": {"data": "aa"}}
  merge = {"sizes": None, "models": lambda m: m["name"]}
  grown = {"version": "1", "config": {"sizes": [2, 3], "models": [{"name": "b", "x": 2}],
                                      "task": "t"}, "inputs": {"data": "aa", "ckpt/b": "bb"}}
  merged, diffs = rundir.merge_manifests(old, grown, merge)
  assert diffs == []
  assert merged["config"]["sizes"] == [1, 2, 3]
  assert [m["name"] for m in merged["config"]["models"]] == ["a", "b"]
  assert merged["inputs"] == {"ckpt/b": "bb", "data": "aa"}
  for change, needle in ((("config", "task"), "config.task"), (("inputs", "data"), "input data"),
                         (("version",), "package version")):
    new = json.loads(json.dumps(old))
    if len(change) == 1:
      new["version"] = "2"
    else:
      new[change[0]][change[1]] = "zz"
    _, diffs = rundir.merge_manifests(old, new, merge)
    assert len(diffs) == 1 and diffs[0].startswith(needle), diffs
  new = json.loads(json.dumps(old))
  new["config"]["models"][0]["x"] = 5
  new["config"]["models"][0]["y"] = 2
  assert rundir.merge_manifests(old, new, merge)[1] == ["config.models[a].x: 1 -> 5",
                                                        'config.models[a].y: "<absent>" -> 2']
  # Without a merge rule a list key must be equal.
  assert rundir.merge_manifests(old, grown)[1][0].startswith("config.models")


def test_checkpoint_is_deleted_only_after_its_row_is_durable(tmp_path, monkeypatch):
  """An injected failure of the runs.jsonl append leaves the finished run's checkpoint, so
  the rerun resumes it instead of training again; on success the row comes first."""
  from lensllm_jax.training import sweep as fs

  events = []

  def fake_run_one(m, data, d, cfg, tcfg, workdir, mesh, snapshot):
    (workdir / "ckpt" / m.name / str(d) / "12").mkdir(parents=True)
    events.append("trained")
    return {"test_loss": 1.25}, None, np.arange(d)

  monkeypatch.setattr(fs, "run_one", fake_run_one)
  monkeypatch.setattr(fs, "precompile_model", lambda *a, **k: None)  # no real model here
  monkeypatch.setattr(fs.models, "count_params", lambda p: 10)
  m = fs.LoadedModel("m", "fam", None, None, None, None)
  data = {"train": type("T", (), {"input_ids": np.zeros((4, 3))})()}
  cfg = ml_collections.ConfigDict(dict(subsets=dict(sizes=(200,), seed=0), name="t",
                                       ntk=dict(num_probe=0)))
  runs = {("m", 0): {}}

  def failing_append(path, rec):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(fs, "append_run", failing_append)
  with pytest.raises(OSError, match="No space"):
    fs.sweep_model(m, data, cfg, None, tmp_path, runs)
  assert (tmp_path / "ckpt" / "m" / "200" / "12").is_dir()  # kept: the run resumes from it
  assert ("m", 200) not in runs
  monkeypatch.undo()
  monkeypatch.setattr(fs, "run_one", fake_run_one)
  monkeypatch.setattr(fs, "precompile_model", lambda *a, **k: None)  # no real model here
  monkeypatch.setattr(fs.models, "count_params", lambda p: 10)
  real_append, real_clear = fs.append_run, fs.clear_checkpoint
  monkeypatch.setattr(fs, "append_run", lambda p, r: (events.append("row"), real_append(p, r)))
  monkeypatch.setattr(fs, "clear_checkpoint",
                      lambda *a: (events.append("checkpoint deleted"), real_clear(*a)))
  import shutil
  shutil.rmtree(tmp_path / "ckpt")
  events.clear()
  fs.sweep_model(m, data, cfg, None, tmp_path, runs)
  assert events == ["trained", "row", "checkpoint deleted"]
  assert not (tmp_path / "ckpt" / "m" / "200").exists()
  assert fs.read_runs(tmp_path / "runs.jsonl")[("m", 200)]["test_loss"] == 1.25


@pytest.mark.slow
def test_second_instance_is_refused_at_once_naming_the_pid(curve_file, tmp_path):
  """Two processes on one output directory: the second ends at once with one line naming
  the first's pid (exit 2), and writes nothing."""
  out = tmp_path / "out"
  out.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from lensllm_jax import rundir\n"
       f"with rundir.directory_lock({str(out)!r}):\n  print('locked', flush=True); time.sleep(60)"],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
  try:
    assert holder.stdout.readline().strip() == "locked"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.reproduce_selection", "--config=configs/selection.py",
         f"--config.benchmarks=('{curve_file}',)", f"--output_dir={out}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("reproduce_selection: error: ") and "Traceback" not in proc.stderr
  assert f"in use by another run (pid {holder.pid}," in last
  assert sorted(p.name for p in pathlib.Path(out).iterdir()) == [rundir.LOCK]


@pytest.mark.slow
def test_fit_laws_rerun_with_other_laws_is_refused(curve_file, tmp_path):
  """experiments.fit_laws (a flag binary): the same command skips, another law list is
  refused with one line naming it, exit 2."""
  def fit_laws(*extra):
    return subprocess.run(
        [sys.executable, "-m", "experiments.fit_laws", "--config=configs/fit_laws.py",
         f"--config.benchmarks=('{curve_file}',)", "--config.num_restarts=1",
         f"--output_dir={tmp_path / 'out'}", *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)

  first = fit_laws("--config.laws=('rectified',)")
  assert first.returncode == 0, first.stderr[-2000:]
  before = (tmp_path / "out" / "toy7_rectified.csv").read_bytes()
  again = fit_laws("--config.laws=('rectified',)")
  assert again.returncode == 0 and "skip" in again.stderr
  other = fit_laws("--config.laws=('lensllm',)")
  assert other.returncode == 2, other.stderr[-2000:]
  assert re.search(r"fit_laws: error: .* holds results of other inputs \(config\.laws: "
                   r"\[\"rectified\"\] -> \[\"lensllm\"\]\)", other.stderr.strip().splitlines()[-1])
  assert (tmp_path / "out" / "toy7_rectified.csv").read_bytes() == before
