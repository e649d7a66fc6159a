"""Pallas kernels, each beside a plain-jnp ``*_reference`` with the same signature.

`mode()` picks the implementation a dispatcher runs: the Pallas kernel on TPU/GPU, the reference on
CPU. ``JMMKV_KERNELS=reference|pallas|interpret`` overrides it (``interpret`` runs the kernels in
Pallas interpret mode, which works on CPU and is what the tests use).
"""

from __future__ import annotations

import os

import jax

MODES = ("reference", "pallas", "interpret")


def mode() -> str:
  """``"pallas"`` on TPU/GPU, ``"reference"`` elsewhere, unless ``JMMKV_KERNELS`` says otherwise."""
  forced = os.environ.get("JMMKV_KERNELS", "").strip().lower()
  if forced:
    if forced not in MODES:
      raise ValueError(f"JMMKV_KERNELS must be one of {MODES}, got {forced!r}")
    return forced
  return "pallas" if jax.default_backend() in ("tpu", "gpu") else "reference"
