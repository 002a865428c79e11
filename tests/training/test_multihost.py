"""Runs across processes with jax.distributed (CPU here; the same code on GPU/TPU hosts).

Two local processes, 2 host devices each, joined by jax.distributed (coordinator
on 127.0.0.1, gloo collectives; conftest.ProcessGroup kills both on a failure
or a timeout) against one process with 4 host devices:

  * experiments.finetune_sweep --distributed, SIGKILLed (both processes) in the
    middle of a run after an orbax checkpoint and restarted (both): the same
    runs.jsonl rows, curves.csv and fine-tuned parameters as the uninterrupted
    4-device run (rtol 1e-5), each row written once (process 0 only) and the
    interrupted run resumed from its checkpoint;
  * the sweep's NTK snapshots, blocked with the block pairs sharded over the 4
    devices of both processes (config.ntk.block_size), equal the 4-device
    snapshots and the kernel of one process on one device.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import (
  REPO_ROOT,
  ProcessGroup,
  ephemeral_port_range,
  free_port,
  host_device_env,
  sweep_compare,
)
from lensllm_jax import models, training
from lensllm_jax.curves import benchmarks
from lensllm_jax.theory import ntk

pytestmark = pytest.mark.slow  # multi-process runs (jax.distributed)

# The smoke sweep without its pre-training (fine-tuning starts from the seeded
# init): the least compilation that still runs every part of a sweep.
LEAN_CONFIG = """
from configs import finetune_tiny

def get_config():
  c = finetune_tiny.get_config("smoke")
  c.models[0].pretrain_steps = 0
  c.save_finetuned = True
  c.checkpoint.every_seconds = 0.0  # at every evaluation: the kill finds a checkpoint
  return c
"""


def _sweep_args(tmp_path, workdir, cache_dir):
  """The lean sweep's command. The runs of this module share one JAX compilation
  cache, so the restart after the kill loads the programs the killed processes
  compiled (the same programs: the same numbers)."""
  config = tmp_path / "lean_config.py"
  config.write_text(LEAN_CONFIG)
  return ["-m", "experiments.finetune_sweep", f"--config={config}", f"--workdir={workdir}",
          f"--compilation_cache_dir={cache_dir}"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """The sweep in one process with 4 host devices (data-parallel mesh of 4)."""
  tmp = tmp_path_factory.mktemp("reference")
  workdir = tmp / "wd"
  proc = subprocess.run([sys.executable, *_sweep_args(tmp, workdir, cache_dir)], cwd=REPO_ROOT,
                        env=host_device_env(4), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _finetuned(workdir, d):
  return training.load_params(str(workdir / "finetuned" / "tiny-gpt2" / str(d)))


def test_two_processes_match_one_and_resume_after_a_kill(reference, cache_dir, tmp_path):
  workdir = tmp_path / "wd"
  args = _sweep_args(tmp_path, workdir, cache_dir) + ["--distributed"]
  group = ProcessGroup(args, tmp_path, tag="first")
  try:
    step_dir = sweep_compare.kill_mid_run(group.procs, workdir, timeout=400)
  finally:
    group.kill()
  d, step = int(step_dir.parent.name), int(step_dir.name)
  assert d not in [r["data_size"] for r in sweep_compare.read_rows(workdir)]
  logs = ProcessGroup(args, tmp_path, tag="restart").wait(timeout=400)
  for log in logs:  # both processes restored the checkpoint and joined the mesh of 4
    assert f"D={d} step {step} / " not in log and f"D={d} step {2 * step} / " in log
  got, want = sweep_compare.read_rows(workdir), sweep_compare.read_rows(reference)
  # One row per run: process 1 appended nothing (both would give 2 rows per run).
  assert [(r["model"], r["data_size"]) for r in got] == [(r["model"], r["data_size"])
                                                         for r in want]
  assert len(got) == 3
  for a, b in zip(got, want, strict=True):
    sweep_compare.assert_same(b, a, rtol=1e-5, where=f"D={b['data_size']}")
  c_got = benchmarks.load_curves(str(workdir / "curves.csv"))
  c_want = benchmarks.load_curves(str(reference / "curves.csv"))
  assert c_got.models == c_want.models
  np.testing.assert_allclose(c_got.losses, c_want.losses, rtol=1e-5)
  for size in (200, 400):
    for a, b in zip(jax.tree.leaves(_finetuned(workdir, size)),
                    jax.tree.leaves(_finetuned(reference, size)), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert not list((workdir / "ckpt").glob("*/*/*"))  # finished runs removed their checkpoints
  # NTK snapshots: block pairs sharded over both processes' devices.
  for name in ("tiny-gpt2_pretrained", "tiny-gpt2_D200", "tiny-gpt2_D400"):
    with np.load(workdir / "ntk" / f"{name}.npz") as a, np.load(reference / "ntk" / f"{name}.npz") as b:
      for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5 * np.abs(b[key]).max())
  # ... and the kernel of the fine-tuned weights on one device, unblocked.
  m, probe = _model_and_probe(tmp_path, workdir)
  single = ntk.make_ntk_fn(ntk.lm_output_fn(models.build(m.config)))(_finetuned(workdir, 400), probe)
  with np.load(workdir / "ntk" / "tiny-gpt2_D400.npz") as z:
    np.testing.assert_allclose(z["theta_finetuned"], single, rtol=1e-4,
                               atol=1e-5 * np.abs(single).max())


def _model_and_probe(tmp_path, workdir):
  """The sweep's model spec and NTK probe inputs, rebuilt from its workdir."""
  import importlib.util

  from lensllm_jax.training import sweep as finetune_sweep
  from lensllm_jax.training import textdata

  spec = importlib.util.spec_from_file_location("lean_config", tmp_path / "lean_config.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  splits = finetune_sweep.load_splits(cfg, workdir)
  m = finetune_sweep.load_model(cfg.models[0], cfg, workdir, splits, mesh=None)
  test = textdata.encode_examples(splits["test"], m.tokenizer, cfg.max_len)
  probe = test.take(np.arange(cfg.ntk.num_probe))
  return m, {"input_ids": probe.input_ids, "attention_mask": probe.attention_mask,
             "loss_mask": probe.loss_mask}


def test_coordinator_port_is_free_and_outside_the_ephemeral_range():
  """ProcessGroup's coordinator port: bindable now and never one the kernel hands out
  (bind(0), outgoing connections), so nothing else takes it before the coordinator."""
  import socket

  low, _ = ephemeral_port_range()
  ports = {free_port() for _ in range(20)}
  assert all(10000 <= p < low for p in ports) and len(ports) > 1
  with socket.socket() as s:
    s.bind(("127.0.0.1", ports.pop()))
