"""End-to-end test of experiments/finetune_sweep.py on its smoke configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import REPO_ROOT
from lensllm_jax import errors
from lensllm_jax.curves import benchmarks

pytestmark = pytest.mark.slow  # end-to-end runs of the sweep binary


def _sweep_args(workdir, cache_dir, *overrides):
  """The smoke sweep's command, keeping the fine-tuned weights (read by the tests below).
  Its runs in this module share one JAX compilation cache: a rerun or restart then
  loads the compiled programs instead of recompiling (the compiled programs, hence
  the numbers, are the same)."""
  return [sys.executable, "-m", "experiments.finetune_sweep",
          "--config=configs/finetune_tiny.py:smoke", f"--workdir={workdir}",
          f"--compilation_cache_dir={cache_dir}", "--config.save_finetuned=True", *overrides]


def _run(workdir, cache_dir):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  proc = subprocess.run(_sweep_args(workdir, cache_dir), cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp("sweep")
  proc = _run(workdir, cache_dir)
  (workdir.parent / f"{workdir.name}.log").write_text(proc.stderr)  # outside the workdir
  return workdir


def test_each_run_logs_its_time_breakdown(sweep):
  """One `sweep.RUN_TIMING` line per run: steps and eval are the row's own timings, the
  total covers the row's wall time (and the row's write after it), outside the rest."""
  import re

  from lensllm_jax.training import sweep as finetune_sweep

  log = (sweep.parent / f"{sweep.name}.log").read_text()
  lines = {int(m["d"]): {k: float(v) for k, v in m.groupdict().items() if k not in ("model", "d")}
           for m in re.finditer(finetune_sweep.RUN_TIMING_PATTERN, log)}
  rows = {r["data_size"]: r for r in map(json.loads, (sweep / "runs.jsonl").read_text().splitlines())}
  assert sorted(lines) == sorted(rows) == [0, 200, 400]
  for d, t in lines.items():
    r = rows[d]
    assert t["total"] >= r["wall_seconds"] - 1e-3 and t["bookkeeping"] >= 0
    assert t["total"] == pytest.approx(t["steps"] + t["eval"] + t["outside"], abs=2e-3)
    if d:
      assert t["steps"] == pytest.approx(r["seconds_train"], abs=1e-3)
      assert t["eval"] == pytest.approx(r["seconds_eval"], abs=1e-3)
      assert t["ntk"] == pytest.approx(r["seconds_ntk"], abs=1e-3) and t["outside"] >= t["ntk"] - 2e-3
    else:
      assert t["steps"] == 0 and t["eval"] > 0


def test_curve_file_loads_back(sweep):
  curves = benchmarks.load_curves(str(sweep / "curves.csv"))
  assert curves.models == ("tiny-gpt2",) and curves.families == ("GPT-2",)
  np.testing.assert_array_equal(curves.data_sizes, [0, 200, 400])
  runs = [json.loads(x) for x in (sweep / "runs.jsonl").read_text().splitlines()]
  by_d = {r["data_size"]: r for r in runs}
  assert sorted(by_d) == [0, 200, 400]
  np.testing.assert_allclose(curves.losses[0], [by_d[d]["test_loss"] for d in (0, 200, 400)])
  assert curves.sizes[0] == by_d[0]["size"] > 0
  # Fine-tuning lowers the test loss below zero-shot.
  assert curves.losses[0, 1] < curves.losses[0, 0] and curves.losses[0, 2] < curves.losses[0, 0]


def test_run_metadata(sweep):
  runs = [json.loads(x) for x in (sweep / "runs.jsonl").read_text().splitlines()]
  for r in runs:
    if r["data_size"] == 0:
      continue
    assert 0 < r["best_step"] <= r["steps"] <= 12
    assert r["train_tokens"] <= r["steps"] * 16 * r["max_len"]
    assert r["train_flops"] > r["flops_6nd"] > 0
    assert r["history"][0]["step"] == 0
    ntk = np.load(r["ntk"]["file"])
    assert ntk["theta_finetuned"].shape == (4, 4)
    # Kernels are symmetric PSD Gram matrices.
    np.testing.assert_allclose(ntk["theta_pretrained"], ntk["theta_pretrained"].T, rtol=1e-4,
                               atol=1e-6)
    assert np.linalg.eigvalsh(ntk["theta_finetuned"]).min() > -1e-4 * ntk["theta_finetuned"].max()
    assert 0 <= r["ntk"]["kernel_distance"] <= 1
  assert not (sweep / "ckpt" / "tiny-gpt2" / "200").exists()  # finished runs clean up


def test_rerun_skips_finished(sweep, cache_dir):
  before = (sweep / "runs.jsonl").read_text()
  proc = _run(sweep, cache_dir)
  assert (sweep / "runs.jsonl").read_text() == before
  assert "(1 models)" in proc.stderr  # absl logging


def test_pretrained_kernel_is_cached_and_matches_the_run_snapshots(sweep):
  """The pre-trained kernel file (which feeds F(Theta, t)) equals the kernel stored with
  each run, and its outputs are mean target-token log-likelihoods (<= 0)."""
  with np.load(sweep / "ntk" / "tiny-gpt2_pretrained.npz") as z:
    theta, f0 = z["theta"], z["f0"]
  assert theta.shape == (4, 4) and f0.shape == (4,) and np.all(f0 <= 0)
  run = np.load(sweep / "ntk" / "tiny-gpt2_D200.npz")
  np.testing.assert_array_equal(run["theta_pretrained"], theta)


def _budget_config(epochs):
  import ml_collections

  return ml_collections.ConfigDict(dict(
      train=dict(batch_size=16, max_steps=1600, eval_every=40),
      step_budget=dict(epochs=epochs, min_steps=40)))


@pytest.mark.parametrize("d, steps", [(200, 40), (640, 40), (1000, 80), (6400, 400),
                                      (25600, 1600), (10 ** 6, 1600)])
def test_step_budget_closed_form(d, steps):
  """clip(ceil(D / 16), 40, 1600) rounded up to a multiple of 40."""
  from lensllm_jax.training import sweep as finetune_sweep

  assert finetune_sweep.step_budget(_budget_config(1.0), d) == steps


def test_step_budget_off_without_epochs():
  from lensllm_jax.training import sweep as finetune_sweep

  assert finetune_sweep.step_budget(_budget_config(0.0), 200) is None


def test_workdir_manifest_refuses_other_configs_and_allows_more_sizes_or_fewer_models(tmp_path):
  import ml_collections

  from lensllm_jax.training import sweep as finetune_sweep

  def config(sizes, models=("a", "b"), lr=1e-3):
    return ml_collections.ConfigDict(dict(
        name="t", task="synthetic", subsets=dict(sizes=sizes), train=dict(learning_rate=lr),
        models=[ml_collections.ConfigDict(dict(name=n, hf_dir="", preset="tiny-gpt2"))
                for n in models]))

  finetune_sweep.bind_workdir(config((10, 20)), tmp_path)
  # A workdir with results (a manifest alone, from a run that failed before any, is replaced).
  (tmp_path / "runs.jsonl").write_text('{"model": "a", "data_size": 10}\n')
  finetune_sweep.bind_workdir(config((10, 20)), tmp_path)  # same configuration: fine
  finetune_sweep.bind_workdir(config((10, 20, 40)), tmp_path)  # one more size: fine
  finetune_sweep.bind_workdir(config((10,), models=("b",)), tmp_path)  # fewer: fine
  recorded = json.loads((tmp_path / "manifest.json").read_text())["config"]
  assert recorded["subsets.sizes"] == [10, 20, 40]
  assert [m["name"] for m in recorded["models"]] == ["a", "b"]
  with pytest.raises(errors.WorkdirError, match=r"config\.train\.learning_rate: 0\.001 -> 0\.01"):
    finetune_sweep.bind_workdir(config((10, 20), lr=1e-2), tmp_path)
  other = config((10, 20))
  other.models[0].preset = "tiny-llama"  # same name, another model: refused
  with pytest.raises(errors.WorkdirError, match=r"config\.models\[a\]"):
    finetune_sweep.bind_workdir(other, tmp_path)
  # A workdir made before subset_sizes became subsets.sizes: refused naming both names.
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  manifest["config"]["subset_sizes"] = manifest["config"].pop("subsets.sizes")
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(errors.WorkdirError, match=r'config\.subset_sizes: \[10, 20, 40\] -> '
                     r'"<absent>"; config\.subsets\.sizes: "<absent>" -> \[10, 20, 40\]'):
    finetune_sweep.bind_workdir(config((10, 20, 40)), tmp_path)


def test_saved_finetuned_params_reproduce_the_recorded_test_loss(sweep):
  """finetuned/<model>/<D> (config.save_finetuned) holds the evaluated weights: the test
  loss recomputed from them and the binary's own splits equals runs.jsonl's."""
  import pathlib

  from configs import finetune_tiny
  from lensllm_jax import training
  from lensllm_jax.training import sweep as finetune_sweep
  from lensllm_jax.training import textdata

  cfg = finetune_tiny.get_config("smoke")
  workdir = pathlib.Path(sweep)
  splits = finetune_sweep.load_splits(cfg, workdir)
  m = finetune_sweep.load_model(cfg.models[0], cfg, workdir, splits, mesh=None)
  test = textdata.encode_examples(splits["test"], m.tokenizer, cfg.max_len)
  lines = (sweep / "runs.jsonl").read_text().splitlines()
  runs = {r["data_size"]: r for r in map(json.loads, lines)}
  params = training.load_params(runs[400]["finetuned_params"], m.params)
  loss = training.evaluate(training.cached_eval_step(m.apply_fn), params, test,
                           cfg.train.eval_batch_size)
  np.testing.assert_allclose(loss, runs[400]["test_loss"], rtol=1e-5)
  changed = [float(np.abs(a - b).max()) for a, b in
             zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(m.params),
                 strict=True)]
  assert max(changed) > 0


def test_sigkill_mid_run_then_restart_gives_the_uninterrupted_files(sweep, cache_dir, tmp_path):
  """A real kill: SIGKILL while a fine-tuning run is in flight (after its first orbax
  checkpoint; checkpoints at every evaluation, as a long run writes them), restart with
  the same command: runs.jsonl has the same rows with the same values as the
  uninterrupted sweep (timings aside; floats exactly equal), curves.csv is
  byte-identical, and the restarted run resumed from its checkpoint."""
  from helpers import sweep_compare

  workdir = tmp_path / "killed"
  args = _sweep_args(workdir, cache_dir, "--config.checkpoint.every_seconds=0")
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  with open(tmp_path / "first.log", "w") as log:
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    step_dir = sweep_compare.kill_mid_run([proc], workdir, timeout=300)
  d, step = int(step_dir.parent.name), int(step_dir.name)
  done = [r["data_size"] for r in sweep_compare.read_rows(workdir)]
  assert d not in done and 0 in done  # killed inside the run on d examples
  proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"D={d} step {step} / " not in proc.stderr  # resumed after the checkpointed step
  assert f"D={d} step {2 * step} / " in proc.stderr
  got, want = sweep_compare.read_rows(workdir), sweep_compare.read_rows(sweep)
  assert [(r["model"], r["data_size"]) for r in got] == [(r["model"], r["data_size"])
                                                         for r in want]
  for a, b in zip(got, want, strict=True):
    sweep_compare.assert_same(b, a, rtol=0, where=f"D={b['data_size']}")
  assert (workdir / "curves.csv").read_bytes() == (sweep / "curves.csv").read_bytes()


def test_partial_last_row_is_dropped(tmp_path):
  """A row cut by a kill during the append (no newline) is removed, the run redone."""
  from lensllm_jax.training import sweep as finetune_sweep

  path = tmp_path / "runs.jsonl"
  finetune_sweep.append_run(path, {"model": "m", "data_size": 0, "test_loss": 1.5})
  whole = path.read_text()
  with open(path, "a") as f:
    f.write('{"model": "m", "data_size": 200, "test_lo')
  runs = finetune_sweep.read_runs(path)
  assert list(runs) == [("m", 0)] and runs[("m", 0)]["test_loss"] == 1.5
  assert path.read_text() == whole
  path.write_text(whole + "not json\n")
  with pytest.raises(ValueError, match="line 2: not JSON"):
    finetune_sweep.read_runs(path)


def test_hessian_spectrum_on_the_saved_checkpoints(sweep, tmp_path):
  """experiments.hessian_spectrum on the sweep's pre-trained and fine-tuned weights
  (config.pretrained_ckpt / finetuned_ckpt / model_config): its PAC-Bayes table is
  pac_bayes.layer_table's on the same weights, data and key."""
  import pandas as pd

  from experiments import hessian_common
  from lensllm_jax import models, training
  from lensllm_jax.theory import pac_bayes

  out = tmp_path / "hessian"
  ckpts = dict(pretrained_ckpt=sweep / "pretrained" / "tiny-gpt2",
               finetuned_ckpt=sweep / "finetuned" / "tiny-gpt2" / "400",
               model_config=sweep / "models" / "tiny-gpt2.json")
  # Smallest settings: the cost is compilation (~25 s CPU for the binary).
  small = {"num_examples": 2, "batch_size": 2, "seq_len": 16, "lanczos.k": 2,
           "lanczos.iters": 4, "hutchinson.probes": 2, "slq.probes": 1, "slq.iters": 4,
           "pac_bayes.iters": 3, "seed": 0}
  log = tmp_path / "hessian_spectrum.log"
  with open(log, "w") as fh:  # runs while the reference table is computed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.hessian_spectrum", f"--workdir={out}",
         "--config=configs/hessian_spectrum.py"] +
        [f"--config.{k}={v}" for k, v in {**ckpts, **small}.items()],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), stdout=fh,
        stderr=subprocess.STDOUT)
  try:
    config = models.ModelConfig(**json.loads(ckpts["model_config"].read_text()))
    like = models.init_params(config, jax.random.PRNGKey(0))
    params0 = training.load_params(str(ckpts["pretrained_ckpt"]), like)
    params1 = training.load_params(str(ckpts["finetuned_ckpt"]), like)
    data = hessian_common.markov_sequences(config.vocab_size, 2, 16, chain_seed=1000, seed=0)
    rows = pd.DataFrame(pac_bayes.layer_table(
        hessian_common.lm_loss_fn(models.build(config)), params1, params0, data,
        jax.random.fold_in(jax.random.PRNGKey(7), 1), num_iters=3, c=1.0, n=2))
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
  table = pd.read_csv(out / "pac_bayes.csv")
  assert list(table["block"]) == list(rows["block"]) and len(rows) > 1
  numeric = [c for c in rows.columns if c != "block"]
  np.testing.assert_allclose(table[numeric].to_numpy(float), rows[numeric].to_numpy(float),
                             rtol=1e-4, atol=1e-7)
  assert (rows["v_norm"] > 0).any()  # fine-tuning moved the weights: a non-trivial table
  summary = json.loads((out / "summary.json").read_text())
  assert summary["pac_bayes_sum_max"] == pytest.approx(
      pac_bayes.pac_bayes_bound(rows["vhpv_max"], 1.0, 2), rel=1e-4)
  assert len(pd.read_csv(out / "eigenvalues.csv")) == 2
