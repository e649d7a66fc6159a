"""Command-line values shared by ``jmmkv bench`` and ``jmmkv eval``: checked before any work, with
errors that name the flag."""

from __future__ import annotations

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
