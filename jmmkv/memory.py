"""Peak memory of one call above the memory held just before it, for `jmmkv bench`.

On an accelerator whose `memory_stats` report ``peak_bytes_in_use`` (TPU, GPU), the device's
peak; that counter cannot be reset, so a call whose peak stays below an earlier call's is not
measured (None). On CPU, the process's peak resident memory (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` before the call) above its resident memory before the call: host
arrays, XLA's buffers and temporaries alike. Memory freed by earlier calls but kept by the C
allocator would be reused unseen, so it is handed back first (glibc ``malloc_trim``). Elsewhere
None.
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import jax

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
  text = _STATUS.read_text()
  return int(text.split(f"{field}:")[1].split()[0])


def _reset_host_peak() -> bool:
  try:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return True
  except OSError:
    return False


def trim() -> None:
  """Returns the C heap's free memory to the OS (glibc), so that RSS counts live memory only."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


DEVICE, HOST, NONE = (
  "device peak_bytes_in_use",
  "process peak RSS (VmHWM)",
  "not measured on this platform",
)


def method() -> str:
  """How `peak_bytes` measures on this platform: `DEVICE`, `HOST` or `NONE`."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    return DEVICE if "peak_bytes_in_use" in (device.memory_stats() or {}) else NONE
  return HOST if _STATUS.is_file() else NONE


def peak_bytes(fn, *args, **kwargs):
  """``(fn(*args, **kwargs), peak bytes above the baseline or None, what was measured)``; the
  result is waited for (`jax.block_until_ready`)."""
  how = method()
  if how == DEVICE:
    device = jax.devices()[0]
    stats = device.memory_stats()
    before = stats["bytes_in_use"], stats["peak_bytes_in_use"]
    out = jax.block_until_ready(fn(*args, **kwargs))
    peak = device.memory_stats()["peak_bytes_in_use"]
    return out, (peak - before[0] if peak > before[1] else None), how
  if how == HOST:
    gc.collect()
    trim()
    if _reset_host_peak():
      base = _status_kib("VmRSS")
      out = jax.block_until_ready(fn(*args, **kwargs))
      return out, (_status_kib("VmHWM") - base) * 1024, how
    how = NONE
  return jax.block_until_ready(fn(*args, **kwargs)), None, how
