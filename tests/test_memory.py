"""fipjax.memory: arrays kept on disk and read by rows; freed heap given back."""

import numpy as np
import pytest

from fipjax import memory


def test_on_disk_arrays_read_back_what_was_written_row_by_row():
  stored = memory.OnDisk((5, 4, 3), np.float32)
  assert stored.nbytes == 5 * 4 * 3 * 4 and len(stored) == 5
  values = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
  stored[0:2] = values[:2]
  stored[2:5] = values[2:]
  np.testing.assert_array_equal(stored[:], values)
  rows = np.array([3, 1, 1, 4])                   # any order, repeats (a padded batch)
  np.testing.assert_array_equal(stored[rows], values[rows])
  np.testing.assert_array_equal(stored[2], values[2])
  with pytest.raises(IndexError):
    stored[0:4:2] = values[:2]
  memory.release(compiled=True)                    # runs anywhere (a no-op without glibc)
