"""MileBench harness: loader, prompt builder, truncation and scores against hand-derived values,
and `jmmkv eval milebench` end to end on a tiny random LLaVA (one-line errors and --resume after
an interruption included)."""

from __future__ import annotations

import json
import shutil

import pytest
from mm_models import build_mm_model
from PIL import Image
from test_mm_prepare import _save_processor

import jmmkv
from jmmkv import cli
from jmmkv.eval import milebench, milebench_metrics as M, milebench_prompt as P
from jmmkv.eval.milebench_data import Sample, load_task, resolve_tasks
from milebench_fixtures import write_suite, write_task

# ---------------------------------------------------------------- scores (hand-derived values)

CHOICES = ["dog", "cat", "red fox", "bird"]  # labels A B C D


@pytest.mark.parametrize(
  "prediction, response, want",
  [
    ("B", "cat", 1),
    ("b", "cat", 1),
    ("(B)", "cat", 1),  # brackets become spaces -> "b" -> one label letter
    ("B. cat", "cat", 1),  # "b cat": label + choice
    ("cat", "cat", 1),  # the choice text
    ("  Cat  ", "cat", 1),
    ("I'd say: cat!", "cat", 1),  # choice found with spaces removed
    ("The answer is B", "cat", 0),  # every label letter in it: "AB"
    ("a dog or b cat", "cat", 0),  # "a dog" comes first
    ("horse", "cat", 0),
    ("", "cat", 0),  # empty reads as "C"
    ("", "red fox", 1),
    ("Red Fox", "red fox", 1),
    ("redfox", "red fox", 1),
    ("D", "Bird", 1),
  ],
)
def test_multiple_choice_matching(prediction, response, want):
  assert M.score_choice(prediction, response, CHOICES) == want


def test_multiple_choice_regex_quirk():
  # MileBench compares the match with the *escaped* choice: "3.5" never equals "3\.5".
  assert M.score_choice("3.5", "3.5", ["3.5", "4"]) == 0
  assert M.score_choice("A", "3.5", ["3.5", "4"]) == 1
  assert M.score_choice("4", "4", ["3.5", "4"]) == 1


@pytest.mark.parametrize(
  "text, want",
  [
    ("Hello, World!", "hello world"),
    ("1,000 apples.", "1000 apples"),
    ("x-ray", "x ray"),
    ("'quoted'", "quoted"),
    ("pi is 3.14", "pi is 3.14"),
    ("a\tb\nc", "a b c"),
  ],
)
def test_normalize(text, want):
  assert M.normalize(text) == want


