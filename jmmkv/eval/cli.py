"""``jmmkv eval ...`` sub-commands."""

from __future__ import annotations


def register(sub) -> None:
  """Add the ``eval`` command (with its own sub-commands) to the ``jmmkv`` parser's subparsers."""
  ev = sub.add_parser("eval", help="evaluate a policy x budget on a benchmark")
  ev.add_subparsers(dest="benchmark", required=True)
