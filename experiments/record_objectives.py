r"""Records the objective of every law fit the selection protocol makes (a test fixture).

    python -m experiments.record_objectives [tests/data/objectives_reference.npz]

Runs `python -m experiments.reproduce_selection` (configs/selection.py: default
methods, budgeted procedure on, figures off, into a temporary directory) in a
child process whose `selection.run_fitted_batch` is wrapped so that every call is recorded: the
method, the dataset, the PRNG key, `min_curves`, `num_restarts`, every
view's budget and revealed-point mask, and the per-curve objective the fit
reached. That covers the fixed-budget fits of VanillaFit, RectifiedFit and
LensLLM on each budget view. One more call per (dataset, fitted method) fits
the full curves (D_max = D*). The budgeted procedure now fits subsets of the
models with restart draws keyed per (model, prefix) (`uniforms=`), which the
replay does not reproduce: those calls are not recorded (the shipped fixture's
budgeted rounds were recorded before that change, with per-round keys, and
stay valid engine checks).

The file holds our own computed values (not public data). Its purpose:
`tests/laws/test_objective_reference.py` replays every recorded call with the
current fitting engine and asserts the objective is no worse on any curve,
so a faster engine cannot silently fit worse than the one that recorded it.
Arrays (V recorded views, M models, P columns of the file):
  call [V] int        index of the recorded call the view belongs to
  method [V] str, dataset [V] str, key_data [V, 2] uint32, min_curves [V] int,
  num_restarts [V] int, max_data_num [V] float, revealed [V, M, P] bool,
  objective [V, M] float64, status [V, M] str (fit status per model), engine [V] str (fitting engine that recorded it)
Curve files: the public flan and gigaword files shipped in lensllm_jax/data.
"""

from __future__ import annotations

import atexit
import dataclasses
import pathlib
import pickle
import subprocess
import sys
import tempfile

import jax
import numpy as np

from configs import selection as selection_config
from experiments import common
from lensllm_jax import selection
from lensllm_jax.laws import fitting
from lensllm_jax.selection import published

ENGINE_LABEL = "damped Newton (fitting.py before issue 17)"


def _recorder(original, rows: list):
  """`original` (selection.run_fitted_batch) that also appends each view's fit to `rows`."""

  def recording(name, views, metadata, *, key, num_restarts=8, fit_options=None, min_curves=0,
                **kwargs):
    results = original(name, views, metadata, key=key, num_restarts=num_restarts,
                       fit_options=fit_options, min_curves=min_curves, **kwargs)
    if "uniforms" in kwargs:
      return results  # a budgeted per-(model, prefix) fit: not recorded (module docstring)
    defaults = fitting.FitOptions()
    if kwargs or (fit_options is not None and
                  dataclasses.replace(fit_options, max_steps=defaults.max_steps) != defaults):
      raise ValueError(f"recording supports only max_steps fit options, got {fit_options} "
                       f"{kwargs}")
    call = len({r["call"] for r in rows})
    for v, r in zip(views, results, strict=True):
      rows.append({"call": call, "method": name, "dataset": metadata.name,
                   "key_data": np.asarray(jax.random.key_data(key), np.uint32).ravel(),
                   "min_curves": min_curves, "num_restarts": num_restarts,
                   "max_data_num": v.max_data_num, "mask": v.mask,
                   "objective": np.asarray(r.extras["objective"], np.float64),
                   "status": np.asarray(r.status, dtype=str)})
    return results

  return recording


def record_in_this_process(rows_file: str) -> None:
  """Records every `selection.run_fitted_batch` call of this process into `rows_file`
  (pickled rows, written at exit): the hook of the child that runs the binary."""
  rows = []
  selection.run_fitted_batch = _recorder(selection.run_fitted_batch, rows)
  atexit.register(lambda: pathlib.Path(rows_file).write_bytes(pickle.dumps(rows)))


# The child: this module's hook, then the selection binary run as a program (`python -m`).
_CHILD = """import runpy, sys
from experiments import record_objectives
record_objectives.record_in_this_process(sys.argv[1])
sys.argv = ["reproduce_selection", *sys.argv[2:]]
runpy.run_module("experiments.reproduce_selection", run_name="__main__", alter_sys=True)
"""


