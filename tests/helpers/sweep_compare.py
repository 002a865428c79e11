"""Helpers shared by the kill / multi-process tests of experiments.finetune_sweep."""

from __future__ import annotations

import json
import math
import pathlib
import signal
import subprocess
import time

import numpy as np

# Wall-clock fields of runs.jsonl: the only ones two equal runs may disagree on.
TIMING_FIELDS = ("seconds", "wall_seconds", "seconds_ntk", "seconds_train", "seconds_eval")


def read_rows(workdir: pathlib.Path) -> list[dict]:
  """runs.jsonl rows (each line must be whole JSON), timing fields dropped and the
  workdir in stored paths replaced by "<workdir>"."""
  text = (workdir / "runs.jsonl").read_text()
  assert text.endswith("\n"), "runs.jsonl ends in a partial row"
  rows = []
  for line in text.splitlines():
    line = line.replace(str(workdir), "<workdir>")
    rows.append({k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS})
  return rows


# Quantities of the form 1 - x computed in float32 (the kernel distance 1 - cos): their
# rounding error is absolute, a few float32 eps whatever their size.
ONE_MINUS_X = {"kernel_distance"}
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def assert_same(a, b, rtol: float, where: str = "") -> None:
  """Equal nested JSON values; floats within rtol (exactly equal for rtol=0), the
  ONE_MINUS_X fields within 4 float32 eps absolute besides."""
  if isinstance(a, dict):
    assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
    for k in a:
      assert_same(a[k], b[k], rtol, f"{where}.{k}")
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), f"{where}: {a} != {b}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
      assert_same(x, y, rtol, f"{where}[{i}]")
  elif isinstance(a, float) and not isinstance(b, bool):
    assert isinstance(b, (int, float)), f"{where}: {a} != {b}"
    if rtol == 0 or not math.isfinite(a):
      assert a == b, f"{where}: {a} != {b}"
    else:
      atol = 4 * FLOAT32_EPS if where.rsplit(".", 1)[-1] in ONE_MINUS_X else rtol * 1e-3
      np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=where)
  else:
    assert a == b, f"{where}: {a!r} != {b!r}"


def in_flight_checkpoints(workdir: pathlib.Path) -> list[pathlib.Path]:
  """Finalised orbax step directories ckpt/<model>/<D>/<step> of unfinished runs."""
  return sorted(p for p in (workdir / "ckpt").glob("*/*/*") if p.name.isdigit() and p.exists())


def kill_mid_run(procs: list[subprocess.Popen], workdir: pathlib.Path,
                 timeout: float) -> pathlib.Path:
  """SIGKILLs `procs` while a fine-tuning run is in flight (after its first checkpoint).

  Polls for a checkpoint step directory; when one appears, freezes the processes
  (SIGSTOP), checks that the run still holds it (a finished run deletes its
  ckpt/ directory), and kills them; otherwise lets them continue. Returns the
  step directory the run had reached.
  """
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(p.poll() is not None for p in procs):
      raise AssertionError("the sweep ended before a run was interrupted")
    if in_flight_checkpoints(workdir):
      for p in procs:
        p.send_signal(signal.SIGSTOP)
      held = in_flight_checkpoints(workdir)
      if held:
        for p in procs:
          p.kill()
        for p in procs:
          p.wait()
        return held[-1]
      for p in procs:
        p.send_signal(signal.SIGCONT)
    time.sleep(0.02)
  for p in procs:
    p.kill()
  raise AssertionError(f"no run checkpointed within {timeout}s")
