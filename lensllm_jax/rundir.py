"""An output directory / workdir that cannot silently mix results: one writer, one manifest.

Every binary that writes an output directory opens it with `open_output_dir`
(a sweep workdir driven by another program is bound with `bind_manifest`,
`sweep.bind_workdir`):

  with rundir.open_output_dir(out, config=cfg, inputs={"curves/flan": path, ...},
                              outputs=("*.csv", "*.md")) as out:
    ...  # append results; a rerun skips what is done

1. One writer. `.lock` in the directory is held (fcntl.flock, exclusive) for
   the whole run; a second instance is refused at once with
   `errors.WorkdirError` naming the holder's pid. The processes of one
   multi-process run share it: only the primary process (`primary=True`)
   locks and writes, the others rely on it.
2. A manifest of what produced the results, `manifest.json`: the resolved
   config (dotted keys, `ignore`d keys left out), the sha256 of every input
   file (curve files, checkpoint files, data files, predictor weights) and
   the package version. A rerun whose manifest differs is refused with one
   line naming the first differences; `overwrite=True`
   (`--config.overwrite=True`) deletes the `outputs` and recomputes, a new
   directory starts clean. Same manifest: the binary skips what is done.
   A directory holding outputs but no manifest (written before manifests, or
   by hand) is refused the same way: nothing says what produced it. A
   manifest with no outputs beside it (a run that stopped before writing any)
   is replaced: there is nothing to mix.

Which keys must match and which may grow. Every config key and every input
must be equal, except the keys of `merge`: list-valued keys whose elements
are independent units of work (a sweep's `subsets.sizes`, its `models`). For
such a key a rerun may name more elements or fewer; an element present in
both must be equal (elements are matched by `merge[key](element)`, e.g. a
model's name, or by value when that is None). The manifest then records the
union, and inputs may gain new names (a new model's checkpoint files) while
every input present in both must have the same sha256. Everything else (the
task, a model's spec under the same name, the training settings) must be
unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from absl import logging

import lensllm_jax
from lensllm_jax import errors

MANIFEST = "manifest.json"
LOCK = ".lock"
_FORMAT = 1


def sha256_file(path: str | os.PathLike) -> str:
  """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def input_digests(inputs: Mapping[str, str | os.PathLike]) -> dict[str, str]:
  """{name: sha256} of input files; a directory contributes each file under it as name/relpath
  (not its lock and manifests).

  Callers check their inputs first with their own error type; a path missing
  here still raises `errors.InputError` naming it.
  """
  out = {}
  for name, path in inputs.items():
    path = pathlib.Path(path)
    if path.is_dir():
      for f in sorted(p for p in path.rglob("*") if p.is_file() and not _bookkeeping(p.name)):
        out[f"{name}/{f.relative_to(path).as_posix()}"] = sha256_file(f)
    elif path.is_file():
      out[name] = sha256_file(path)
    else:
      raise errors.InputError(f"input {name}: {path} does not exist")
  return out


def flatten_config(config: Any, ignore: Iterable[str] = ()) -> dict[str, Any]:
  """A config (ConfigDict / dict) as {dotted key: JSON value}; tuples become lists."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  plain = json.loads(json.dumps(config, default=_json_default, sort_keys=True))
  out: dict[str, Any] = {}

  def walk(prefix, value):
    if isinstance(value, dict) and value:
      for k, v in value.items():
        walk(f"{prefix}.{k}" if prefix else k, v)
    else:
      out[prefix] = value

  walk("", plain)
  skip = set(ignore)
  return {k: v for k, v in sorted(out.items()) if k not in skip and k.split(".")[0] not in skip}


def _json_default(value):
  if hasattr(value, "to_dict"):
    return value.to_dict()
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def make_manifest(config: Any, inputs: Mapping[str, str | os.PathLike], *,
                  ignore: Iterable[str] = ("overwrite",)) -> dict:
  """{"format", "version", "config", "inputs"}: what a directory's results are made of."""
  return {"format": _FORMAT, "version": lensllm_jax.__version__,
          "config": flatten_config(config, ignore), "inputs": input_digests(inputs)}


