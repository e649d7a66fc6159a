"""A shared test helper: the one error line of a failing ``jmmkv`` command."""

from __future__ import annotations


def cli_error(capsys, argv) -> str:
  """The error of a `jmmkv` command that must fail with one ``jmmkv: error:`` line (exit 2),
  without its prefix."""
  from jmmkv import cli

  capsys.readouterr()
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("jmmkv: error: ") and err.count("\n") == 1, err
  return err.removeprefix("jmmkv: error: ").rstrip("\n")
