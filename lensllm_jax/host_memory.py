"""Host memory: let a train step reuse the previous step's freed buffers (glibc malloc).

XLA:CPU allocates the temporary buffers of every execution of a compiled
program with malloc and frees them when it ends: for a train step that is one
block of tens to hundreds of MiB (tiny-gpt2 at B16, T128: 42 MiB; small-gpt2:
329 MiB). glibc serves a block above its mmap threshold (at most 32 MiB) with
a fresh mmap and unmaps it on free, and does the same for any block that a
thread's own arena (64 MiB heaps) cannot hold. Every step then faults in new
zero pages, 4 KiB at a time: 10.7k page faults and ~20 ms of system time per
tiny-gpt2 step (a third of its CPU time), 85k and 120-200 ms per small-gpt2
step. PyTorch's large tensors pay the same (small-gpt2: 66k faults, ~300 ms
per step).

`reuse_freed_memory` sets glibc's malloc (mallopt) to serve every block from
its heap (M_MMAP_MAX = 0), every thread from the one main arena (M_ARENA_MAX =
1; threads that already allocated keep their arena, so call it before the
first computation) and to give freed memory at the top of the heap back to
the system only beyond TRIM_THRESHOLD (M_TRIM_THRESHOLD): the next step finds
its buffers already mapped. The price is memory: the process keeps up to
TRIM_THRESHOLD of freed heap instead of returning it. Process-wide; results
are unchanged (only where buffers live); a no-op where the C library is not
glibc. The experiment binaries call it at start (experiments/common.py,
--reuse_freed_memory); code that uses the library directly may call it
itself. docs/speed.md ("Train step") has the measurements.
"""

from __future__ import annotations

import ctypes
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# Freed memory at the top of the heap kept for reuse (glibc's default: 128 KiB).
TRIM_THRESHOLD = 1 << 30


def is_glibc() -> bool:
  """Whether this process runs on glibc (the only C library `reuse_freed_memory` configures)."""
  return platform.libc_ver()[0] == "glibc"


def reuse_freed_memory(trim_threshold: int = TRIM_THRESHOLD) -> bool:
  """Sets glibc's malloc so that freed blocks stay mapped and are reused (see the module).

  Args:
    trim_threshold: bytes of freed memory at the top of the heap kept
      mapped (M_TRIM_THRESHOLD), at most 2**31 - 1.

  Returns:
    True if all three settings were applied, False off glibc (nothing done).
  """
  if not 0 <= trim_threshold < 2**31:
    raise ValueError(f"trim_threshold must be in [0, 2**31), got {trim_threshold}")
  if not is_glibc():
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  # mallopt returns 1 on success, 0 on error.
  done = [mallopt(M_MMAP_MAX, 0), mallopt(M_ARENA_MAX, 1), mallopt(M_TRIM_THRESHOLD, trim_threshold)]
  return all(done)
