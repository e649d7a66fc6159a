"""``jmmkv demo`` (the bundled model) and ``jmmkv eval synthetic`` end to end, small."""

from __future__ import annotations

import json

from jmmkv import cli
from jmmkv.synthetic import tasks


def test_demo_answers_with_each_policy(capsys):
  assert cli.main(["demo", "--policies", "full,snapkv", "--images", "4", "--budget", "0.5"]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  rows = {ln.split()[0]: ln.split() for ln in lines if ln.split()[:1] in (["full"], ["snapkv"])}
  assert set(rows) == {"full", "snapkv"}
  for task in tasks.TASKS:
    assert task in out  # one sample (and one answer column) per task
  # kept fraction and KV MiB: Full keeps everything; SnapKV at 0.5 allocates less
  assert float(rows["full"][-3]) == 1.0 and float(rows["snapkv"][-3]) < 0.6
  assert float(rows["snapkv"][-2]) < float(rows["full"][-2])
  assert rows["full"].count("ok") + rows["full"].count("WRONG") == len(tasks.TASKS)
  assert "expected answer" in lines[1]  # the prompts' table says what the answer should be
  assert "ok / WRONG: the answer decoded from the compressed cache vs the expected one" in lines


def test_demo_snippets_end_on_whole_words_and_the_legend_explains_overruns():
  from jmmkv.synthetic.demo import legend, snippet

  text = "the cat sat on a mat what colour is the diamond ?"
  assert snippet(text, 80) == text
  assert snippet(text, 32) == "... what colour is the diamond ?"  # 32 characters
  assert snippet(text, 31) == "... colour is the diamond ?"  # "what" no longer fits
  rows = [
    dict(policy="meda", budget=0.2, kept_fraction=0.42),
    dict(policy="lookm:merge=none", budget=0.2, kept_fraction=0.31),
    dict(policy="snapkv", budget=0.2, kept_fraction=0.2),
    dict(policy="madakv", budget=0.2, kept_fraction=0.17),
  ]
  lines = legend(rows).splitlines()
  assert lines[2:] == [
    "meda kept 0.42 at a 0.20 budget: it keeps every text token by design, as its paper does "
    "(meda:keep_all_text=false holds the budget)",
    "lookm:merge=none kept 0.31 at a 0.20 budget: it keeps every text token by design, as its "
    "paper does (lookm:keep_all_text=false holds the budget)",
  ]


def test_demo_errors_are_one_line(capsys, tmp_path):
  assert cli.main(["demo", "--policies", "nope"]) == 2
  assert "unknown policy 'nope'" in capsys.readouterr().err
  assert cli.main(["demo", "--model", str(tmp_path)]) == 2
  assert "train it with scripts/train_tiny_llava.py" in capsys.readouterr().err
  assert cli.main(["demo", "--budget", "0"]) == 2
  assert "(0, 1]" in capsys.readouterr().err


def test_eval_synthetic_writes_table_json_and_plot(tmp_path, capsys):
  out, png = tmp_path / "r.json", tmp_path / "r.png"
  h2o = "h2o:recent_fraction=0.25"  # a spec with a setting, not only a name
  argv = ["eval", "synthetic", "--n", "2", "--images", "3", "--policies", f"full,{h2o}"]
  argv += ["--budgets", "1,0.3", "--out", str(out), "--plot", str(png)]
  assert cli.main(argv) == 0
  res = json.loads(out.read_text())
  got = [(r["policy"], r["budget"]) for r in res["rows"]]
  assert got == [("full", 1.0), (h2o, 1.0), (h2o, 0.3)]
  by = {(r["policy"], r["budget"]): r for r in res["rows"]}
  assert by[h2o, 1.0]["accuracy"] == by["full", 1.0]["accuracy"]  # 100%: nothing evicted
  assert by[h2o, 0.3]["kept_fraction"] < 0.4
  assert set(by["full", 1.0]["accuracy"]) == {*tasks.TASKS, "mean"}
  assert res["meta"]["n_per_task"] == 2 and res["meta"]["settings"]["n_images"] == 3
  assert res["meta"]["hyperparameters"][h2o]["recent_fraction"] == 0.25
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert h2o in capsys.readouterr().out


def test_eval_synthetic_second_turn_rows(tmp_path, capsys):
  out = tmp_path / "r.json"
  argv = ["eval", "synthetic", "--n", "2", "--images", "3", "--policies", "full,snapkv"]
  argv += ["--budgets", "0.3", "--second-turn", "--out", str(out)]
  assert cli.main(argv) == 0
  rows = json.loads(out.read_text())["rows"]
  got = [(r["policy"], r["budget"], r["turn"]) for r in rows]
  assert got == [("full", 1.0, 1), ("full", 1.0, 2), ("snapkv", 0.3, 1), ("snapkv", 0.3, 2)]
  assert rows[0]["accuracy"] == rows[1]["accuracy"]  # the full cache: the same forward
  assert rows[2]["kept_fraction"] < rows[3]["kept_fraction"]  # the question is kept whole
  assert " turn " in capsys.readouterr().out


def test_eval_synthetic_rejects_bad_arguments(capsys):
  assert cli.main(["eval", "synthetic", "--tasks", "nope"]) == 2
  assert "unknown task 'nope'" in capsys.readouterr().err
  assert cli.main(["eval", "synthetic", "--budgets", "0.2,2"]) == 2
  assert "(0, 1]" in capsys.readouterr().err
  assert cli.main(["eval", "synthetic", "--policies", "full,nope"]) == 2
  assert "unknown policy 'nope'" in capsys.readouterr().err
