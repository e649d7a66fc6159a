"""What the eval commands' ``--plot`` options share: the path check and pyplot on Agg."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jmmkv.files import output_path


def plot_path(arg: str | None) -> Path | None:
  """The checked ``--plot`` path (None when not asked for); a clear error without matplotlib,
  before any work."""
  if not arg:
    return None
  path = output_path(arg, "--plot")
  if importlib.util.find_spec("matplotlib") is None:
    raise ValueError("--plot needs matplotlib: pip install -e '.[plot]' (or leave --plot out)")
  return path


def pyplot():
  """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
  return plt
