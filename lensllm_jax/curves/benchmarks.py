"""Fine-tuning curve files in the public format of Lin et al. (ICML 2024).

A curve file is a CSV with one row per pre-trained model:

  config name, 0, 200, 400, ..., 1638400, size, family

where `config name` is the model id, each integer column `D` holds the test
loss after fine-tuning on D samples (`0` = zero-shot, no fine-tuning), `size`
is the parameter count and `family` the model family. Any number of models
and any subset / ordering of the integer columns is accepted as long as `0`
is present; the D grid is returned sorted ascending. An empty cell means "not
measured" (a model not run at that size): it is NaN in `CurveSet.losses` and
False in `CurveSet.measured`; a row with no measured loss is an error. Code
that needs every cell (the selection protocol on the public files) calls
`require_complete`, which names the first empty cell.

Files are found by path, or by name (`flan`, `gigaword`, `wmt19`, ...) in a
local directory (`data_dir` argument, else `$LENSLLM_DATA_DIR`), else among
the files packaged with the library (`PACKAGED_DIR`: `flan` and `gigaword`,
Lin et al. 2024, Apache-2.0, notice and citation in `data/NOTICE.md`), or
else downloaded once from the public release into a cache directory
(`cache_dir` argument, else `$LENSLLM_CACHE_DIR`, else `~/.cache/lensllm_jax`).
The URL template (with `{name}`) can be overridden by the `url_template`
argument or `$LENSLLM_BENCHMARK_URL`.

Every validation error is a `CurveFormatError` whose message names the file,
the row (model name and 1-based line number) and the column. A name found
nowhere locally whose download fails (offline, or no such file) is a
`CurveDownloadError` naming the benchmark, the URL and the local places
searched (the binaries print it as their one-line error). `wmt19`, the third
file of Lin et al. (2024), is not packaged: it is read by name this way.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import pathlib
import tempfile
import urllib.error
import urllib.request

import numpy as np

from lensllm_jax import errors

__all__ = [
  "DEFAULT_URL_TEMPLATE",
  "PACKAGED_DIR",
  "CurveDownloadError",
  "CurveFormatError",
  "CurveSet",
  "load_curves",
  "parse_curves",
  "require_complete",
  "resolve_curve_file",
  "write_curves",
]

DEFAULT_URL_TEMPLATE = (
  "https://raw.githubusercontent.com/linhaowei1/Fine-tuning-Scaling-Law/main/benchmark/{name}.csv")

# Curve files shipped as package data (see data/NOTICE.md for their licence).
PACKAGED_DIR = pathlib.Path(__file__).resolve().parents[1] / "data"

_MODEL_COL = "config name"
_SIZE_COL = "size"
_FAMILY_COL = "family"


# A curve file is missing or malformed; the message names file, row and column.
CurveFormatError = errors.CurveFileError


class CurveDownloadError(CurveFormatError):
  """A benchmark name is in no local place and its download failed; one-line message."""


@dataclasses.dataclass(frozen=True)
class CurveSet:
  """Fine-tuning curves of M models on a P-point data-size grid.

  Attributes:
    name: short name, the file stem (e.g. "flan").
    source: path the curves were read from.
    models: [M] model ids (the `config name` column).
    sizes: [M] int64 parameter counts.
    families: [M] model families.
    data_sizes: [P] float64 number of fine-tuning samples D, ascending;
      `data_sizes[0] == 0` is the zero-shot point.
    losses: [M, P] float64 test losses, `losses[m, p]` = L_m(data_sizes[p]);
      NaN where the file's cell is empty (not measured, see `measured`).
  """
  name: str
  source: str
  models: tuple[str, ...]
  sizes: np.ndarray
  families: tuple[str, ...]
  data_sizes: np.ndarray
  losses: np.ndarray

  @property
  def num_models(self) -> int:
    return len(self.models)

  @property
  def measured(self) -> np.ndarray:
    """[M, P] bool, True where the loss was measured (the file's cell is not empty)."""
    return np.isfinite(self.losses)

  def index(self, model: str) -> int:
    """Row index of `model`; KeyError naming the file if absent."""
    try:
      return self.models.index(model)
    except ValueError:
      raise KeyError(f"model {model!r} not in {self.source}") from None

  def column(self, data_size: float) -> np.ndarray:
    """[M] losses at one data size D (must be on the grid)."""
    hits = np.flatnonzero(self.data_sizes == data_size)
    if hits.size != 1:
      raise KeyError(f"D={data_size} not on the grid of {self.source}: "
                     f"{self.data_sizes.tolist()}")
    return self.losses[:, hits[0]]


def _err(path, msg: str, *, line: int | None = None, model: str | None = None,
         column: str | None = None) -> CurveFormatError:
  where = [f"{path}"]
  if line is not None:
    where.append(f"line {line}" + (f" (model {model!r})" if model is not None else ""))
  if column is not None:
    where.append(f"column {column!r}")
  return CurveFormatError(", ".join(where) + ": " + msg)


def _parse_data_size(header: str) -> int | None:
  """Integer D of a loss column header, or None for non-integer headers."""
  text = header.strip()
  if not text or not (text.isascii() and text.isdigit()):  # "²".isdigit() is True
    return None
  return int(text)


def parse_curves(text: str, *, source: str = "<string>", name: str | None = None) -> CurveSet:
  """Parses the CSV text of a curve file (see module docstring).

  Args:
    text: the whole file content.
    source: file name used in error messages and stored in the result.
    name: CurveSet name; default the stem of `source`.

  Returns:
    The validated CurveSet.

  Raises:
    CurveFormatError: naming file, line / model and column of the first problem.
  """
  text = text.removeprefix("\ufeff")  # the byte order mark of a spreadsheet's UTF-8 export
  try:
    rows = list(csv.reader(io.StringIO(text)))
  except csv.Error as e:  # e.g. a NUL byte, a field over the csv module's size limit
    raise _err(source, f"not a CSV file ({e})") from None
  # Drop fully blank lines (e.g. a trailing newline) but keep line numbers.
  numbered = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
  if not numbered:
    raise _err(source, "empty file (no header row)")
  header_line, header = numbered[0]
  header = [h.strip() for h in header]
  # The index column is sometimes written with an empty header (pandas default).
  if header and header[0] == "" and _MODEL_COL not in header:
    header[0] = _MODEL_COL
  seen = {}
  for j, h in enumerate(header):
    if h in seen:
      raise _err(source, f"duplicate column header (also column {seen[h] + 1})",
                 line=header_line, column=h)
    seen[h] = j
  for required in (_MODEL_COL, _SIZE_COL, "0"):
    if required not in seen:
      what = {"0": "zero-shot loss column '0'", _SIZE_COL: "parameter-count column 'size'",
              _MODEL_COL: "model id column 'config name'"}[required]
      raise _err(source, f"missing {what}; header is {header}", line=header_line,
                 column=required)
  loss_cols = []  # (D, column index, header)
  for j, h in enumerate(header):
    d = _parse_data_size(h)
    if d is not None:
      loss_cols.append((d, j, h))
    elif h not in (_MODEL_COL, _SIZE_COL, _FAMILY_COL):
      raise _err(source, "unknown column (expected 'config name', integer data sizes, "
                 "'size', 'family')", line=header_line, column=h)
  loss_cols.sort()
  for (d0, j0, h0), (d1, _, h1) in zip(loss_cols[:-1], loss_cols[1:], strict=True):
    if d0 == d1:  # "0200" and "200"
      raise _err(source, f"duplicate data size D={d1} (also column {h0!r}, column {j0 + 1})",
                 line=header_line, column=h1)
  has_family = _FAMILY_COL in seen

  models, sizes, families, losses = [], [], [], []
  model_line = {}
  for line, row in numbered[1:]:
    if len(row) != len(header):
      raise _err(source, f"has {len(row)} fields, header has {len(header)}", line=line,
                 model=row[0].strip() if row else None)
    model = row[seen[_MODEL_COL]].strip()
    if not model:
      raise _err(source, "empty model id", line=line, column=_MODEL_COL)
    if model in model_line:
      raise _err(source, f"duplicate model name (first on line {model_line[model]})",
                 line=line, model=model, column=_MODEL_COL)
    model_line[model] = line
    values = []
    for _, j, h in loss_cols:
      cell = row[j].strip()
      if not cell:  # not measured
        values.append(math.nan)
        continue
      try:
        v = float(cell)
      except ValueError:
        raise _err(source, f"non-numeric loss {cell!r}", line=line, model=model,
                   column=h) from None
      if math.isnan(v) or math.isinf(v):
        raise _err(source, f"non-finite loss {cell!r}", line=line, model=model, column=h)
      if v <= 0:
        raise _err(source, f"non-positive loss {cell!r} (losses must be > 0)", line=line,
                   model=model, column=h)
      values.append(v)
    if loss_cols and all(math.isnan(v) for v in values):
      raise _err(source, "no measured loss (every loss cell is empty)", line=line, model=model)
    cell = row[seen[_SIZE_COL]].strip()
    try:
      size_f = float(cell)
    except ValueError:
      raise _err(source, f"non-numeric size {cell!r}", line=line, model=model,
                 column=_SIZE_COL) from None
    if not math.isfinite(size_f) or size_f <= 0 or size_f != round(size_f):
      raise _err(source, f"size must be a positive integer, got {cell!r}", line=line,
                 model=model, column=_SIZE_COL)
    if size_f >= 2.0 ** 63:
      raise _err(source, f"size {cell!r} does not fit a 64-bit integer", line=line,
                 model=model, column=_SIZE_COL)
    models.append(model)
    sizes.append(int(round(size_f)))
    families.append(row[seen[_FAMILY_COL]].strip() if has_family else "")
    losses.append(values)
  if not models:
    raise _err(source, "no model rows after the header")
  return CurveSet(
    name=name if name is not None else pathlib.Path(source).stem,
    source=str(source),
    models=tuple(models),
    sizes=np.asarray(sizes, dtype=np.int64),
    families=tuple(families),
    data_sizes=np.asarray([d for d, _, _ in loss_cols], dtype=np.float64),
    losses=np.asarray(losses, dtype=np.float64).reshape(len(models), len(loss_cols)),
  )


def require_complete(curves: CurveSet) -> CurveSet:
  """Returns `curves` if every loss was measured; else a CurveFormatError naming the
  first empty cell (model and column) and the file."""
  missing = np.argwhere(~curves.measured)
  if missing.size:
    m, p = missing[0]
    raise CurveFormatError(
        f"{curves.source}: model {curves.models[m]!r}, column '{int(curves.data_sizes[p])}': "
        f"empty loss value ({len(missing)} empty cell(s)); this needs every model measured "
        "at every size (experiments.select reads files with unmeasured cells)")
  return curves


def _atomic_write(path: pathlib.Path, payload: bytes) -> None:
  """Writes `payload` to `path` via a temporary file and a rename.

  Readers never see a half-written file. The file gets the usual permissions
  (0666 less the umask), not mkstemp's private 0600.
  """
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _download(url: str, dest: pathlib.Path, timeout: float) -> None:
  """Downloads `url` to `dest` atomically (temporary file + rename)."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  try:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
      payload = resp.read()
  except (urllib.error.URLError, OSError, ValueError) as e:
    reason = " ".join(str(e).split())  # one line
    raise CurveDownloadError(
      f"benchmark {dest.stem!r}: not packaged, not in the cache ({dest}), and could not "
      f"download curve file from {url}: {reason}. Offline: copy {dest.name} to that cache "
      "path, or pass the file's path instead of the name.") from e
  # Validate before caching so a broken download never poisons the cache.
  try:
    text = payload.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _err(url, f"not UTF-8 text ({e})") from None
  parse_curves(text, source=url, name=dest.stem)
  _atomic_write(dest, payload)


def resolve_curve_file(spec: str | os.PathLike, *, data_dir: str | None = None,
                       cache_dir: str | None = None, url_template: str | None = None,
                       timeout: float = 60.0) -> pathlib.Path:
  """Local path of a curve file given a path or a benchmark name.

  Order: an existing path (or anything with a directory part / `.csv`
  suffix, which must exist); `data_dir` (else `$LENSLLM_DATA_DIR`)/NAME.csv
  (an explicit directory without NAME.csv is an error); the packaged
  `PACKAGED_DIR`/NAME.csv (flan, gigaword); the cache `cache_dir` (else `$LENSLLM_CACHE_DIR`, else
  `~/.cache/lensllm_jax`)/NAME.csv; finally a download from `url_template`
  (else `$LENSLLM_BENCHMARK_URL`, else the public release) into the cache.
  """
  spec_str = os.fspath(spec)
  path = pathlib.Path(spec_str).expanduser()
  if path.exists():
    return path
  if path.suffix == ".csv" or os.sep in spec_str or "/" in spec_str:
    raise CurveFormatError(f"curve file {spec_str} does not exist")
  name = spec_str
  data_dir = data_dir if data_dir is not None else os.environ.get("LENSLLM_DATA_DIR")
  if data_dir:
    local = pathlib.Path(data_dir).expanduser() / f"{name}.csv"
    if local.exists():
      return local
    raise CurveFormatError(f"benchmark {name!r} not found: {local} does not exist "
                           "(data_dir / $LENSLLM_DATA_DIR)")
  packaged = PACKAGED_DIR / f"{name}.csv"
  if packaged.exists():
    return packaged
  cache_dir = (cache_dir if cache_dir is not None else
               os.environ.get("LENSLLM_CACHE_DIR") or "~/.cache/lensllm_jax")
  cached = pathlib.Path(cache_dir).expanduser() / f"{name}.csv"
  if cached.exists():
    return cached
  template = (url_template if url_template is not None else
              os.environ.get("LENSLLM_BENCHMARK_URL") or DEFAULT_URL_TEMPLATE)
  _download(template.format(name=name), cached, timeout)
  return cached


def load_curves(spec: str | os.PathLike, *, data_dir: str | None = None,
                cache_dir: str | None = None, url_template: str | None = None,
                timeout: float = 60.0) -> CurveSet:
  """Loads and validates a curve file given by path or benchmark name.

  Args:
    spec: a path to a CSV, or a name such as "flan", "gigaword", "wmt19".
    data_dir: directory holding NAME.csv (default `$LENSLLM_DATA_DIR`).
    cache_dir: download cache (default `$LENSLLM_CACHE_DIR` or
      `~/.cache/lensllm_jax`); a name is downloaded at most once.
    url_template: download URL with `{name}` (default
      `$LENSLLM_BENCHMARK_URL` or `DEFAULT_URL_TEMPLATE`).
    timeout: download timeout in seconds.

  Returns:
    CurveSet with data_sizes [P] ascending (data_sizes[0] == 0) and losses [M, P].

  Raises:
    CurveFormatError: a missing or unreadable file, invalid content (names file, row,
      column), or a name missing from an explicit data_dir.
    CurveDownloadError (a CurveFormatError): a name found nowhere locally whose
      download failed (names the benchmark, the URL and the cache path).
  """
  path = resolve_curve_file(spec, data_dir=data_dir, cache_dir=cache_dir,
                            url_template=url_template, timeout=timeout)
  if path.is_dir():
    raise _err(path, "is a directory, not a curve file")
  try:
    text = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise _err(path, f"not UTF-8 text ({e})") from None
  except OSError as e:  # unreadable (permissions, a special file)
    raise _err(path, f"cannot be read ({e.strerror or e})") from None
  return parse_curves(text, source=str(path), name=path.stem)


def _format_float(v: float) -> str:
  return repr(float(v))  # shortest round-tripping representation


def write_curves(curves: CurveSet, path: str | os.PathLike) -> None:
  """Writes `curves` in the public CSV format (round-trips through load_curves).

  Columns: `config name`, one per data size (integer header), `size`,
  `family`; a NaN loss (not measured) is an empty cell. The write is atomic
  (temporary file + rename).
  """
  path = pathlib.Path(path)
  losses = np.asarray(curves.losses, dtype=np.float64)
  if losses.shape != (len(curves.models), len(curves.data_sizes)):
    raise ValueError(f"losses shape {losses.shape} != [models {len(curves.models)}, "
                     f"data sizes {len(curves.data_sizes)}]")
  headers = []
  for d in curves.data_sizes:
    if d < 0 or d != round(d):
      raise ValueError(f"data size {d} is not a non-negative integer")
    headers.append(str(int(round(d))))
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow([_MODEL_COL, *headers, _SIZE_COL, _FAMILY_COL])
  for m, model in enumerate(curves.models):
    writer.writerow([model, *(_format_float(v) if np.isfinite(v) else "" for v in losses[m]),
                     str(int(curves.sizes[m])), curves.families[m]])
  path.parent.mkdir(parents=True, exist_ok=True)
  _atomic_write(path, buf.getvalue().encode("utf-8"))
