"""Host memory given back: what XLA's CPU client and orbax free goes into the C heap, which keeps it resident."""

from __future__ import annotations

import ctypes
import gc

import jax


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
