import pytest
import subprocess
import sys

from jmmkv import cli


def test_demo_runs_and_reports(capsys):
  code = cli.main(
    [
      "demo",
      "--preset",
      "tiny",
      "--policies",
      "full",
      "--prompt-len",
      "40",
      "--max-new-tokens",
      "8",
    ]
  )
  out = capsys.readouterr().out
  assert code == 0
  assert "new tokens/s" in out and "MiB allocated" in out and "kept fraction 1.00" in out


def test_bad_arguments_give_one_line(capsys):
  assert cli.main(["demo", "--batch", "0"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == "jmmkv: error: --batch must be >= 1"
  assert cli.main(["demo", "--preset", "tiny", "--policies", "nope", "--prompt-len", "8"]) == 2
  assert "unknown policy 'nope'" in capsys.readouterr().err


def test_console_entry_point_help():
  out = subprocess.run(
    [sys.executable, "-m", "jmmkv.cli", "demo", "--help"], capture_output=True, text=True
  )
  assert out.returncode == 0 and "--preset" in out.stdout


def test_bench_smoke_writes_json(tmp_path, capsys):
  import json

  out = tmp_path / "bench.json"
  code = cli.main(
    [
      "bench",
      "--preset",
      "tiny",
      "--lengths",
      "128",
      "--policies",
      "snapkv,full,pyramidkv,h2o:recent_fraction=0.25",
      "--budgets",
      "0.25",
      "--compare-hf",
      "--repeats",
      "1",
      "--max-new-tokens",
      "3",
      "--out",
      str(out),
    ]
  )
  assert code == 0
  result = json.loads(out.read_text())
  rows = {r["policy"]: r for r in result["rows"]}
  assert set(rows) == {"full", "snapkv", "pyramidkv", "h2o:recent_fraction=0.25"}
  assert rows["full"]["kv_bytes_allocated_vs_full"] == 1.0
  assert rows["snapkv"]["kv_bytes_allocated_vs_full"] < 0.3  # 25% of a 128-token prompt, measured
  assert rows["full"]["hf_decode_ms_per_token"] > 0  # transformers timed in the same run
  printed = capsys.readouterr().out
  assert "decode ms/tok" in printed and "transformers (SDPA, DynamicCache" in printed


def test_bench_rejects_bad_arguments(capsys):
  assert cli.main(["bench", "--preset", "tiny", "--policies", "nope"]) == 2
  assert "unknown policy 'nope'" in capsys.readouterr().err
  assert cli.main(["bench", "--preset", "tiny", "--budgets", "1.5"]) == 2
  assert "(0, 1]" in capsys.readouterr().err
  assert cli.main(["bench", "--preset", "tiny", "--policies", " , "]) == 2
  assert "list of policies is empty" in capsys.readouterr().err
  assert cli.main(["bench", "--preset", "tiny", "--policies", "lookm:nope=1"]) == 2
  err = capsys.readouterr().err
  assert "'lookm:nope=1'" in err and "nope" in err


def test_policy_spec_list_expands_all_among_specs():
  from jmmkv import policies

  got = policies.spec_list("all,lookm:keep_all_text=false,h2o,meda:split=(1,1)")
  assert got == [*policies.NAMES, "lookm:keep_all_text=false", "meda:split=(1,1)"]
  assert policies.spec_list("snapkv,all")[0] == "snapkv"
  assert sorted(policies.spec_list("snapkv,all")) == sorted(policies.NAMES)
  for bad in ("", " , ", "snapkv,nope", "lookm:nope=1"):
    with pytest.raises(ValueError):
      policies.spec_list(bad)


def test_demo_with_a_compressing_policy(capsys):
  assert (
    cli.main(
      [
        "demo",
        "--preset",
        "tiny",
        "--policies",
        "snapkv",
        "--budget",
        "0.25",
        "--prompt-len",
        "128",
        "--max-new-tokens",
        "4",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  assert "budget 0.25" in out and "kept fraction 0.25" in out  # (32 + 31) / (128 + 121), measured
  assert cli.main(["demo", "--preset", "tiny", "--policies", "h2o", "--budget", "1.5"]) == 2
  assert capsys.readouterr().err.strip() == "jmmkv: error: Budget ratio must be in (0, 1], got 1.5"


@pytest.mark.parametrize(
  "command",
  [
    [],
    ["demo"],
    ["convert"],
    ["generate"],
    ["bench"],
    ["eval"],
    ["eval", "milebench"],
    ["eval", "synthetic"],
  ],
)
def test_every_command_has_help(command, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.build_parser().parse_args(command + ["--help"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: jmmkv" + "".join(f" {c}" for c in command))
  assert "show this help message" in out
