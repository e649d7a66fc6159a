"""What a result file records about the software that produced it."""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("jax", "jaxlib", "flax", "numpy", "transformers")


def versions(*extra: str) -> dict[str, str | None]:
  """Versions of Python, jmmkv and `PACKAGES` plus ``extra`` distributions (None: not installed)."""
  import jmmkv

  out: dict[str, str | None] = {"python": platform.python_version(), "jmmkv": jmmkv.__version__}
  for name in PACKAGES + extra:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out
