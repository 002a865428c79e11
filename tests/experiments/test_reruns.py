"""Reruns of train_curve_pfn, ntk_dynamics and lensllm_study's directories (`rundir`), and
the predictions lensllm_plus caches for its reruns (predictions.csv, fit_status.csv).

Each binary: the same inputs skip (or go on), a changed input or config is refused
with one line naming the difference, `config.overwrite=True` recomputes. In
process, on tiny inputs (seconds); the full binaries run in their own tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import curve_pfn as curve_pfn_config
from configs import study as study_config
from experiments import common, lensllm_plus, lensllm_study, ntk_dynamics, train_curve_pfn
from helpers.synthetic_curves import synthetic_curves
from lensllm_jax import errors, rundir
from lensllm_jax.curves import benchmarks
from lensllm_jax.plus import candidates, pfn
from lensllm_jax.training import sweep


def _refused(match):
  return pytest.raises(errors.WorkdirError, match=match)


def test_train_curve_pfn_rerun_skips_same_config_refuses_another(tmp_path, monkeypatch):
  """The binary's directories around a stand-in for `pfn.train` (whose training,
  tens of seconds even for 2 steps, tests/plus/test_curve_pfn.py covers): weights that
  depend on the config, saved and loaded by the binary's own code."""
  calls = []

  def stand_in(model_config, train_config, log=None):
    calls.append(train_config)
    params = {"w": np.full(3, train_config.learning_rate, np.float32)}
    return pfn.CurvePFNPredictor(model_config, params), [
        {"step": 1, "nll": 1.0, "seconds": 0.0}]

  monkeypatch.setattr(train_curve_pfn.pfn, "train", stand_in)
  cfg = curve_pfn_config.get_config("tiny")
  cfg.output_dir, cfg.log_dir = str(tmp_path / "weights"), str(tmp_path / "log")
  train_curve_pfn.run(cfg)
  weights = (tmp_path / "weights" / "weights.msgpack").read_bytes()
  again = train_curve_pfn.run(cfg)  # same manifest: the saved predictor, no training
  assert len(calls) == 1 and np.array_equal(again.params["w"], np.full(3, 3e-3, np.float32))
  cfg.train.learning_rate = 1e-3
  with _refused(r"config.train.learning_rate: 0.003 -> 0.001\); pass --config.overwrite=True"):
    train_curve_pfn.run(cfg)
  cfg.log_dir = str(tmp_path / "log2")  # a fresh log dir does not make the weights dir agree
  with _refused(r"weights holds results of other inputs \(config.train.learning_rate"):
    train_curve_pfn.run(cfg)
  assert len(calls) == 1 and not (tmp_path / "log2" / "train_log.csv").exists()
  cfg.overwrite = True
  train_curve_pfn.run(cfg)
  assert len(calls) == 2
  assert (tmp_path / "weights" / "weights.msgpack").read_bytes() != weights
  assert rundir.read_manifest(tmp_path / "weights")["config"]["train.learning_rate"] == 1e-3


def _study_dir(tmp_path):
  """A study results directory of one task: curves_x.csv and ntk_eigenpairs.csv."""
  curves, _ = synthetic_curves(num_models=4, seed=0, grid_max=3200)
  out = tmp_path / "study"
  out.mkdir()
  benchmarks.write_curves(curves, out / "curves_x.csv")
  rows = [{"task": "x", "model": m, "k": k, "eigval": 1.0 / (k + 1), "proj": 0.1, "eta": 1e-3}
          for m in curves.models for k in range(3)]
  common.append_rows(out / "ntk_eigenpairs.csv", list(rows[0]), rows)
  cfg = study_config.get_config("tiny")
  cfg.tasks = ("x",)
  cfg.subsets.sizes = tuple(int(d) for d in curves.data_sizes[1:])
  cfg.selection.max_steps, cfg.selection.num_restarts = 30, 1
  return cfg, out, curves


