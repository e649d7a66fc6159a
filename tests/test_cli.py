import subprocess
import sys

from jmmkv import cli


def test_demo_runs_and_reports(capsys):
  code = cli.main(["demo", "--preset", "tiny", "--prompt-len", "40", "--max-new-tokens", "8"])
  out = capsys.readouterr().out
  assert code == 0
  assert "new tokens/s" in out and "MiB allocated" in out and "kept fraction 1.00" in out


def test_bad_arguments_give_one_line(capsys):
  assert cli.main(["demo", "--batch", "0"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == "jmmkv: error: --batch must be >= 1"
  assert cli.main(["demo", "--preset", "tiny", "--policy", "nope", "--prompt-len", "8"]) == 2
  assert "unknown policy 'nope'" in capsys.readouterr().err


def test_console_entry_point_help():
  out = subprocess.run(
    [sys.executable, "-m", "jmmkv.cli", "demo", "--help"], capture_output=True, text=True
  )
  assert out.returncode == 0 and "--preset" in out.stdout
