"""Online selection of `experiments.select` on tiny models (configs/select.py:online_smoke).

Three models of one tiny architecture: two pre-trained (seeds 0, 2) and one
untrained. One uninterrupted run is shared by the tests (about a minute on 2
cores); the SIGKILL test runs a second one, killed mid-round and resumed. Every
run loads the programs already compiled from the session's compilation cache
(conftest.compilation_cache_dir).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from configs import select as select_config
from experiments import select
from helpers.synthetic_curves import synthetic_curves
from lensllm_jax import errors, models, rundir, training
from lensllm_jax.curves import benchmarks
from lensllm_jax.training import sharding, sweep, textdata

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARGS = ["-m", "experiments.select", "--config=configs/select.py:online_smoke"]


def _decisions(workdir):
  return [json.loads(line) for line in (workdir / "decisions.jsonl").read_text().splitlines()]


def _runs(workdir):
  return [json.loads(line) for line in (workdir / "runs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def args(compilation_cache_dir):
  """The online_smoke command line, with the session's compilation cache."""
  return [*ARGS, f"--compilation_cache_dir={compilation_cache_dir}"]


@pytest.fixture(scope="module")
def online(tmp_path_factory, args):
  workdir = tmp_path_factory.mktemp("online") / "w"
  r = subprocess.run([sys.executable, *args, f"--workdir={workdir}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir, r.stderr


@pytest.mark.slow
def test_picks_a_pretrained_model_and_stopped_models_run_no_more(online):
  workdir, log = online
  first = (workdir / "selection.md").read_text().splitlines()[0]
  assert first.startswith("fine-tune tiny-pretrained") and "at D = 3200" in first
  assert first in log and "round 0: D=25, active 3/3, spent " in log
  rows = _decisions(workdir)
  stopped = {m: r["data_size"] for r in rows for m in r["stopped"]}
  assert "tiny-untrained" in stopped  # confidently worse: pre-training is worth a lot here
  runs = _runs(workdir)
  for m, d in stopped.items():
    assert max(r["data_size"] for r in runs if r["model"] == m) == d
  assert max(r["data_size"] for r in runs) > stopped["tiny-untrained"]  # the others went on
  for r in rows:  # a model runs in a round iff it was active after the previous one
    assert r["ran"] == (rows[r["round"] - 1]["active"] if r["round"] else
                        ["tiny-pretrained", "tiny-pretrained-b", "tiny-untrained"])
  # The compute is the runs' own train FLOPs (every run here was paid by the procedure).
  assert rows[-1]["flops"] == sum(r["train_flops"] for r in runs if r["data_size"] > 0)
  assert rows[-1]["fraction_of_full"] == pytest.approx(
      rows[-1]["flops"] / sum(6 * r["size"] * 3200 * r["max_len"] for r in runs
                              if r["data_size"] == 0))
  assert "ended_by" in rows[-1] and "ended_by" not in rows[0]


@pytest.mark.slow
def test_replaying_the_online_curves_gives_the_same_decisions(online, tmp_path):
  workdir, _ = online
  cfg = select_config.get_config("online_smoke")
  cfg.replay = str(workdir / "curves.csv")
  select.run_replay(cfg, tmp_path)
  keys = ("round", "data_size", "ran", "active", "stopped", "predictions")
  online_rows = [{k: r[k] for k in keys} for r in _decisions(workdir)]
  assert [{k: r[k] for k in keys} for r in _decisions(tmp_path)] == online_rows
  head = (tmp_path / "selection.md").read_text().splitlines()[0]
  assert head == (workdir / "selection.md").read_text().splitlines()[0]


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_gives_the_same_decisions(online, args, tmp_path):
  workdir, _ = online
  killed = tmp_path / "killed"
  killed.mkdir()
  for name in ("pretrained", "data"):  # skip the pre-training (deterministic, cached)
    shutil.copytree(workdir / name, killed / name)
  for name in ("tokenizer.json", "manifest.json"):  # the same config: the caches are reused
    shutil.copy(workdir / name, killed / name)
  proc = subprocess.Popen([sys.executable, *args, f"--workdir={killed}"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  runs = killed / "runs.jsonl"
  deadline = time.time() + 600
  # Three zero-shot rows, then kill inside round 1 (D=50) or round 0, after a run.
  while time.time() < deadline and proc.poll() is None:
    if runs.exists() and len(runs.read_text().splitlines()) >= 5:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  n = len(runs.read_text().splitlines())
  assert 5 <= n < len(_runs(workdir)), n  # mid-procedure: some runs done, not all
  r = subprocess.run([sys.executable, *args, f"--workdir={killed}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (killed / "decisions.jsonl").read_text() == (workdir / "decisions.jsonl").read_text()
  assert ((killed / "selection.md").read_text().splitlines()[0]
          == (workdir / "selection.md").read_text().splitlines()[0])


def _bind(cfg, workdir):
  with select.open_online_workdir(cfg, workdir):
    pass


def test_workdir_of_another_task_or_model_is_refused(tmp_path):
  cfg = select_config.get_config("online_smoke")
  _bind(cfg, tmp_path)
  (tmp_path / "runs.jsonl").write_text("")  # results now stand beside the manifest
  more = select_config.get_config("online_smoke")
  extra = more.models[0].to_dict()
  extra["name"] = "tiny-extra"
  more.models.append(type(more.models[0])(extra))
  more.z, more.max_data_num, more.subsets.sizes = 0.1, 400, (200, 400, 800)
  _bind(more, tmp_path)  # an added model, a lower z, a raised cap: continues
  manifest = rundir.read_manifest(tmp_path)["config"]
  assert [m["name"] for m in manifest["models"]][-1] == "tiny-extra"
  assert manifest["subsets.sizes"] == [200, 400, 800]
  task = select_config.get_config("online_smoke")
  task.num_test = 10
  with pytest.raises(errors.WorkdirError, match=r"\(config.num_test: 64 -> 10\); pass "):
    _bind(task, tmp_path)
  changed = select_config.get_config("online_smoke")
  changed.models[1].init_seed = 7
  with pytest.raises(errors.WorkdirError,
                     match=r"config.models\[tiny-pretrained-b\].init_seed: 2 -> 7"):
    _bind(changed, tmp_path)
  changed.overwrite = True  # recomputes: the runs are deleted, the manifest starts anew
  _bind(changed, tmp_path)
  assert not (tmp_path / "runs.jsonl").exists()
  assert rundir.read_manifest(tmp_path)["config"]["models"][1]["init_seed"] == 7


def test_predict_output_dir_rerun_with_other_curves_is_refused(tmp_path):
  curves, _ = synthetic_curves(num_models=4, seed=0)
  other, _ = synthetic_curves(num_models=4, seed=1)
  paths = []
  for i, c in enumerate((curves, other)):
    paths.append(tmp_path / f"c{i}.csv")
    benchmarks.write_curves(c, paths[-1])
  cfg = select_config.get_config()
  cfg.predictor = "AtS"  # seconds
  cfg.curves, cfg.target_data_num = str(paths[0]), 2 * int(max(curves.data_sizes))
  out = tmp_path / "out"
  select.run_predict(cfg, out)
  first = (out / "selection.csv").read_bytes()
  select.run_predict(cfg, out)  # same inputs: recomputed in place
  assert (out / "selection.csv").read_bytes() == first
  cfg.curves = str(paths[1])
  with pytest.raises(errors.WorkdirError, match=r"input curves: sha256 \w+ -> \w+"):
    select.run_predict(cfg, out)
  assert (out / "selection.csv").read_bytes() == first


def _copy(workdir, dest):
  shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns("ckpt"))
  return dest


@pytest.mark.slow
def test_lower_z_and_raised_cap_continue_from_what_was_run(online, args, tmp_path):
  workdir, _ = online
  before = (workdir / "runs.jsonl").read_text()
  keys = ("round", "data_size", "ran", "active", "stopped", "predictions")
  rows = [{k: r[k] for k in keys} for r in _decisions(workdir)]
  lower = _copy(workdir, tmp_path / "lower")
  r = subprocess.run([sys.executable, *args, f"--workdir={lower}", "--config.z=0.05"],
                     cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (lower / "runs.jsonl").read_text() == before  # nothing new to run
  new = _decisions(lower)
  assert sum(len(x["active"]) for x in new) <= sum(len(x["active"]) for x in _decisions(workdir))
  raised = _copy(workdir, tmp_path / "raised")
  r = subprocess.run([sys.executable, *args, f"--workdir={raised}", "--config.max_data_num=400"],
                     cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  after = (raised / "runs.jsonl").read_text()
  assert after.startswith(before)
  added = [json.loads(line) for line in after[len(before):].splitlines()]
  assert sorted(a["model"] for a in added) == rows[-1]["active"]
  assert {a["data_size"] for a in added} == {400}
  assert [{k: r[k] for k in keys} for r in _decisions(raised)][:len(rows)] == rows


def test_models_of_one_shape_share_their_compiled_programs(tmp_path, monkeypatch):
  """Online runs of two untrained models of one architecture (init seeds 1 and 3): the
  second model's zero-shot point and fine-tuning run compile nothing, nor does the first
  model's next round after it is loaded again (the oracle keeps one model in memory). The
  shared programs compute with each model's own parameters: the second zero-shot loss
  equals a fresh, uncached eval program's on its parameters."""
  cfg = select_config.get_config("online_smoke")
  first = cfg.models[2]  # tiny-untrained: no pre-training
  second = type(first)(dict(first.to_dict(), name="tiny-untrained-b", init_seed=3))
  cfg.models = [first, second]
  cfg.subsets.sizes = (25, 50)
  cfg.train.max_steps, cfg.train.eval_every = 4, 2  # compilation is the cost; a few steps
  compiled = []  # (model, D, {program: compilations}) per run, model loading included
  run = select.FinetuneOracle._run

  def counted_run(self, name, d):
    with training.count_compilations() as counts:
      run(self, name, d)
    compiled.append((name, d, dict(counts)))

  monkeypatch.setattr(select.FinetuneOracle, "_run", counted_run)
  oracle = select.FinetuneOracle(cfg, tmp_path, [25.0, 50.0], mesh=sharding.make_mesh(),
                                 progress=select.Progress(2))
  oracle.reveal([0, 1], 25.0)
  oracle.reveal([0], 50.0)  # reloads the first model
  assert [c[:2] for c in compiled] == [("tiny-untrained", 0), ("tiny-untrained-b", 0),
                                       ("tiny-untrained", 25), ("tiny-untrained-b", 25),
                                       ("tiny-untrained", 50)]
  assert compiled[0][2].get("jit(eval_fn)") and compiled[2][2].get("jit(step_fn)"), compiled
  assert [c[2] for c in compiled[1:2] + compiled[3:]] == [{}, {}, {}], compiled
  losses = {(r["model"], r["data_size"]): r["test_loss"] for r in oracle.runs.values()}
  assert losses[("tiny-untrained", 0)] != losses[("tiny-untrained-b", 0)]
  b = sweep.load_model(second, cfg, tmp_path, oracle.splits, None)
  data = textdata.encode_examples(oracle.splits["test"], b.tokenizer, cfg.max_len)
  fresh = training.make_eval_step(training.causal_lm_apply(models.build(b.config)))
  assert training.evaluate(fresh, b.params, data, cfg.train.eval_batch_size) == pytest.approx(
      losses[("tiny-untrained-b", 0)], rel=1e-6)
