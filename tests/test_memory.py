"""`jmmkv.memory.peak_bytes` sees what a call allocates above the baseline, and not more."""

from __future__ import annotations

import numpy as np

from jmmkv import memory

MiB = 2**20


def _allocate(n_mib: int) -> float:
  x = np.ones(n_mib * MiB // 8)  # float64, every page touched
  return float(x[:: 4096 // 8].sum())


def test_peak_bytes_measures_the_calls_own_peak():
  small = memory.peak_bytes(_allocate, 1)
  # Freed when the call returns: only the peak sees it. Memory the process frees meanwhile
  # (earlier tests' buffers, released by other threads) can only lower the figure: the best of
  # three tries.
  big = max((memory.peak_bytes(_allocate, 200) for _ in range(3)), key=lambda r: r[1])
  again = memory.peak_bytes(_allocate, 64)  # below the earlier peak, measured all the same
  assert small[2] == big[2] == "process peak RSS (VmHWM)"  # the suite runs on Linux CPU
  assert big[0] == 200 * MiB / 4096  # the call's result comes back
  assert small[1] < 20 * MiB
  assert 190 * MiB <= big[1] < 260 * MiB
  assert 56 * MiB <= again[1] < 120 * MiB