def _short(value, limit: int = 60) -> str:
  text = json.dumps(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _element_diffs(where: str, old, new) -> list[str]:
  """The differences of two elements of a merge key: field by field when both are dicts."""
  if not (isinstance(old, dict) and isinstance(new, dict)):
    return [f"{where}: {_short(old)} -> {_short(new)}"]
  return [f"{where}.{f}: {_short(old.get(f, '<absent>'))} -> {_short(new.get(f, '<absent>'))}"
          for f in sorted(set(old) | set(new)) if old.get(f, "<absent>") != new.get(f, "<absent>")]


def merge_manifests(old: dict, new: dict,
                    merge: Mapping[str, Callable[[Any], Any] | None] | None = None
                    ) -> tuple[dict, list[str]]:
  """(merged manifest, differences); the run may go on iff differences is empty.

  See the module docstring for the rule (`merge`: list keys that may grow or shrink).
  """
  merge = dict(merge or {})
  diffs: list[str] = []
  if old.get("version") != new["version"]:
    diffs.append(f"package version {old.get('version')} -> {new['version']}")
  oc, nc = old.get("config", {}), new["config"]
  config = dict(nc)
  extended = False
  for key in sorted(set(oc) | set(nc)):
    if key in merge and isinstance(oc.get(key), list) and isinstance(nc.get(key), list):
      ident = merge[key] or (lambda e: json.dumps(e, sort_keys=True))
      union = {ident(e): e for e in oc[key]}
      for e in nc[key]:
        k = ident(e)
        if k in union and union[k] != e:
          diffs.extend(_element_diffs(f"config.{key}[{k}]", union[k], e))
        union.setdefault(k, e)
      extended |= len(union) != len(oc[key]) or len(nc[key]) != len(oc[key])
      config[key] = list(union.values())
    elif oc.get(key, "<absent>") != nc.get(key, "<absent>"):
      diffs.append(f"config.{key}: {_short(oc.get(key, '<absent>'))} -> "
                   f"{_short(nc.get(key, '<absent>'))}")
  oi, ni = old.get("inputs", {}), new["inputs"]
  inputs = dict(oi)
  for name in sorted(set(oi) | set(ni)):
    if name in oi and name in ni and oi[name] != ni[name]:
      diffs.append(f"input {name}: sha256 {oi[name][:12]} -> {ni[name][:12]}")
    elif name in ni and name not in oi:
      if not extended:
        diffs.append(f"input {name}: new")
      inputs[name] = ni[name]
    elif name in oi and name not in ni and not extended:
      diffs.append(f"input {name}: no longer given")
  return {**new, "config": config, "inputs": dict(sorted(inputs.items()))}, diffs


def _write_json_atomic(path: pathlib.Path, value: dict) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    f.write(json.dumps(value, indent=1, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_manifest(directory: str | os.PathLike, name: str = MANIFEST) -> dict | None:
  """The directory's manifest, None if it has none (`errors.WorkdirError` if unreadable)."""
  path = pathlib.Path(directory) / name
  if not path.exists():
    return None
  try:
    value = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.WorkdirError(f"{path}: unreadable manifest ({e}); delete the directory or "
                              "pass --config.overwrite=True to recompute") from None
  if not isinstance(value, dict) or "config" not in value:
    raise errors.WorkdirError(f"{path}: not a manifest of this project")
  return value


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike):
  """Holds `directory/.lock` exclusively (fcntl.flock) until the block ends.

  A second holder, in this process or another, gets `errors.WorkdirError`
  naming the pid written in the lock file by the first. The lock is released
  when the file is closed, also when the process dies.
  """
  path = pathlib.Path(directory) / LOCK
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise errors.WorkdirError(f"{directory}: cannot create the lock file {path} "
                              f"({e.strerror or e}); is the directory writable?") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      raise errors.WorkdirError(f"{directory} is in use by another run (pid {holder}, lock "
                                f"{path}); wait for it or use another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield path
  finally:
    os.close(fd)  # releases the lock


def read_json_lines(path: str | os.PathLike, *, truncate: bool = True,
                    redo: str = "that unit") -> list[dict]:
  """The records of an append-only JSON-lines file ([] if it does not exist yet).

  A last line without its newline is the record of a process killed while
  appending it: it is dropped (cut from the file when `truncate`, e.g. on the
  primary process only), so its unit of work is redone. Any other unreadable
  line is an `errors.WorkdirError` naming the file and line (`redo`: what
  deleting the line redoes).
  """
  path = pathlib.Path(path)
  if not path.exists():
    return []
  data = path.read_bytes()
  cut = len(data) - (data.rfind(b"\n") + 1)
  if cut:
    logging.warning("%s: dropping a partial last row (interrupted write): %r", path,
                    data[-80:])
    data = data[:len(data) - cut]
    if truncate:
      with open(path, "r+b") as f:
        f.truncate(len(data))
  out = []
  for i, line in enumerate(data.decode("utf-8", "replace").splitlines()):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise errors.WorkdirError(f"{path} line {i + 1}: not JSON ({e}); delete the line to redo "
                                f"{redo}") from None
    if not isinstance(rec, dict):
      raise errors.WorkdirError(f"{path} line {i + 1}: not a JSON object; delete the line to "
                                f"redo {redo}")
    out.append(rec)
  return out


def append_json_line(path: str | os.PathLike, record: dict) -> None:
  """Appends one record to a JSON-lines file in one write, synced to disk."""
  data = (json.dumps(record) + "\n").encode()
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    while data:
      data = data[os.write(fd, data):]
    os.fsync(fd)
  finally:
    os.close(fd)


def _bookkeeping(name: str) -> bool:
  """The lock and the manifests (`manifest*.json`) are never outputs."""
  return name == LOCK or (name.startswith("manifest") and name.endswith(".json"))


def _remove_outputs(directory: pathlib.Path, outputs: Iterable[str]) -> list[str]:
  removed = []
  for pattern in outputs:
    for p in sorted(directory.glob(pattern)):
      if _bookkeeping(p.name):
        continue
      shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
      removed.append(p.name)
  return removed


def _has_outputs(directory: pathlib.Path, outputs: Iterable[str]) -> bool:
  return any(not _bookkeeping(p.name) for pattern in outputs for p in directory.glob(pattern))


def prepare_directory(directory: str | os.PathLike) -> pathlib.Path:
  """Creates the directory; `errors.WorkdirError` if it is a file or cannot be created."""
  directory = pathlib.Path(directory)
  if directory.exists() and not directory.is_dir():
    raise errors.WorkdirError(f"{directory} exists and is not a directory")
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.WorkdirError(f"{directory}: cannot create the directory "
                              f"({e.strerror or e})") from None
  if not os.access(directory, os.W_OK | os.X_OK):
    raise errors.WorkdirError(f"{directory} is not writable")
  return directory


def bind_manifest(directory: pathlib.Path, manifest: dict, *, outputs: Iterable[str],
                  merge=None, overwrite: bool = False, name: str = MANIFEST) -> dict:
  """Checks `manifest` against the directory's and records it (merged); returns what is
  recorded. Call with the directory's lock held. `name`: the manifest's file, for a second
  binary writing its own `outputs` into another binary's directory (`manifest.<binary>.json`)."""
  outputs = tuple(outputs)
  old = read_manifest(directory, name)
  has_outputs = _has_outputs(directory, outputs)
  if old is None and has_outputs:
    diffs = [f"holds results but no {name} (made by an older version, or by hand)"]
    merged = manifest
  elif old is None or not has_outputs:  # nothing computed yet (e.g. a run that failed early)
    diffs, merged = [], manifest
  else:
    merged, diffs = merge_manifests(old, manifest, merge)
  if diffs and not overwrite:
    shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
    raise errors.WorkdirError(
        f"{directory} holds results of other inputs ({shown}); pass --config.overwrite=True "
        "to recompute them there, or use a new directory")
  if overwrite and has_outputs:  # recompute, even from the same inputs (e.g. after a code change)
    _remove_outputs(directory, outputs)
    merged = manifest
  _write_json_atomic(directory / name, merged)
  return merged


@contextlib.contextmanager
def open_output_dir(directory: str | os.PathLike, *, config: Any,
                    inputs: Mapping[str, str | os.PathLike], outputs: Iterable[str],
                    merge: Mapping[str, Callable[[Any], Any] | None] | None = None,
                    overwrite: bool = False, ignore: Iterable[str] = (),
                    primary: bool = True, name: str = MANIFEST):
  """Creates, locks and binds an output directory for one run (module docstring).

  Args:
    directory: the output directory / workdir.
    config: the resolved config (a ConfigDict or dict).
    inputs: {name: path} of every input file or directory (hashed).
    outputs: glob patterns of the files the binary writes there (deleted by
      `overwrite` when the manifest differs; a directory holding any of them
      but no manifest is refused).
    merge: {config key: element key fn or None}: list keys that may grow.
    overwrite: recompute (delete `outputs`), whether or not the manifest differs.
    ignore: config keys that do not change results (`overwrite`, thread counts ...).
    primary: False on the non-primary processes of a multi-process run: they
      neither lock nor write (the primary does both).
    name: the manifest's file name (`bind_manifest`).

  Yields:
    The directory as a pathlib.Path.
  """
  directory = pathlib.Path(directory)
  if not primary:
    yield directory
    return
  prepare_directory(directory)
  manifest = make_manifest(config, inputs, ignore=("overwrite", *ignore))
  with directory_lock(directory):
    bind_manifest(directory, manifest, outputs=outputs, merge=merge, overwrite=overwrite,
                  name=name)
    yield directory
