"""Command-line values shared by ``jmmkv bench`` and ``jmmkv eval``: checked before any work, with
errors that name the flag."""

from __future__ import annotations

import math
import re

# What jmmkv.load accepts; every --dtype takes them.
DTYPES = ["float32", "bfloat16", "bf16", "fp32"]


def numbers(text: str, flag: str, kind=float, minimum=None) -> list:
  """``"4096,16384"`` -> ``[4096, 16384]`` (``kind`` int or float), each at least ``minimum``."""
  what = "integers" if kind is int else "numbers"
  try:
    out = [kind(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{flag} must be comma-separated {what}, got {text!r}") from None
  if not out:
    raise ValueError(f"{flag} is empty")
  low = [x for x in out if minimum is not None and x < minimum]
  if low:
    raise ValueError(f"{flag} must be >= {minimum}, got {low[0]}")
  return out


def ratios(text: str, flag: str = "--budgets") -> list[float]:
  """`numbers`, each a valid `jmmkv.Budget` ratio in (0, 1]."""
  from jmmkv.cache.budget import Budget

  out = numbers(text, flag)
  for r in out:
    Budget(ratio=r)  # range check
  return out


def budget(spec: str, ratio: float | None):
  """``Budget(ratio=ratio)`` for the policy ``spec``, checked even for ``full`` (which gets None:
  it ignores it); a missing ratio is refused for every other policy."""
  from jmmkv.cache import policies
  from jmmkv.cache.budget import Budget

  full = policies.spec_kwargs(spec)[0] == "full"
  if ratio is None:
    if full:
      return None
    raise ValueError(f"--budget is needed for policy {spec} (a kept fraction in (0, 1], e.g. 0.2)")
  checked = Budget(ratio=ratio)
  return None if full else checked


_BYTE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def byte_size(text: str, flag: str) -> int:
  """``"2GiB"`` -> ``2147483648``: a positive number of bytes, with an optional B, KiB, MiB, GiB
  or TiB suffix (powers of 1024; a fraction such as ``1.5GiB`` is rounded down to whole bytes)."""
  match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", text)
  value = None
  if match and match[2].lower() in _BYTE_UNITS:
    try:
      value = float(match[1]) * _BYTE_UNITS[match[2].lower()]
    except ValueError:
      pass
  if value is None or not math.isfinite(value) or value < 1:
    raise ValueError(
      f"{flag} must be a size of at least one byte such as 2GiB, 512MiB or 1073741824 (suffixes "
      f"B, KiB, MiB, GiB, TiB: powers of 1024), got {text!r}"
    )
  return int(value)
