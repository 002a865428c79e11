"""Bad input ends a binary with one line naming the place, exit code 2, no traceback.

Each case runs the binary as a user would (a subprocess); they run in parallel.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from experiments import reporting
from helpers import REPO_ROOT
from helpers.synthetic_curves import synthetic_curves
from lensllm_jax.curves import benchmarks

pytestmark = pytest.mark.slow  # runs the binaries as subprocesses


def test_bad_flag_config_curve_file_or_checkpoint(tmp_path):
  curves, _ = synthetic_curves(seed=5)
  good = tmp_path / "toy7.csv"
  benchmarks.write_curves(curves, good)
  lines = good.read_text().splitlines()
  lines[3] = lines[3].replace(lines[3].split(",")[2], "oops", 1)  # a loss that is not a number
  broken = tmp_path / "broken.csv"
  broken.write_text("\n".join(lines) + "\n")
  two = tmp_path / "two.csv"
  benchmarks.write_curves(dataclasses.replace(
      curves, models=curves.models[:2], sizes=curves.sizes[:2], families=curves.families[:2],
      losses=curves.losses[:2]), two)
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "config.json").write_text(json.dumps({"model_type": "bert"}))
  selection = ["experiments.reproduce_selection", "--config=configs/selection.py",
               f"--output_dir={tmp_path / 'out'}"]
  cases = [  # (binary and arguments, what the one line must say)
      (selection + [f"--config.benchmarks=('{broken}',)"], r"broken\.csv, line 4 .*column '200'"),
      (selection + [f"--config.benchmarks=('{two}',)"], r"two\.csv: 2 model\(s\).*at least 3"),
      # Without --config on the command line the override is applied to the default file.
      (["experiments.reproduce_selection", "--config.num_restart=3",
        f"--output_dir={tmp_path / 'out'}"], r"no field 'num_restart'"),
      (selection + ["--config=configs/nope.py"], r"--config: .*nope\.py"),
      (["experiments.ntk_spectrum", f"--workdir={tmp_path / 'ntk'}",
        f"--config.hf_checkpoint={ckpt}"],
       r"ckpt/config\.json: model_type='bert' is not supported"),
      # A repeated override is refused, not joined to the first.
      (selection + ["--config.ratios=(8,)", "--config.ratios=(16,)"],
       r"--config\.ratios given more than once"),
      (["experiments.fit_laws", "--config=configs/fit_laws.py", "--config.laws=()",
        f"--output_dir={tmp_path / 'fit'}"], r"config\.laws is empty"),
      (["experiments.fit_laws", "--config=configs/fit_laws.py",
        f"--config.benchmarks=('{tmp_path}',)", f"--output_dir={tmp_path / 'fit'}"],
       r"is a directory, not a curve file"),
      (["experiments.finetune_sweep", "--config=configs/finetune_tiny.py:smoke",
        "--config.train.batch_size=0", f"--workdir={tmp_path / 'sweep'}"],
       r"config\.train\.batch_size=0: must be >= 1"),
      # The documented held-out command, offline: wmt19 is not packaged nor cached.
      ([*shlex.split(reporting.HELD_OUT_COMMAND)[2:-1], f"--output_dir={tmp_path / 'wmt'}"],
       r"benchmark 'wmt19': .*could not download .*127\.0\.0\.1:9/wmt19\.csv"),
  ]
  # No network: an empty cache and a download URL nothing listens on.
  env = {**os.environ, "LENSLLM_CACHE_DIR": str(tmp_path / "cache"),
         "LENSLLM_BENCHMARK_URL": "http://127.0.0.1:9/{name}.csv"}
  env.pop("LENSLLM_DATA_DIR", None)
  procs = [subprocess.Popen([sys.executable, "-m", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for args, _ in cases]
  for (args, expected), proc in zip(cases, procs, strict=True):
    _, err = proc.communicate(timeout=300)
    binary = args[0].split(".")[-1]
    assert proc.returncode == 2, (args, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{binary}: error: "), last
    assert re.search(expected, last), (args, last)