def test_ntk_dynamics_rerun_skips_same_inputs_refuses_changed_curves(tmp_path, monkeypatch):
  cfg, out, curves = _study_dir(tmp_path)
  path = ntk_dynamics.run(cfg, out, methods=("LensLLM",))
  first = path.read_bytes()
  assert len(common.read_rows(path)) == len(cfg.selection.ratios) * 4  # ratios x 4 metrics
  real = ntk_dynamics.task_results
  monkeypatch.setattr(ntk_dynamics, "task_results", lambda *a, **k: pytest.fail("refitted"))
  assert ntk_dynamics.run(cfg, out, methods=("LensLLM",)).read_bytes() == first  # skipped
  changed = benchmarks.CurveSet(**{**curves.__dict__, "losses": curves.losses * 1.01})
  benchmarks.write_curves(changed, out / "curves_x.csv")
  with _refused(r"input curves_x: sha256 \w+ -> \w+\); pass --config.overwrite=True"):
    ntk_dynamics.run(cfg, out, methods=("LensLLM",))
  with _refused(r"config.ntk_dynamics.methods"):
    ntk_dynamics.run(cfg, out, methods=("LensLLM", "Spectral"))
  monkeypatch.setattr(ntk_dynamics, "task_results", real)
  cfg.overwrite = True
  assert ntk_dynamics.run(cfg, out, methods=("LensLLM",)).read_bytes() != first
  # The study's own files are not this binary's outputs: overwrite left them.
  assert (out / "ntk_eigenpairs.csv").exists() and not (out / "manifest.json").exists()


def test_study_output_dir_rerun_refuses_another_config(tmp_path):
  cfg = study_config.get_config("tiny")
  out = tmp_path / "results"
  with lensllm_study.open_output_dir(cfg, out):
    (out / "summary.md").write_text("made\n")
  with lensllm_study.open_output_dir(cfg, out):  # same config: goes on
    pass
  other = study_config.get_config("tiny")
  other.selection.ratios = (2, 8)
  with _refused(r"config.selection.ratios: \[2, 4\] -> \[2, 8\]"):
    with lensllm_study.open_output_dir(other, out):
      pass
  # A study made before manifests (results/study): the report is refused, --kernels_only
  # (which checks its eigenpairs against the directory's ntk_spectra.csv) goes on.
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  (legacy / "ntk_spectra.csv").write_text("task,model\n")
  with _refused(r"holds results but no manifest.json"):
    with lensllm_study.open_output_dir(cfg, legacy):
      pass
  with lensllm_study.open_output_dir(cfg, legacy, kernels_only=True):
    pass
  assert rundir.read_manifest(legacy)["config"] == rundir.flatten_config(
      cfg, ("overwrite", "workdir", "output_dir"))


def test_study_sweep_workdir_made_before_manifests_is_adopted_if_its_config_matches(tmp_path):
  cfg = study_config.get_config("tiny")
  scfg = lensllm_study.sweep_config(cfg, "translate")
  old = tmp_path / "translate"
  old.mkdir()
  (old / "runs.jsonl").write_text('{"model": "m", "data_size": 0, "test_loss": 1.0}\n')
  # What every version before manifests wrote (sweep.bind_workdir of commit 5b76382~1).
  (old / "config.json").write_text(scfg.to_json_best_effort(indent=2, sort_keys=True))
  sweep.bind_workdir(scfg, old)
  assert rundir.read_manifest(old)["config"] == rundir.flatten_config(scfg,
                                                                      sweep.WORKDIR_IGNORE)
  assert (old / "runs.jsonl").exists()
  other = tmp_path / "other"
  other.mkdir()
  (other / "runs.jsonl").write_text((old / "runs.jsonl").read_text())
  changed = json.loads(scfg.to_json_best_effort())
  changed["num_test"] += 1
  (other / "config.json").write_text(json.dumps(changed))
  with _refused(r"holds results but no manifest.json .*pass --config.overwrite=True"):
    sweep.bind_workdir(scfg, other)
  sweep.bind_workdir(scfg, other, overwrite=True)  # recompute: the old runs are gone
  assert not (other / "runs.jsonl").exists() and rundir.read_manifest(other) is not None


