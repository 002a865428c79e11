"""Progress of long loops: a bar with ETA on a terminal, absl log lines otherwise.

`progress(iterable, desc=..., total=...)` wraps a loop. When stderr is a
terminal it shows a tqdm bar (count, rate, ETA); otherwise (CI, batch jobs,
log files) it writes an absl INFO line at most every `log_every_s` seconds and
at the end: `desc: done/total (pct %), rate/s, ETA s`. Loops shorter than
`show_after_s` (2 s) stay silent: no bar, no lines. For loops that
are not a `for` over an iterable (a `while`, a step counter), use it as a
context manager and call `update(n)`:

    for fold in progress(folds, desc="protocol folds"): ...
    with progress(total=max_steps, desc="training", unit="step") as bar:
      ...; bar.update()

`LENSLLM_PROGRESS=bar|log|off` forces one mode (tests use `log`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from absl import logging

MODES = ("bar", "log", "off")


def _mode() -> str:
  forced = os.environ.get("LENSLLM_PROGRESS", "")
  if forced:
    if forced not in MODES:
      raise ValueError(f"LENSLLM_PROGRESS={forced!r}: expected one of {MODES}")
    return forced
  return "bar" if sys.stderr.isatty() else "log"


class Progress:
  """Iterable / context manager reporting the progress of a loop (see module doc).

  Args:
    iterable: the loop's iterable, or None for `update()`-driven use.
    desc: what is being counted, shown first on the bar and on each log line.
    total: number of items (default `len(iterable)` where defined).
    unit: name of one item ("it", "step", "fold", ...).
    log_every_s: minimum seconds between two log lines (log mode).
    show_after_s: the bar appears, and log lines start, only once the loop
      has run this long (short loops stay silent).
  """

  def __init__(self, iterable: Iterable | None = None, *, desc: str, total: int | None = None,
               unit: str = "it", log_every_s: float = 30.0, show_after_s: float = 2.0):
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
      total = len(iterable)
    self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
    self.log_every_s, self.show_after_s = float(log_every_s), float(show_after_s)
    self.mode = _mode()
    self.count = 0
    self._start = time.monotonic()
    self._last_log = self._start - self.log_every_s + self.show_after_s
    self._logged = False
    self._bar: Any = None

  def update(self, n: int = 1) -> None:
    """Counts n more items done."""
    self.count += n
    if self._bar is not None:
      self._bar.update(n)
      return
    if self.mode == "off":
      return
    now = time.monotonic()
    if now - self._start < self.show_after_s:
      return
    if self.mode == "bar":
      from tqdm.auto import tqdm

      self._bar = tqdm(total=self.total, initial=self.count, desc=self.desc, unit=self.unit,
                       dynamic_ncols=True)
    elif now - self._last_log >= self.log_every_s:
      self._last_log, self._logged = now, True
      logging.info("%s", self.line(now))

  def line(self, now: float | None = None) -> str:
    """`desc: done/total (pct %), rate unit/s, ETA s` (the log-mode line)."""
    elapsed = max((time.monotonic() if now is None else now) - self._start, 1e-9)
    rate = self.count / elapsed
    if self.total:
      eta = (self.total - self.count) / rate if rate > 0 else float("inf")
      return (f"{self.desc}: {self.count}/{self.total} ({100 * self.count / self.total:.0f} %), "
              f"{rate:.3g} {self.unit}/s, ETA {eta:.0f} s")
    return f"{self.desc}: {self.count} {self.unit}, {rate:.3g} {self.unit}/s"

  def close(self) -> None:
    """Ends the bar, or writes the final log line."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self.mode == "log" and self._logged:
      logging.info("%s (%.1f s)", self.line(), time.monotonic() - self._start)
    self.mode = "off"  # close() is idempotent

  def __iter__(self) -> Iterator:
    if self.iterable is None:
      raise TypeError(f"Progress({self.desc!r}) has no iterable; use update()")
    try:
      for item in self.iterable:
        yield item
        self.update()
    finally:
      self.close()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress(iterable: Iterable | None = None, **kwargs) -> Progress:
  """`Progress(iterable, **kwargs)`: wraps a loop (see the module docstring)."""
  return Progress(iterable, **kwargs)
