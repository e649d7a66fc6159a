import argparse
import subprocess
import sys

import pytest

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
  assert result["meta"]["peak_memory"] == "process peak RSS (VmHWM)"  # Linux CPU
  assert all(isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0 for r in rows.values())
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
  assert err.startswith("jmmkv: error: policy 'lookm' has no setting 'nope'; its settings: ")


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


def _no_run(*args, **kwargs):
  raise AssertionError("the work started before the arguments were checked")


def test_bench_compare_hf_without_torch_is_one_line(monkeypatch, tmp_path, capsys):
  from jmmkv import bench

  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  monkeypatch.setattr(bench, "run", _no_run)
  out = tmp_path / "b.json"
  assert cli.main(["bench", "--preset", "tiny", "--compare-hf", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jmmkv: error: --compare-hf needs PyTorch (torch==2.13.0)")
  assert "pip install -e '.[test]'" in err and len(err.strip().splitlines()) == 1
  assert not out.exists()


@pytest.mark.parametrize("where", ["dir", "under_file"])
def test_bench_out_is_checked_before_any_run(monkeypatch, tmp_path, capsys, where):
  from jmmkv import bench

  monkeypatch.setattr(bench, "run", _no_run)
  (tmp_path / "file").write_text("x")
  out = {"dir": tmp_path, "under_file": tmp_path / "file" / "b.json"}[where]
  assert cli.main(["bench", "--preset", "tiny", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  want = "is a directory" if where == "dir" else f"{tmp_path / 'file'} is not a directory"
  assert err.startswith("jmmkv: error:") and want in err and len(err.strip().splitlines()) == 1


def test_bench_out_folder_is_created(tmp_path, capsys):
  out = tmp_path / "new" / "dir" / "b.json"
  # The length and new tokens of test_bench_smoke_writes_json: its Full run compiled this one's code.
  argv = ["bench", "--preset", "tiny", "--lengths", "128", "--policies", "full"]
  assert cli.main(argv + ["--repeats", "1", "--max-new-tokens", "3", "--out", str(out)]) == 0
  assert out.is_file()


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--out", "DIR"], "--out DIR is a directory"),
    (["--plot", "DIR"], "--plot DIR is a directory"),
    (["--out", "FILE/r.json"], "cannot write --out FILE/r.json"),
    (["--plot", "FILE/r.png"], "cannot write --plot FILE/r.png"),
  ],
)
def test_eval_synthetic_outputs_are_checked_before_loading(
  monkeypatch, tmp_path, capsys, flags, message
):
  from jmmkv.synthetic import demo

  monkeypatch.setattr(demo, "load_bundled", _no_run)
  (tmp_path / "f").write_text("x")
  names = {"DIR": str(tmp_path), "FILE": str(tmp_path / "f")}
  flags = [flags[0], flags[1].replace("DIR", names["DIR"]).replace("FILE", names["FILE"])]
  assert cli.main(["eval", "synthetic", *flags]) == 2
  err = capsys.readouterr().err
  message = message.replace("DIR", names["DIR"]).replace("FILE", names["FILE"])
  assert err.startswith("jmmkv: error:") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("preset", [[], ["--preset", "tiny"]])
def test_demo_rejects_negative_seeds(capsys, preset):
  assert cli.main(["demo", "--seed", "-1", *preset]) == 2
  assert capsys.readouterr().err.strip() == "jmmkv: error: --seed must be >= 0, got -1"


def _dtype_choices(parser) -> dict:
  """``--dtype`` choices of every (sub-)command, by command path."""
  out = {}

  def walk(p, path):
    for action in p._actions:
      if action.dest == "dtype":
        out[path] = action.choices
      if isinstance(action, argparse._SubParsersAction):
        for name, sub in action.choices.items():
          walk(sub, f"{path} {name}".strip())

  walk(parser, "")
  return out


def test_every_dtype_option_takes_both_spellings(capsys):
  choices = _dtype_choices(cli.build_parser())
  commands = {
    "demo",
    "convert",
    "generate",
    "bench",
    "eval milebench",
    "eval synthetic",
    "eval ruler",
  }
  assert set(choices) == commands
  for command, got in choices.items():
    assert set(got) == {"float32", "fp32", "bfloat16", "bf16"}, command
  argv = ["demo", "--preset", "tiny", "--policies", "full", "--dtype", "bf16"]
  assert cli.main(argv + ["--prompt-len", "8", "--max-new-tokens", "2"]) == 0
  assert capsys.readouterr().out.splitlines()[0].endswith("), bfloat16")


def test_version_is_the_package_version():
  import jmmkv

  out = subprocess.run(
    [sys.executable, "-m", "jmmkv.cli", "--version"], capture_output=True, text=True
  )
  assert out.returncode == 0 and out.stdout.strip() == f"jmmkv {jmmkv.__version__}"


def test_import_prints_nothing_and_hides_only_transformers_torch_advice():
  code = (
    "import jmmkv\n"
    "from transformers.utils import logging\n"
    "log = logging.get_logger('transformers')\n"
    "log.warning_advice('PyTorch was not found. Models won\\'t be available.')\n"
    "log.warning('another transformers warning')\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout == ""
  assert out.stderr.strip() == "[transformers] another transformers warning"


@pytest.mark.parametrize(
  "flag, value, message",
  [
    ("--lengths", "abc", "--lengths must be comma-separated integers, got 'abc'"),
    ("--lengths", "64,0", "--lengths must be >= 1, got 0"),
    ("--lengths", "64.5", "--lengths must be comma-separated integers, got '64.5'"),
    ("--budgets", "0.2,x", "--budgets must be comma-separated numbers, got '0.2,x'"),
  ],
)
def test_bench_number_lists_are_checked_before_any_run(
  monkeypatch, tmp_path, capsys, flag, value, message
):
  from jmmkv import bench

  monkeypatch.setattr(bench, "run", _no_run)
  assert (
    cli.main(["bench", "--preset", "tiny", flag, value, "--out", str(tmp_path / "b.json")]) == 2
  )
  assert capsys.readouterr().err.strip() == f"jmmkv: error: {message}"


def _interrupt(*args, **kwargs):
  raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["bench", "eval synthetic"])
def test_ctrl_c_is_one_line_and_leaves_nothing_behind(monkeypatch, tmp_path, capsys, command):
  from jmmkv import bench
  from jmmkv.eval import synthetic

  monkeypatch.setattr(bench, "run", _interrupt)
  monkeypatch.setattr(synthetic, "evaluate_grid", _interrupt)
  out = tmp_path / "new" / "r.json"
  argv = command.split() + ["--policies", "full", "--out", str(out)]
  argv += ["--preset", "tiny", "--lengths", "64"] if command == "bench" else ["--n", "1"]
  assert cli.main(argv) == 130
  assert capsys.readouterr().err.strip().splitlines()[-1] == "jmmkv: interrupted"
  assert list(tmp_path.iterdir()) == []  # not even the folder --out would go in


def test_eval_synthetic_writes_no_plot_unless_asked(monkeypatch, tmp_path, capsys):
  """The base install has no matplotlib: the defaults must not need it; --plot says so up front."""
  import importlib.util

  from jmmkv.synthetic import demo

  assert cli.build_parser().parse_args(["eval", "synthetic"]).plot == ""
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a)
  )
  monkeypatch.setattr(demo, "load_bundled", _no_run)
  argv = ["eval", "synthetic", "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
  assert cli.main(argv) == 2
  assert capsys.readouterr().err.strip() == (
    "jmmkv: error: --plot needs matplotlib: pip install -e '.[plot]' (or leave --plot out)"
  )