def record(specs, data_dir) -> dict:
  """Runs the protocol and returns the recorded arrays (see module docstring)."""
  with tempfile.TemporaryDirectory() as tmp:
    rows_file = pathlib.Path(tmp) / "rows.pickle"
    args = ["--config=configs/selection.py", f"--config.benchmarks={tuple(specs)!r}",
            "--config.figures=False", f"--output_dir={tmp}/out"]
    if data_dir:
      args.append(f"--config.data_dir={data_dir}")
    subprocess.run([sys.executable, "-c", _CHILD, str(rows_file), *args], check=True,
                   cwd=pathlib.Path(__file__).resolve().parents[1])
    rows = pickle.loads(rows_file.read_bytes())
  # Full curves (D_max = D*), one call per dataset and fitted method.
  recording = _recorder(selection.run_fitted_batch, rows)
  for di, curves in enumerate(common.load_all(specs, data_dir)):
    target = common.target_of(curves, None)
    meta = selection.metadata_of(curves, target)
    view = selection.visible_view(curves, target)
    for method in selection.FITTED_LAWS:
      key = jax.random.fold_in(jax.random.key(di),
                               999 + selection_config.PUBLISHED_METHODS.index(method))
      recording(method, [view], meta, key=key, min_curves=len(published.RATIOS) *
                len(curves.models))
  curve_sets = {c.name: c for c in common.load_all(specs, data_dir)}
  revealed = []
  for r in rows:
    full = np.zeros(np.shape(curve_sets[r["dataset"]].losses), bool)
    full[:, :r["mask"].shape[1]] = r["mask"]
    revealed.append(full)
  return {
    "call": np.array([r["call"] for r in rows]),
    "method": np.array([r["method"] for r in rows]),
    "dataset": np.array([r["dataset"] for r in rows]),
    "key_data": np.stack([r["key_data"] for r in rows]),
    "min_curves": np.array([r["min_curves"] for r in rows]),
    "num_restarts": np.array([r["num_restarts"] for r in rows]),
    "max_data_num": np.array([r["max_data_num"] for r in rows], np.float64),
    "revealed": np.stack(revealed),
    "objective": np.stack([r["objective"] for r in rows]),
    "status": np.stack([r["status"] for r in rows]),
  }


def replay(arrays, curve_sets, fit_options=None, calls=None):
  """Re-runs recorded calls with the current engine: objective [V, M] (NaN: call skipped).

  Args:
    arrays: the recorded arrays (an opened .npz or the dict `record` returns).
    curve_sets: dict dataset name -> CurveSet of the recorded files.
    fit_options: `fitting.FitOptions` (default: the defaults, max_steps=500 as the protocol).
    calls: optional iterable of call indices to replay (default all).
  """
  call_of = np.asarray(arrays["call"])
  out = np.full(np.shape(arrays["objective"]), np.nan)
  todo = sorted(set(call_of.tolist())) if calls is None else sorted(calls)
  for call in todo:
    rows = np.flatnonzero(call_of == call)
    first = rows[0]
    curves = curve_sets[str(arrays["dataset"][first])]
    meta = selection.metadata_of(curves, common.target_of(curves, None))
    views = [selection.visible_view(curves, float(arrays["max_data_num"][i]),
                                    arrays["revealed"][i]) for i in rows]
    key = jax.random.wrap_key_data(np.asarray(arrays["key_data"][first], np.uint32))
    results = selection.run_fitted_batch(
        str(arrays["method"][first]), views, meta, key=key,
        num_restarts=int(arrays["num_restarts"][first]),
        fit_options=fit_options,
        min_curves=int(arrays["min_curves"][first]))
    for i, r in zip(rows, results, strict=True):
      out[i] = r.extras["objective"]
  return out


def main(argv):
  # No absl flags here: the arguments are the output path only.
  if len(argv) > 2:
    raise SystemExit("usage: python -m experiments.record_objectives [OUTPUT.npz]")
  out = pathlib.Path(argv[1] if len(argv) > 1 else "tests/data/objectives_reference.npz")
  arrays = record(["flan", "gigaword"], None)
  arrays["engine"] = np.array([ENGINE_LABEL] * len(arrays["call"]))
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, **arrays)
  print(f"{len(arrays['call'])} views of {len(set(arrays['call'].tolist()))} calls "
        f"written to {out}")


if __name__ == "__main__":
  main(sys.argv)