def test_hessian_and_ntk_spectrum_workdirs_refuse_another_config_or_input(tmp_path):
  """The binaries' own `open_workdir` (what `run` opens after reading its inputs): same
  config and inputs go on, a changed field or token file is refused naming it."""
  from configs import hessian_spectrum as hessian_config
  from configs import ntk_spectrum as ntk_config
  from experiments import hessian_spectrum, ntk_spectrum

  probe = tmp_path / "probe.npy"
  np.save(probe, np.zeros((4, 8), np.int64))
  for binary, cfg, field, value in (
      (hessian_spectrum, hessian_config.get_config(), "num_examples", 32),
      (ntk_spectrum, ntk_config.get_config(), "n", 64)):
    key = "tokens_npy" if binary is hessian_spectrum else "probe"
    cfg[key] = str(probe)
    out = tmp_path / binary.__name__.split(".")[-1]
    with binary.open_workdir(cfg, out):
      (out / "eigenvalues.csv" if binary is hessian_spectrum else out / "spectrum.csv").write_text(
          "made\n")
    with binary.open_workdir(cfg, out):  # same config and inputs: goes on
      pass
    other = cfg.copy_and_resolve_references()
    other[field] = value
    with _refused(rf"config.{field}: \d+ -> {value}"):
      with binary.open_workdir(other, out):
        pass
    np.save(probe, np.ones((4, 8), np.int64))
    with _refused(rf"input {key}: sha256 \w+ -> \w+"):
      with binary.open_workdir(cfg, out):
        pass
    np.save(probe, np.zeros((4, 8), np.int64))


def test_zoo_workdir_refuses_another_corpus_or_model_spec_and_adopts_a_matching_legacy_one(
    tmp_path):
  """`zoo_build.bind_zoo_workdir` (build_zoo and lensllm_study, under the workdir's lock)."""
  from lensllm_jax.training import zoo_build

  cfg = study_config.get_config("tiny")
  work = tmp_path / "work"
  work.mkdir()
  zoo_build.bind_zoo_workdir(cfg, work)
  (work / "corpus.json").write_text("{}")  # a result of this config
  zoo_build.bind_zoo_workdir(cfg, work)  # same: goes on
  other = study_config.get_config("tiny")
  other.corpus.max_files = 60
  with _refused(r"config.corpus.max_files: 120 -> 60"):
    zoo_build.bind_zoo_workdir(other, work)
  other = study_config.get_config("tiny")
  other.zoo[0]["pretrain_steps"] = 13
  with _refused(r"config.zoo\[gpt2-a\].pretrain_steps: 12 -> 13"):
    zoo_build.bind_zoo_workdir(other, work)
  other = study_config.get_config("tiny")
  other.zoo = [*cfg.zoo, dict(name="extra", arch="gpt2", d_model=8, n_layers=1, n_heads=2,
                              pretrain_steps=0)]
  zoo_build.bind_zoo_workdir(other, work)  # a model added: goes on
  # Made before the manifest: adopted when zoo.jsonl records the config's specs.
  for name, steps, adopted in (("legacy", 12, True), ("stale", 99, False)):
    old = tmp_path / name
    old.mkdir()
    spec = {**cfg.zoo[0], "init_seed": 0, "pretrain_steps": steps}
    (old / "zoo.jsonl").write_text(json.dumps({**spec, "family": "GPT-2"}) + "\n")
    if adopted:
      zoo_build.bind_zoo_workdir(cfg, old)
      assert rundir.read_manifest(old, zoo_build.ZOO_MANIFEST)["config"]["tokenizer_vocab"] == 300
    else:
      with _refused(r"holds results but no manifest.zoo.json"):
        zoo_build.bind_zoo_workdir(cfg, old)


