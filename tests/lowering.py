"""Lowering a jitted kernel for a TPU (Mosaic) or GPU (Triton) target from the CPU host."""

from __future__ import annotations

import jax

KERNEL_CALL = {"tpu": "tpu_custom_call(", "cuda": "__gpu$xla.gpu.triton("}


def lowered(fn, *args, target: str, x64: bool = False) -> str:
  """The StableHLO text of jitted ``fn(*args)`` lowered for ``target`` (``"tpu"`` or
  ``"cuda"``), optionally under x64; nothing is compiled."""
  with jax.enable_x64(x64):
    return fn.trace(*args).lower(lowering_platforms=(target,)).as_text()


def kernel_calls(text: str, target: str) -> int:
  """How many Pallas kernel calls for ``target`` the lowered ``text`` holds."""
  return text.count(KERNEL_CALL[target])
