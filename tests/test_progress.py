"""lensllm_jax.progress: log lines (no terminal) and the tqdm bar (terminal)."""

from __future__ import annotations

import logging

import pytest

from lensllm_jax import progress as progress_mod
from lensllm_jax.progress import progress


def _lines(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


def test_log_mode_writes_count_total_rate_and_eta(monkeypatch, caplog):
  monkeypatch.setenv("LENSLLM_PROGRESS", "log")
  caplog.set_level(logging.INFO)
  seen = list(progress(range(4), desc="folds", unit="fold", log_every_s=0, show_after_s=0))
  assert seen == [0, 1, 2, 3]
  lines = _lines(caplog)
  # One line per item (log_every_s=0) and the final one, counts in order.
  assert [line.split(":")[1].split()[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4", "4/4"]
  assert all("fold/s" in line and "ETA" in line for line in lines)
  assert "(100 %)" in lines[-1] and lines[-1].endswith(" s)")


def test_log_mode_is_rate_limited_and_update_driven(monkeypatch, caplog):
  monkeypatch.setenv("LENSLLM_PROGRESS", "log")
  caplog.set_level(logging.INFO)
  with progress(total=100, desc="training", unit="step", log_every_s=3600,
                show_after_s=0) as bar:
    for _ in range(100):
      bar.update()
  lines = _lines(caplog)
  # The first line once shown, then none within log_every_s, then the final one.
  assert len(lines) == 2 and lines[0].startswith("training: 1/100 (1 %)")
  assert lines[1].startswith("training: 100/100 (100 %)")
  # A loop shorter than show_after_s says nothing.
  caplog.clear()
  assert sum(progress(range(50), desc="short", log_every_s=0)) == 1225
  assert not _lines(caplog)
  # No total: a count and a rate, no ETA.
  p = progress(desc="stream", log_every_s=3600)
  p.update(7)
  assert p.line().startswith("stream: 7 it, ") and "ETA" not in p.line()


def test_bar_mode_shows_a_tqdm_bar(monkeypatch, capsys):
  monkeypatch.setenv("LENSLLM_PROGRESS", "bar")
  assert sum(progress(range(5), desc="lanczos", show_after_s=0)) == 10
  err = capsys.readouterr().err
  assert "lanczos" in err and "5/5" in err


def test_off_mode_and_bad_mode(monkeypatch, caplog, capsys):
  monkeypatch.setenv("LENSLLM_PROGRESS", "off")
  caplog.set_level(logging.INFO)
  assert list(progress([1, 2], desc="x", log_every_s=0, show_after_s=0)) == [1, 2]
  assert not _lines(caplog) and not capsys.readouterr().err
  monkeypatch.setenv("LENSLLM_PROGRESS", "loud")
  with pytest.raises(ValueError, match="LENSLLM_PROGRESS"):
    progress_mod.progress([1], desc="x")
