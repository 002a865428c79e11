"""Helpers shared by the experiment binaries (no flags are defined here).

Binaries import these rather than each other: importing a binary would
define its absl flags a second time.
"""

from __future__ import annotations

import csv
import os
import pathlib

from absl import app

from lensllm_jax import benchmarks


def read_rows(path: pathlib.Path) -> list[dict]:
  """Rows of a CSV written by `append_rows` ([] if it does not exist yet)."""
  if not path.exists():
    return []
  with path.open(newline="") as f:
    return list(csv.DictReader(f))


def append_rows(path: pathlib.Path, header, rows) -> None:
  """Appends rows (dicts) to a CSV, writing the header if the file is new.

  Flushed and fsynced, so results survive a killed run and a rerun can skip them.
  """
  new = not path.exists()
  with path.open("a", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=header)
    if new:
      writer.writeheader()
    for row in rows:
      writer.writerow(row)
    f.flush()
    os.fsync(f.fileno())


def parse_ratios(values) -> list[int]:
  """--ratios values as positive integers, with an error naming the flag."""
  out = []
  for v in values:
    try:
      r = int(v)
    except ValueError:
      raise app.UsageError(f"--ratios: {v!r} is not an integer") from None
    if r < 1:
      raise app.UsageError(f"--ratios: {r} must be >= 1")
    out.append(r)
  return out


def parse_levels(values) -> list[float]:
  """--budget_levels values (confidence multipliers z) as floats."""
  try:
    return [float(z) for z in values]
  except ValueError:
    raise app.UsageError(f"--budget_levels: not numbers: {list(values)}") from None


def load_all(specs, data_dir) -> list[benchmarks.CurveSet]:
  """Loads every curve file (name or path); dataset names must be unique."""
  sets = [benchmarks.load_curves(s, data_dir=data_dir) for s in specs]
  names = [c.name for c in sets]
  if len(set(names)) != len(names):
    raise app.UsageError(f"--benchmark: duplicate dataset names {names}")
  return sets
