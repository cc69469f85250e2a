"""Host memory given back: what XLA's CPU client and orbax free goes into the C heap, which keeps it resident; and
arrays kept on disk, read a few rows at a time."""

from __future__ import annotations

import ctypes
import gc
import os
import tempfile

import jax
import numpy as np


def release(*, compiled: bool = False) -> None:
  """Give freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere nothing); with ``compiled``,
  first drop every compiled program JAX holds (a later call compiles again, from the persistent compilation cache
  where there is one)."""
  if compiled:
    jax.clear_caches()
    gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):         # not glibc: nothing to trim
    pass


class OnDisk:
  """An array ``shape``/``dtype`` kept in an unnamed temporary file (removed with the process, a kill included),
  written and read by rows (``a[i:j] = x``, ``a[rows]``) with plain reads: resident memory holds the rows being read,
  never the whole array (nor the file's pages, as a memory map would). For large arrays read now and then (the base
  model's held-out distributions, read at each evaluation)."""

  def __init__(self, shape, dtype):
    self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
    self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
    self._row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
    self._file = tempfile.TemporaryFile(prefix="fipjax-")
    self._file.truncate(self.nbytes)

  def __len__(self) -> int:
    return self.shape[0]

  def __setitem__(self, rows: slice, values) -> None:
    start, stop, step = rows.indices(len(self))
    if step != 1:
      raise IndexError("OnDisk writes contiguous rows (a[i:j] = x)")
    data = np.ascontiguousarray(np.broadcast_to(np.asarray(values, self.dtype), (stop - start, *self.shape[1:])))
    view, offset = memoryview(data).cast("B"), start * self._row
    while view:                          # pwrite may write less than asked (2 GB a call on Linux)
      done = os.pwrite(self._file.fileno(), view, offset)
      view, offset = view[done:], offset + done

  def __getitem__(self, rows) -> np.ndarray:
    """The rows ``rows`` (a slice, an index or an array of them) as a new array: one read of their span."""
    rows = np.arange(len(self))[rows]
    lo, hi = int(rows.min(initial=0)), int(rows.max(initial=-1)) + 1
    out = np.empty((max(hi - lo, 0), *self.shape[1:]), self.dtype)
    view, offset = memoryview(out).cast("B"), lo * self._row
    while view:
      done = os.preadv(self._file.fileno(), [view], offset)
      if not done:
        raise EOFError(f"{self._file.name}: the file ends before row {hi}")
      view, offset = view[done:], offset + done
    return out[rows - lo]