def test_rouge_l():
  # LCS "the cat on mat" = 4 of 6 and 6 tokens: P = R = F = 2/3.
  assert M.score_rouge("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(2 / 3)
  # LCS 1: P = 1/3, R = 1/2, F = 2 PR / (P + R) = 0.4.
  assert M.score_rouge("w1 w2 w3", "w3 w1") == pytest.approx(0.4)
  assert M.score_rouge("W43 w44, w45", "w43 w44 w45") == 1.0
  assert M.score_rouge("", "w1") == 0.0 and M.score_rouge("!!!", "w1") == 0.0


def test_needle_and_contains():
  assert M.score_needle("The password is w42.", "w42") == 1
  assert M.score_needle("it is w42, I think", "w42") == 1
  assert M.score_needle("W42", "w42") == 1
  assert M.score_needle("w421", "w42") == 0
  assert M.score_contains("the blue skyline", "blue sky") == 1
  assert M.score_contains("blue", "blue sky") == 0


def test_scoring_rules():
  assert M.scoring("TextNeedleInAHaystack", "open-ended") == "needle"
  assert M.scoring("ImageNeedleInAHaystack", "multi-choice") == "needle"
  assert M.scoring("MMCoQA", "open-ended") == "contains"
  assert M.scoring("ALFRED", "open-ended") == "rouge"
  assert M.scoring("GPR1200", "multi-choice") == "choice"


def test_aggregate():
  records = [
    dict(task="ActionSequence", level="Few", score=1.0),
    dict(task="ActionSequence", level="Few", score=0.0),
    dict(task="ALFRED", level="Medium", score=0.5),
    dict(task="TextNeedleInAHaystack", level="Many", score=1.0),
    dict(task="StateChange", level="Many", score=0.0),
  ]
  rules = {
    "ActionSequence": "choice",
    "ALFRED": "rouge",
    "TextNeedleInAHaystack": "needle",
    "StateChange": "choice",
    "GPR1200": "choice",  # no samples: no score, counted nowhere
  }
  res = M.aggregate(records, rules)
  assert res["tasks"]["ActionSequence"]["score"] == 0.5
  assert res["tasks"]["ALFRED"]["metric"] == "rouge_l"
  assert res["tasks"]["GPR1200"] == {**res["tasks"]["GPR1200"], "score": None, "n": 0}
  assert {c: v["score"] for c, v in res["categories"].items()} == {"T": 0.25, "S": 0.5, "NH": 1.0}
  assert res["levels"] == {
    "Few": {"score": 0.5, "n": 2},
    "Medium": {"score": 0.5, "n": 1},
    "Many": {"score": 0.5, "n": 2},
  }
  assert res["overall"] == {"score": 0.5, "tasks": 4}


# ---------------------------------------------------------------- prompts and truncation


def _sample(context, n_images, choices=None):
  return Sample(
    0, "w1 w2", context, tuple(f"{k}.png" for k in range(n_images)), choices, "x", "Few"
  )


def test_prompt_places_images_and_choices():
  s = _sample("w3 {image#1} w4 {image#2} w5", 2, ("w7", "Image B: {image#3}"))
  instruction, context, order = P.build_prompt(s, "ActionSequence")
  assert P.join(instruction, context) == (
    "w1 w2\nw3 <image> w4 <image> w5\nChoice list: \nA. w7\nB. Image B: {image#3}\nYour answer is: "
  )
  assert order == [0, 1]  # {image#3} names no image: it stays text
  s = _sample("{table#2} w3 {image#1} {image#3}", 3, ("w7", "w8"))
  _, context, order = P.build_prompt(s, "GPR1200")
  assert context == "<image> w3 <image> <image>\nChoice list: \nw7\nw8\nYour answer is: "
  assert order == [1, 0, 2]
  _, context, order = P.build_prompt(_sample("a <image> {image#1}", 1), "ALFRED")
  assert context == "a < image > <image>" and order == [0]


def _words(text):
  return len(text.split())


def _tail(text, n):
  return " ".join(text.split()[-n:]) if n else ""


@pytest.mark.parametrize(
  "max_len, body, kept",
  [
    # instruction 2 words; pieces 2, 3, 2 words; images 3 and 4 tokens: 14 in all.
    (16, "a b <image> c d e <image> f g", [0, 1]),
    (15, "<image> c d e <image> f g", [0, 1]),  # "a b" does not fit: starts with its image
    (13, " c d e <image> f g", [1]),  # image 0 does not fit
    (10, "<image> f g", [1]),
    (7, " f g", []),
    (3, "g", []),  # the question itself is cut: its last tokens
  ],
)
def test_truncation_drops_the_oldest_context(max_len, body, kept):
  got = P.truncate("i1 i2", "a b <image> c d e <image> f g", [3, 4], max_len, _words, _tail)
  assert got == ("i1 i2\n" + body, kept)


# ---------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_suite(tmp_path_factory.mktemp("milebench") / "data")


def test_loader_reads_milebench_json(data_dir):
  assert resolve_tasks(None, data_dir) == ["ActionSequence", "ALFRED", "TextNeedleInAHaystack"]
  assert resolve_tasks("alfred,T,NH", data_dir) == [
    "ALFRED",
    "ActionSequence",
    "TextNeedleInAHaystack",
  ]
  task = load_task(data_dir, "ActionSequence")
  assert task.question_type == "multi-choice" and task.category == "T"
  s = task.samples[1]
  assert (s.instruction, s.context, s.choices, s.response) == (
    "w110 w111",
    "w9 {image#1} w10",
    ("w30", "w31"),
    "w30",
  )
  assert s.images == ("1_0.png",) and (task.image_dir / s.images[0]).is_file()
  alfred = load_task(data_dir, "ALFRED", limit=5)
  assert [x.level for x in alfred.samples] == ["Medium", "Few"]  # 2nd: from its 1 image
  assert len(milebench.load_tasks(data_dir, "S,NH", limit=1)[0].samples) == 1


def test_loader_errors(data_dir, tmp_path):
  with pytest.raises(ValueError, match="unknown MileBench task 'Nope'"):
    resolve_tasks("ALFRED,Nope", data_dir)
  with pytest.raises(FileNotFoundError, match="GPR1200.json does not exist"):
    load_task(data_dir, "GPR1200")
  with pytest.raises(FileNotFoundError, match="no task of category IR"):
    resolve_tasks("IR", data_dir)
  bad = [("{image#1}", 1, ["w1", "w2"], "w3", "Few")]
  write_task(tmp_path, "ObjectShuffle", "multi-choice", ["w4"], bad)
  with pytest.raises(ValueError, match="not in its choice_list"):
    load_task(tmp_path, "ObjectShuffle")
  write_task(tmp_path, "TQA", "open-ended", ["w4"], [("{image#1}", 1, None, "w3", "Lots")])
  with pytest.raises(ValueError, match="image_quantity_level 'Lots'"):
    load_task(tmp_path, "TQA")


# ---------------------------------------------------------------- end to end (tiny LLaVA)

RUN = ["--policy", "snapkv", "--budget", "0.5", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llava_milebench")
  build_mm_model("llava", 3).save_pretrained(path)
  _save_processor("llava", path)
  return path


def _run(args, capsys):
  code = cli.main(["eval", "milebench"] + args)
  out = capsys.readouterr()
  return code, out.out, out.err


def _direct(model_dir, prompt, image_paths):
  """The answer of `jmmkv.generate` to a prompt built here by hand."""
  model = jmmkv.load(model_dir)
  images = [Image.open(p).convert("RGB") for p in image_paths]
  batch = model.prepare(prompts=[prompt], images=[images])
  policy, budget = jmmkv.policies.get("snapkv"), jmmkv.Budget(ratio=0.5)
  return jmmkv.generate(model, batch, policy, budget, max_new_tokens=4).texts[0].strip()


def test_end_to_end(llava_dir, data_dir, tmp_path, capsys):
  out_json = tmp_path / "sub" / "results.json"
  args = [
    "--model",
    str(llava_dir),
    "--data",
    str(data_dir),
    "--limit",
    "2",
    "--out",
    str(out_json),
  ]
  code, out, err = _run(args + RUN, capsys)
  assert code == 0, err
  assert "overall" in out and "ActionSequence" in out and "%|" in err  # table; tqdm on stderr
  assert [p.name for p in out_json.parent.iterdir()] == ["results.json"]  # no progress file left
  res = json.loads(out_json.read_text())
  meta = res["meta"]
  assert meta["policy"] == "snapkv" and meta["budget"] == 0.5 and meta["limit"] == 2
  assert meta["hyperparameters"] == {"window": 32, "kernel": 5, "pooling": "avg", "gqa": "mean"}
  assert meta["tasks"] == ["ActionSequence", "ALFRED", "TextNeedleInAHaystack"]
  assert meta["model"] == str(llava_dir) and meta["max_context_len"] == 512 - 4 - 5
  assert set(meta["versions"]) == {
    "python",
    "jmmkv",
    "jax",
    "jaxlib",
    "flax",
    "numpy",
    "transformers",
  }
  assert {k: v["n"] for k, v in res["tasks"].items()} == {
    "ActionSequence": 2,
    "ALFRED": 2,
    "TextNeedleInAHaystack": 1,
  }
  assert set(res["categories"]) == {"T", "S", "NH"}
  assert {lv: v["n"] for lv, v in res["levels"].items()} == {"Few": 3, "Medium": 1, "Many": 1}
  preds = res["predictions"]
  assert [p["images_kept"] for p in preds] == [2, 1, 2, 1, 2]  # nothing truncated
  for p in preds:  # scores by the rules, checked independently on these plain "wN" answers
    words = p["prediction"].lower().split()
    if p["task"] == "TextNeedleInAHaystack":
      assert p["score"] == float(p["response"] in words)
    if p["task"] == "ActionSequence" and not set(words) & {"a", "b", "c", "d"}:
      assert p["score"] == float(p["response"] in words)
  task = res["tasks"]["ActionSequence"]
  assert task["score"] == sum(p["score"] for p in preds[:2]) / 2
  # The first prompt, built by hand from MileBench's rules, gives the same answer.
  images = [data_dir / "ActionSequence" / "images" / f"0_{k}.png" for k in range(2)]
  prompt = "w100 w101 w102\n<image> w5 w6 <image> w7 w8\nChoice list: \nA. w20\nB. w21\nC. w22"
  prompt += "\nD. w23\nYour answer is: "
  assert preds[0]["prediction"] == _direct(llava_dir, prompt, images)


def test_end_to_end_truncation(llava_dir, data_dir, tmp_path, capsys):
  # 40 tokens: w62..w71 (10) + image 2 (16) + w54..w61 (8) + the instruction (2); image 1 is cut.
  args = ["--model", str(llava_dir), "--data", str(data_dir), "--tasks", "TextNeedleInAHaystack"]
  args += ["--max-context-len", "40", "--out", str(tmp_path / "r.json")]
  code, _, err = _run(args + RUN, capsys)
  assert code == 0, err
  (pred,) = json.loads((tmp_path / "r.json").read_text())["predictions"]
  assert (pred["images"], pred["images_kept"], pred["prompt_tokens"]) == (2, 1, 36 + 5)
  words = " ".join(f"w{i}" for i in range(54, 62)), " ".join(f"w{i}" for i in range(62, 72))
  prompt = f"w130 w131\n {words[0]} <image> {words[1]}"
  image = data_dir / "TextNeedleInAHaystack" / "images" / "0_1.png"
  assert pred["prediction"] == _direct(llava_dir, prompt, [image])


@pytest.mark.parametrize(
  "change, message",
  [
    ({"--data": "MISSING"}, "does not exist"),
    ({"--tasks": "ALFRED,Nope"}, "unknown MileBench task"),
    ({"--policy": "nope"}, "unknown policy"),
    ({"--budget": "1.5"}, "ratio"),
    ({"--budget": "0"}, "ratio"),
    ({"--policy": "h2o", "--budget": None}, "--budget is needed"),
    ({"--hp": "nope=1"}, "--hp nope=1: "),
    ({"--policy": "snapkv:nope=1"}, "'nope'"),
    ({"--policy": "nope:window=8"}, "unknown policy 'nope'"),
    ({"--out": "DATA"}, "is a directory"),
    ({"--limit": "0"}, "--limit must be >= 1"),
    ({"--tasks": "ALFRED", "--data": "NOIMAGE"}, "does not exist"),
  ],
)
def test_errors_before_loading_the_model(data_dir, tmp_path, capsys, change, message):
  broken = tmp_path / "data"  # ALFRED without one of its images
  shutil.copytree(data_dir / "ALFRED", broken / "ALFRED")
  (broken / "ALFRED" / "images" / "1_0.png").unlink()
  paths = {"MISSING": str(tmp_path / "none"), "NOIMAGE": str(broken), "DATA": str(data_dir)}
  opts = dict(zip(RUN[::2], RUN[1::2]))
  opts |= {"--model": str(tmp_path / "no_model"), "--data": str(data_dir)}  # no model: not read
  opts |= {k: paths.get(v, v) for k, v in change.items()}
  code, _, err = _run([x for k, v in opts.items() if v is not None for x in (k, v)], capsys)
  assert code == 2
  assert err.startswith("jmmkv: error:") and message in err and len(err.strip().splitlines()) == 1


def test_unreadable_image_is_one_line(llava_dir, data_dir, tmp_path, capsys):
  shutil.copytree(data_dir / "ALFRED", tmp_path / "ALFRED")
  (tmp_path / "ALFRED" / "images" / "0_1.png").write_text("not a png")
  args = ["--model", str(llava_dir), "--data", str(tmp_path), "--out", str(tmp_path / "r.json")]
  code, _, err = _run(args + RUN, capsys)
  last = err.strip().splitlines()[-1]  # after the progress bar
  assert code == 2 and last.startswith("jmmkv: error: cannot read image") and "0_1.png" in last
  assert not list(tmp_path.glob("r.json*"))  # no task finished: no results, no progress file


def test_policy_spec_settings_win_over_hp(llava_dir, data_dir, tmp_path, capsys):
  spec = "snapkv:window=8"
  args = ["--model", str(llava_dir), "--data", str(data_dir), "--tasks", "ALFRED", "--limit", "1"]
  args += ["--policy", spec, "--hp", "window=16", "--hp", "kernel=3", "--budget", "0.5"]
  code, _, err = _run(args + ["--max-new-tokens", "2", "--out", str(tmp_path / "r.json")], capsys)
  assert code == 0, err
  meta = json.loads((tmp_path / "r.json").read_text())["meta"]
  assert meta["policy"] == spec and meta["budget"] == 0.5
  assert meta["hyperparameters"] == {"window": 8, "kernel": 3, "pooling": "avg", "gqa": "mean"}


@pytest.mark.parametrize("hp", [["foo=1"], ["window=16", "foo=1"]])
def test_unknown_hp_names_the_hp(data_dir, tmp_path, capsys, hp):
  args = ["--model", str(tmp_path / "no_model"), "--data", str(data_dir), *RUN]
  code, _, err = _run(args + [x for item in hp for x in ("--hp", item)], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert err.startswith("jmmkv: error: --hp foo=1") and "'foo'" in err


# ---------------------------------------------------------------- --resume after an interruption


def _interrupt(monkeypatch, at: str | None, answered: list) -> None:
  """Answering a sample of task ``at`` raises KeyboardInterrupt (as Ctrl-C would); every sample
  answered is listed in ``answered`` by task."""
  answer = milebench._answer

  def answer_or_stop(model, prompter, task, *rest):
    if task.name == at:
      raise KeyboardInterrupt
    answered.append(task.name)
    return answer(model, prompter, task, *rest)

  monkeypatch.setattr(milebench, "_answer", answer_or_stop)


def _main(args) -> int:
  """`jmmkv.cli.main`'s exit code; 130 for a KeyboardInterrupt it lets through."""
  try:
    return cli.main(["eval", "milebench"] + args)
  except KeyboardInterrupt:
    return 130


@pytest.fixture(scope="module")
def interrupted(llava_dir, data_dir, tmp_path_factory):
  """A run of the three tasks (one sample each) stopped by Ctrl-C in its second task: (its
  arguments, its folder, the samples answered)."""
  folder = tmp_path_factory.mktemp("interrupted")
  args = ["--model", str(llava_dir), "--data", str(data_dir), "--limit", "1", *RUN]
  answered = []
  with pytest.MonkeyPatch.context() as mp:
    _interrupt(mp, "ALFRED", answered)
    code = _main(args + ["--out", str(folder / "r.json")])
  assert code == 130
  return args, folder, answered


RUN_SPECIFIC = ("date", "versions", "device", "seconds")


def _without_run_specifics(res: dict) -> dict:
  return res | {"meta": {k: v for k, v in res["meta"].items() if k not in RUN_SPECIFIC}}


def test_resume_after_an_interruption(interrupted, tmp_path, capsys, monkeypatch):
  args, folder, answered = interrupted
  assert answered == ["ActionSequence"]
  # Only the progress file is left: the first task's record, no --out, no temporary file.
  assert [p.name for p in folder.iterdir()] == ["r.json.partial.json"]
  saved = json.loads((folder / "r.json.partial.json").read_text())
  assert list(saved["tasks"]) == ["ActionSequence"]
  (first,) = saved["tasks"]["ActionSequence"]["predictions"]
  assert first["task"] == "ActionSequence" and first["sample_id"] == 0
  assert saved["settings"]["limit"] == 1 and saved["settings"]["policy"] == "snapkv"

  shutil.copytree(folder, tmp_path / "resumed")
  resumed = tmp_path / "resumed" / "r.json"
  answered = []
  _interrupt(monkeypatch, None, answered)
  code, _, err = _run(args + ["--out", str(resumed), "--resume"], capsys)
  assert code == 0, err
  assert answered == ["ALFRED", "TextNeedleInAHaystack"]  # the finished task is not redone
  assert [p.name for p in resumed.parent.iterdir()] == ["r.json"]  # the progress file is gone

  answered.clear()
  code, _, err = _run(args + ["--out", str(tmp_path / "whole.json")], capsys)
  assert code == 0, err
  assert answered == ["ActionSequence", "ALFRED", "TextNeedleInAHaystack"]
  got, want = json.loads(resumed.read_text()), json.loads((tmp_path / "whole.json").read_text())
  assert _without_run_specifics(got) == _without_run_specifics(want)
  assert got["predictions"][0] == first
  assert got["meta"]["seconds"] >= round(saved["tasks"]["ActionSequence"]["seconds"], 2)


def _no_load(*args, **kwargs):
  raise AssertionError("the model was loaded")


def test_progress_file_without_resume_is_refused(data_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(jmmkv, "load", _no_load)
  progress = tmp_path / "r.json.partial.json"
  progress.write_text('{"settings": {}, "tasks": {}}')
  args = ["--model", str(tmp_path / "no_model"), "--data", str(data_dir), *RUN]
  code, _, err = _run(args + ["--out", str(tmp_path / "r.json")], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert err.startswith(f"jmmkv: error: {progress} holds the progress") and "--resume" in err
  assert "delete" in err and progress.read_text() == '{"settings": {}, "tasks": {}}'


@pytest.mark.parametrize(
  "change, message",
  [
    (["--limit", "2"], "limit was 1, now 2"),
    (["--max-new-tokens", "3"], "max_new_tokens was 4, now 3"),
    (["--hp", "kernel=3"], "hyperparameters was {"),
  ],
)
def test_resume_with_other_settings_is_refused(
  interrupted, tmp_path, capsys, monkeypatch, change, message
):
  args, folder, _ = interrupted
  progress = tmp_path / "r.json.partial.json"
  shutil.copy(folder / progress.name, progress)
  before = progress.read_text()
  monkeypatch.setattr(jmmkv, "load", _no_load)  # refused before the model is loaded
  code, _, err = _run(args + change + ["--out", str(tmp_path / "r.json"), "--resume"], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert err.startswith(f"jmmkv: error: progress file {progress}") and message in err
  assert progress.read_text() == before and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
  "text, message",
  [('{"settings": {"policy": "snap', "is not valid JSON"), ("[1, 2]", "not a MileBench progress")],
)
def test_unreadable_progress_file_is_one_line(
  data_dir, tmp_path, capsys, monkeypatch, text, message
):
  monkeypatch.setattr(jmmkv, "load", _no_load)
  progress = tmp_path / "r.json.partial.json"
  progress.write_text(text)
  args = ["--model", str(tmp_path / "no_model"), "--data", str(data_dir), *RUN, "--resume"]
  code, _, err = _run(args + ["--out", str(tmp_path / "r.json")], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert err.startswith("jmmkv: error:") and str(progress) in err and message in err


def test_evaluate_resumes_with_its_default_settings(llava_dir, data_dir, tmp_path, monkeypatch):
  model = jmmkv.load(llava_dir)
  tasks = milebench.load_tasks(data_dir, "ALFRED", limit=1)
  snapkv, half = jmmkv.policies.get("snapkv"), jmmkv.Budget(ratio=0.5)
  partial = tmp_path / "p.json"
  kw = dict(max_new_tokens=2, progress=False, partial=partial)
  first = milebench.evaluate(model, tasks, snapkv, half, **kw)
  saved = json.loads(partial.read_text())
  assert saved["settings"]["samples"] == {"ALFRED": [0]}
  assert saved["settings"]["model"] == model.path and saved["settings"]["policy"] == "SnapKV"
  with pytest.raises(ValueError, match="progress of an interrupted run: pass resume=True"):
    milebench.evaluate(model, tasks, snapkv, half, **kw)
  with pytest.raises(ValueError, match=r"budget was \{'ratio': 0.5, 'tokens': None\}, now"):
    milebench.evaluate(model, tasks, snapkv, jmmkv.Budget(ratio=0.2), **kw, resume=True)
  two = milebench.load_tasks(data_dir, "ALFRED", limit=2)
  with pytest.raises(ValueError, match=r"samples was \{'ALFRED': \[0\]\}, now \{'ALFRED': \[0, 1"):
    milebench.evaluate(model, two, snapkv, half, **kw, resume=True)
  _interrupt(monkeypatch, "ALFRED", [])  # nothing is answered again
  again = milebench.evaluate(model, tasks, snapkv, half, **kw, resume=True)
  assert again == first and json.loads(partial.read_text()) == saved
