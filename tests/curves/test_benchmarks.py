"""Tests of lensllm_jax.curves.benchmarks: the public curve files, broken files, download path."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest

from lensllm_jax.curves import benchmarks

GRID = [0] + [200 * 2**k for k in range(14)]
HEADER = "config name," + ",".join(str(d) for d in GRID) + ",size,family"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
  for var in ("LENSLLM_DATA_DIR", "LENSLLM_CACHE_DIR", "LENSLLM_BENCHMARK_URL"):
    monkeypatch.delenv(var, raising=False)


def _row(model, losses, size=1000, family="Fam"):
  return f"{model}," + ",".join(str(v) for v in losses) + f",{size},{family}"


def _good_rows():
  a = [4.0 - 0.1 * k for k in range(15)]
  b = [5.0 - 0.2 * k for k in range(15)]
  return [_row("org/model-a", a, 111, "A"), _row("model-b", b, 222, "B")]


def _write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return path


def test_shared_files_load(shared_benchmarks):
  flan = benchmarks.load_curves(shared_benchmarks / "flan.csv")
  giga = benchmarks.load_curves("gigaword", data_dir=str(shared_benchmarks))
  for cs in (flan, giga):
    assert cs.losses.shape == (30, 15)
    assert cs.losses.dtype == np.float64 and cs.sizes.dtype == np.int64
    np.testing.assert_array_equal(cs.data_sizes, GRID)
    assert len(cs.models) == len(set(cs.models)) == 30
    assert len(cs.families) == 30
  assert flan.name == "flan" and giga.name == "gigaword"
  # Spot checks against the CSV text.
  i = flan.index("MBZUAI/LaMini-GPT-124M")
  assert i == 0
  assert flan.losses[i, 0] == 4.891325951
  assert flan.losses[i, -1] == 1.742699981
  assert flan.sizes[i] == 124440576 and flan.families[i] == "LaMini"
  j = giga.index("gpt2-xl")
  assert giga.losses[j, 0] == 3.411456585
  assert giga.losses[j, 1] == 2.043688
  assert giga.column(1638400)[j] == 1.285515
  assert giga.sizes[j] == 1557611200 and giga.families[j] == "GPT2"
  assert flan.index("google/t5-v1_1-base") == 29


def test_name_lookup_via_env(shared_benchmarks, monkeypatch):
  monkeypatch.setenv("LENSLLM_DATA_DIR", str(shared_benchmarks))
  cs = benchmarks.load_curves("flan")
  assert cs.source == str(shared_benchmarks / "flan.csv")
  with pytest.raises(benchmarks.CurveFormatError, match="wmt19"):
    benchmarks.load_curves("wmt19")


def test_write_roundtrip_and_column_order(tmp_path, shared_benchmarks):
  flan = benchmarks.load_curves(shared_benchmarks / "flan.csv")
  out = tmp_path / "copy.csv"
  benchmarks.write_curves(flan, out)
  back = benchmarks.load_curves(out)
  np.testing.assert_array_equal(back.losses, flan.losses)
  np.testing.assert_array_equal(back.sizes, flan.sizes)
  assert back.models == flan.models and back.families == flan.families
  # A subset of the D columns, shuffled, with `size` first: D comes back sorted.
  cols = ["size", "1600", "config name", "0", "200", "family"]
  lines = [",".join(cols), "1000,2.5,m1,4.0,3.0,F", "2000,1.5,m2,5.0,2.0,G"]
  cs = benchmarks.load_curves(_write(tmp_path, "sub.csv", lines))
  np.testing.assert_array_equal(cs.data_sizes, [0, 200, 1600])
  np.testing.assert_array_equal(cs.losses, [[4.0, 3.0, 2.5], [5.0, 2.0, 1.5]])
  np.testing.assert_array_equal(cs.sizes, [1000, 2000])


def test_empty_cells_are_not_measured(tmp_path):
  rows = _good_rows()
  c = rows[0].split(","); c[4] = ""; c[9] = " "; rows[0] = ",".join(c)  # noqa: E702
  cs = benchmarks.load_curves(_write(tmp_path, "gaps.csv", [HEADER, *rows]))
  measured = np.ones((2, 15), bool)
  measured[0, [3, 8]] = False
  np.testing.assert_array_equal(cs.measured, measured)
  assert np.isnan(cs.losses[0, 3]) and np.isnan(cs.losses[0, 8])
  np.testing.assert_array_equal(cs.losses[measured], [float(v) for i, r in enumerate(_good_rows())
                                                      for j, v in enumerate(r.split(",")[1:16])
                                                      if measured[i, j]])
  # Written back as empty cells, read back the same.
  benchmarks.write_curves(cs, tmp_path / "back.csv")
  assert ",3.8,,3.6," in (tmp_path / "back.csv").read_text()
  back = benchmarks.load_curves(tmp_path / "back.csv")
  np.testing.assert_array_equal(back.measured, measured)
  np.testing.assert_array_equal(back.losses[measured], cs.losses[measured])
  with pytest.raises(benchmarks.CurveFormatError, match=r"'org/model-a', column '800'.*2 empty"):
    benchmarks.require_complete(cs)
  full = dataclasses.replace(back, losses=np.nan_to_num(back.losses, nan=1.0))
  assert benchmarks.require_complete(full) is full


@pytest.mark.parametrize("case,needles", [
  ("missing_column", ["line 1", "'size'"]),
  ("missing_zero", ["line 1", "'0'"]),
  ("non_numeric", ["line 3", "'model-b'", "column '400'", "'abc'"]),
  ("non_positive", ["line 2", "'org/model-a'", "column '1638400'", "non-positive"]),
  ("nan", ["line 3", "'model-b'", "column '200'", "non-finite"]),
  ("all_empty", ["line 2", "'org/model-a'", "no measured loss"]),
  ("duplicate", ["line 4", "'model-b'", "column 'config name'", "duplicate", "line 3"]),
  ("bad_size", ["line 3", "'model-b'", "column 'size'"]),
  ("zero_size", ["line 2", "'org/model-a'", "column 'size'", "positive"]),
  ("short_row", ["line 3", "fields"]),
  ("unknown_column", ["line 1", "column 'loss@1k'"]),
])
def test_broken_files(tmp_path, case, needles):
  header, rows = HEADER, _good_rows()
  cells = lambda r: r.split(",")  # noqa: E731
  join = ",".join
  if case == "missing_column":
    header = header.replace(",size", "")
    rows = [join(cells(r)[:16] + cells(r)[17:]) for r in rows]
  elif case == "missing_zero":
    header = header.replace(",0,", ",", 1)
    rows = [join(cells(r)[:1] + cells(r)[2:]) for r in rows]
  elif case == "non_numeric":
    c = cells(rows[1]); c[3] = "abc"; rows[1] = join(c)  # noqa: E702
  elif case == "non_positive":
    c = cells(rows[0]); c[15] = "-0.5"; rows[0] = join(c)  # noqa: E702
  elif case == "nan":
    c = cells(rows[1]); c[2] = "nan"; rows[1] = join(c)  # noqa: E702
  elif case == "all_empty":
    c = cells(rows[0]); c[1:16] = [""] * 15; rows[0] = join(c)  # noqa: E702
  elif case == "duplicate":
    rows.append(rows[1])
  elif case == "bad_size":
    c = cells(rows[1]); c[16] = "1.3B"; rows[1] = join(c)  # noqa: E702
  elif case == "zero_size":
    c = cells(rows[0]); c[16] = "0"; rows[0] = join(c)  # noqa: E702
  elif case == "short_row":
    rows[1] = join(cells(rows[1])[:10])
  elif case == "unknown_column":
    header = header.replace(",family", ",loss@1k")
  path = _write(tmp_path, f"{case}.csv", [header, *rows])
  with pytest.raises(benchmarks.CurveFormatError) as info:
    benchmarks.load_curves(path)
  msg = str(info.value)
  assert str(path) in msg
  for needle in needles:
    assert needle in msg, (needle, msg)


def test_good_synthetic_file(tmp_path):
  cs = benchmarks.load_curves(_write(tmp_path, "ok.csv", [HEADER, *_good_rows()]))
  assert cs.models == ("org/model-a", "model-b")
  np.testing.assert_allclose(cs.losses[1], [5.0 - 0.2 * k for k in range(15)])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    del args


@contextlib.contextmanager
def _serve(directory):
  handler = functools.partial(_QuietHandler, directory=str(directory))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_once_then_cache(tmp_path, shared_benchmarks, monkeypatch):
  # "wmt19" is not packaged, so it is downloaded (here from a local server).
  served = tmp_path / "served"
  served.mkdir()
  (served / "wmt19.csv").write_bytes((shared_benchmarks / "flan.csv").read_bytes())
  cache = tmp_path / "cache"
  with _serve(served) as base:
    template = base + "/{name}.csv"
    cs = benchmarks.load_curves("wmt19", cache_dir=str(cache), url_template=template)
    assert (cache / "wmt19.csv").exists()
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]
    # A missing file on the server: clear error with the URL, nothing cached.
    with pytest.raises(benchmarks.CurveFormatError, match=r"127\.0\.0\.1.*/missing\.csv"):
      benchmarks.load_curves("missing", cache_dir=str(cache), url_template=template)
    assert not (cache / "missing.csv").exists()
  # Server stopped: served from the cache (env vars route the same way).
  monkeypatch.setenv("LENSLLM_CACHE_DIR", str(cache))
  monkeypatch.setenv("LENSLLM_BENCHMARK_URL", template)
  again = benchmarks.load_curves("wmt19")
  np.testing.assert_array_equal(again.losses, cs.losses)
  assert pathlib.Path(again.source) == cache / "wmt19.csv"
  # Offline (nothing listens any more): one line naming the benchmark, URL and cache.
  with pytest.raises(benchmarks.CurveDownloadError,
                     match=r"^benchmark 'missing': .*could not download .*/missing\.csv") as e:
    benchmarks.load_curves("missing")
  assert "\n" not in str(e.value) and str(cache / "missing.csv") in str(e.value)


def test_packaged_curves_need_no_data_dir_or_network(tmp_path, monkeypatch):
  # An empty cache and a URL nothing listens on: only the package data can answer.
  monkeypatch.setenv("LENSLLM_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("LENSLLM_BENCHMARK_URL", "http://127.0.0.1:9/{name}.csv")
  for name in ("flan", "gigaword"):
    cs = benchmarks.load_curves(name)
    assert pathlib.Path(cs.source) == benchmarks.PACKAGED_DIR / f"{name}.csv"
    assert cs.losses.shape == (30, 15) and np.isfinite(cs.losses).all()
  assert not (tmp_path / "cache").exists()
  notice = (benchmarks.PACKAGED_DIR / "NOTICE.md").read_text()
  assert "Rectified Scaling Law" in notice and "Apache License, Version 2.0" in notice
  assert "Apache License" in (benchmarks.PACKAGED_DIR / "LICENSE").read_text()
  # An explicit data directory still wins over the package data.
  local = tmp_path / "local"
  local.mkdir()
  (local / "flan.csv").write_text(HEADER + "\n" + "\n".join(_good_rows()) + "\n")
  assert benchmarks.load_curves("flan", data_dir=str(local)).num_models == 2


@pytest.mark.slow
def test_wheel_ships_the_curve_files(tmp_path):
  # A non-editable install gets the files: they are declared package data.
  root = pathlib.Path(benchmarks.__file__).resolve().parents[2]
  src = tmp_path / "src"  # a copy, so the build leaves nothing in the repository
  shutil.copytree(root / "lensllm_jax", src / "lensllm_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(root / name, src / name)
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                         "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (wheel,) = (tmp_path / "dist").glob("lensllm_jax-*.whl")
  with zipfile.ZipFile(wheel) as z:
    for name in ("flan.csv", "gigaword.csv", "NOTICE.md", "LICENSE", "curve_pfn/weights.msgpack",
                 "context_pfn/weights.msgpack"):
      assert z.read(f"lensllm_jax/data/{name}") == (benchmarks.PACKAGED_DIR / name).read_bytes()


def test_broken_download_is_not_cached(tmp_path):
  served = tmp_path / "served"
  served.mkdir()
  (served / "bad.csv").write_text(HEADER + "\nm,1,2\n")
  cache = tmp_path / "cache"
  with _serve(served) as base:
    with pytest.raises(benchmarks.CurveFormatError, match="fields"):
      benchmarks.load_curves("bad", cache_dir=str(cache), url_template=base + "/{name}.csv")
  assert not (cache / "bad.csv").exists()
  assert os.listdir(cache) == []