def test_zoo_records_drop_a_row_cut_by_a_kill(tmp_path):
  """zoo.jsonl recovers like runs.jsonl (`rundir.read_json_lines`): the cut last record is
  removed and its model pre-trained again; a damaged earlier line is named."""
  from lensllm_jax.training import zoo_build

  path = tmp_path / "zoo.jsonl"
  zoo_build.append_jsonl(path, {"name": "a", "size": 1})
  whole = path.read_bytes()
  with open(path, "ab") as f:
    f.write(b'{"name": "b", "si')
  assert zoo_build.read_jsonl(path) == [{"name": "a", "size": 1}]
  assert path.read_bytes() == whole
  path.write_bytes(b"oops\n" + whole)
  with _refused(r"zoo.jsonl line 1: not JSON"):
    zoo_build.read_jsonl(path)


def test_lensllm_plus_predictions_csv_reads_back_the_typed_predictions(tmp_path):
  """`prediction_rows` and `status_rows` written, `read_predictions` gives the same
  BasePredictions back: every float64 bit (inf and NaN included; a float32 PFN output as
  float64), sd, quantiles and statuses, in the order of the ratios asked for; another file's
  rows are not read, a job without a row at some ratio is left out (it is redone), and a key
  that is not its job's is refused naming the line."""
  rng = np.random.default_rng(0)
  ratios, shape = (8, 128), (2, 3)
  mean = rng.uniform(1.0, 3.0, shape)
  mean[0, 1], mean[1, 2] = np.inf, np.nan
  pfn_mean = rng.uniform(1.0, 3.0, shape).astype(np.float32)
  preds = {
    "AtS": candidates.BasePrediction(rng.uniform(1.0, 3.0, shape)),
    "RectifiedFit": candidates.BasePrediction(
      mean, status=np.array([["converged", "degenerate", "max_steps"]] * 2)),
    "CurvePFN": candidates.BasePrediction(
      pfn_mean, rng.uniform(0.0, 0.1, shape), {0.1: 0.9 * pfn_mean, 0.9: 1.1 * pfn_mean}),
    "PooledLensLLM[s=1]": candidates.BasePrediction(
      rng.uniform(1e-300, 1e-299, shape), status=np.full(shape, "converged")),
  }
  for dataset, scale in (("a", 1.0), ("other", 2.0)):
    for job, p in preds.items():
      p = candidates.BasePrediction(p.mean * scale, p.sd_log, p.quantiles, p.status)
      common.append_rows(tmp_path / "predictions.csv", lensllm_plus.PRED_HEADER,
                         lensllm_plus.prediction_rows(dataset, job, p, ratios))
      common.append_rows(tmp_path / "fit_status.csv", lensllm_plus.STATUS_HEADER,
                         lensllm_plus.status_rows(dataset, job, p, ratios))
  # A job cut short: its row at ratio 128 never written.
  cut = candidates.BasePrediction(mean)
  common.append_rows(tmp_path / "predictions.csv", lensllm_plus.PRED_HEADER,
                     lensllm_plus.prediction_rows("a", "Spectral", cut, ratios)[:1])
  for order in (ratios, ratios[::-1]):
    got = lensllm_plus.read_predictions(tmp_path, "a", order)
    assert list(got) == list(preds)
    rows = slice(None) if order == ratios else slice(None, None, -1)
    for job, want in preds.items():
      g = got[job]
      np.testing.assert_array_equal(g.mean, np.asarray(want.mean, np.float64)[rows])
      assert g.mean.dtype == np.float64
      if want.sd_log is None:
        assert g.sd_log is None
      else:
        np.testing.assert_array_equal(g.sd_log, want.sd_log[rows])
      assert list(g.quantiles) == list(want.quantiles)
      for level, q in want.quantiles.items():
        np.testing.assert_array_equal(g.quantiles[level], np.asarray(q, np.float64)[rows])
      if want.status is None:
        assert g.status is None
      else:
        np.testing.assert_array_equal(g.status, want.status[rows])
  rows = common.read_rows(tmp_path / "predictions.csv")
  rows.append({**rows[0], "key": "AtS_mean"})
  (tmp_path / "predictions.csv").unlink()
  common.append_rows(tmp_path / "predictions.csv", lensllm_plus.PRED_HEADER, rows)
  with _refused(rf"predictions.csv: line {len(rows) + 1}: key 'AtS_mean' is not 'AtS'"):
    lensllm_plus.read_predictions(tmp_path, "a", ratios)
