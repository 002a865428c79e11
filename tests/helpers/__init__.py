"""Helpers shared by the tests: the repository root, subprocesses with fake devices, ports."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The public curve files (flan, gigaword) ship inside the package.
SHARED_BENCHMARKS = REPO_ROOT / "lensllm_jax" / "data"
# Set by conftest.pytest_configure: whether the run's `-m` deselects marker torch.
TORCH_MARKER = {"deselected": False}


def import_torch_and_transformers():
  """`(torch, transformers)` for a module of Hugging Face reference tests.

  Such a module sets `pytestmark = pytest.mark.torch` and calls this at module
  level. Without torch, the module is skipped only when the run deselects the
  marker (`-m "not torch"`, as .ci/newest does); otherwise the missing package
  is a collection error, never a silent skip.
  """
  import pytest

  try:
    import torch
    import transformers
  except ImportError as e:
    if TORCH_MARKER["deselected"]:
      pytest.skip(f"marker torch deselected and {e.name} is not installed",
                  allow_module_level=True)
    pytest.fail(f"{e.name} is not installed; install requirements-dev.txt or run with "
                "-m 'not torch'", pytrace=False)
  return torch, transformers


def run_with_host_devices(code: str, num_devices: int = 4, timeout: float = 300) -> str:
  """Runs `code` in a fresh Python with `num_devices` fake CPU devices.

  XLA reads `--xla_force_host_platform_device_count` only before JAX starts,
  so multi-device tests run in a subprocess. Returns its stdout; raises with
  the child's stderr if it fails.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={num_devices}").strip()
  env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc.stdout


def ephemeral_port_range() -> tuple[int, int]:
  """The kernel's range for bind(0) and outgoing connections (Linux; else IANA's)."""
  try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
      low, high = map(int, f.read().split())
    return low, high
  except (OSError, ValueError):
    return 49152, 65535


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (for a jax.distributed coordinator).

  Drawn at random BELOW the ephemeral range: a port from bind(0) comes from
  that range, where any outgoing connection or other bind(0) may take it in the
  seconds before the coordinator binds it; the kernel never hands out a port
  below the range, so only another explicit pick can collide (1 in ~20,000).
  """
  import random
  import socket

  low = min(ephemeral_port_range()[0], 65536)
  rng = random.SystemRandom()
  for _ in range(200):
    port = rng.randrange(10000, low)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:  # in use (or in TIME_WAIT): try another
        continue
    return port
  raise RuntimeError(f"no free TCP port found in [10000, {low})")


def host_device_env(num_devices: int, **extra: str) -> dict:
  """Environment of a child Python with `num_devices` fake CPU devices and this repo."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={num_devices}").strip()
  env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


class ProcessGroup:
  """`num_processes` local Pythons joined by jax.distributed (CPU, gloo collectives).

  Each gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID (read by `sharding.initialize_distributed`) and
  `devices_per_process` host devices; output goes to files under `logdir`.
  `wait(timeout)` kills every process if one fails or the time runs out, so a
  hung collective cannot stall the suite.
  """

  def __init__(self, args: list[str], logdir: pathlib.Path, *, num_processes: int = 2,
               devices_per_process: int = 2, tag: str = "run"):
    address = f"127.0.0.1:{free_port()}"
    self.logs, self.procs = [], []
    for i in range(num_processes):
      log = pathlib.Path(logdir) / f"{tag}_p{i}.log"
      env = host_device_env(devices_per_process, JAX_COORDINATOR_ADDRESS=address,
                            JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i))
      with open(log, "w") as fh:
        self.procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env,
                                           stdout=fh, stderr=subprocess.STDOUT))
      self.logs.append(log)

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
    for p in self.procs:
      p.wait()

  def output(self, i: int) -> str:
    return self.logs[i].read_text()

  def wait(self, timeout: float) -> list[str]:
    """Waits for all; returns their outputs. Raises (after killing all) on a failure."""
    import time

    deadline = time.monotonic() + timeout
    try:
      while any(p.poll() is None for p in self.procs):
        failed = [i for i, p in enumerate(self.procs) if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
          what = f"process {failed[0]} failed" if failed else f"timed out after {timeout}s"
          raise AssertionError(what + "\n" + "\n".join(
              f"--- process {i}:\n{self.output(i)[-3000:]}" for i in range(len(self.procs))))
        time.sleep(0.1)
      bad = [i for i, p in enumerate(self.procs) if p.returncode != 0]
      if bad:
        raise AssertionError(f"process {bad[0]} exited {self.procs[bad[0]].returncode}:\n"
                             f"{self.output(bad[0])[-3000:]}")
    finally:
      self.kill()
    return [self.output(i) for i in range(len(self.procs))]
