"""RULER-style tasks: the generators (lengths, needles, determinism), the scoring rule, and
`jmmkv eval ruler` end to end on a tiny random Llama with a byte-level tokenizer (one token per
byte, so any English text encodes), --resume and one-line errors included."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_models import make_config, randomize_
from jmmkv import cli
from jmmkv.eval import ruler, ruler_tasks as R, ruler_text

LENGTH = 2048  # bytes = tokens; variable tracking and common words need about 1.7k
NEW = 4


def byte_tokenizer() -> PreTrainedTokenizerFast:
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
  )


@pytest.fixture(scope="module")
def tok():
  return byte_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
  """A tiny random Llama (2 layers, vocab 1000) that reads 4k positions, with the tokenizer."""
  import torch

  cfg, cls = make_config("llama_gqa")
  cfg.max_position_embeddings = 4096
  torch.manual_seed(0)
  model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
  randomize_(model, 0)
  d = tmp_path_factory.mktemp("ruler_llama")
  model.save_pretrained(d)
  tok.save_pretrained(d)
  return d


def sample(tok, task, index=0, seed=0, length=LENGTH):
  return R.make_sample(task, R.Prompter(tok), length, index, seed=seed, max_new_tokens=NEW)


# ---------------------------------------------------------------- generators


def test_haystack_is_plain_english():
  sents = ruler_text.sentences()
  assert len(sents) > 900 and len(set(sents)) > 800
  for s in sents:
    assert not re.search(r"\d|\bVAR\b|\"", s) and s.endswith(".")
  assert len(ruler_text.vocabulary()) > 1000
  assert re.fullmatch(r"[0-9a-f]{8}", ruler_text.fingerprint())


@pytest.mark.parametrize("task", R.TASKS)
def test_prompt_fills_the_length(tok, task):
  s = sample(tok, task)
  budget = LENGTH - NEW
  slack = max(len(x) for x in ruler_text.sentences()) + 2  # one sentence (a byte per token)
  assert budget - slack <= len(s.ids) <= budget, len(s.ids)
  assert s.ids == tuple(tok(tok.decode(s.ids), add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", [t for t in R.TASKS if t.startswith("niah")])
def test_needles_are_in_the_prompt(tok, task):
  s = sample(tok, task)
  text = tok.decode(s.ids)
  needles = re.findall(r"One of the special magic (\w+) for ([\w-]+) is: ([\w-]+)\.", text)
  want = {"niah_single_number": 1, "niah_single_word": 1}.get(task, 4)
  assert len(needles) == want and len(s.depths) == want
  kind = "words" if task == "niah_single_word" else "numbers"
  assert all(k == kind for k, _, _ in needles)
  for a in s.answers:
    assert sum(v == a for _, _, v in needles) == 1
    assert text.count(a) == 1  # nowhere else in the prompt
  if kind == "numbers":
    assert all(re.fullmatch(r"\d{7}", a) for a in s.answers)
  keys = {k for _, k, _ in needles}
  asked = re.search(r"magic \w+ for (.+) mentioned in the provided text\?", text).group(1)
  n_answers = {"niah_multivalue": 4, "niah_multiquery": 4}.get(task, 1)
  assert len(s.answers) == n_answers and len(keys) == (1 if task == "niah_multivalue" else want)
  if task == "niah_multikey":  # three distractors with other keys, one asked for
    asked_value = next(v for _, k, v in needles if k == asked)
    assert s.answers == (asked_value,)
  assert text.endswith(f"the provided text {'is' if n_answers == 1 else 'are'}:")


def test_variable_chain_is_in_the_prompt(tok):
  s = sample(tok, "variable_tracking")
  text = tok.decode(s.ids)
  assert len(s.answers) == 5 and all(re.fullmatch(r"[A-Z]{5}", a) for a in s.answers)
  value = re.search(r"assigned the value (\d{5}) in", text).group(1)
  chain = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.", text)
  assert chain[0] == (s.answers[0], value) and len(chain) == 5
  assert [b for _, b in chain[1:]] == [f"VAR {a}" for a in s.answers[:-1]]
  assert text.endswith(f"are assigned the value {value}, they are: VAR")
  example = R.TaskSettings(vt_example=True)
  p = R.Prompter(tok)
  with_example = R.make_sample(
    "variable_tracking", p, LENGTH, 0, max_new_tokens=NEW, settings=example
  )
  text = tok.decode(with_example.ids)
  assert text.count("Memorize and track") == 2 and "= 12345." in text
  assert re.search(r"they are: VAR [A-Z]{3}, VAR [A-Z]{3}, VAR", text)


def test_common_words_are_the_most_common(tok):
  s = sample(tok, "common_words")
  text = tok.decode(s.ids)
  listing = text.split("\n")[-2]  # the asked list (the worked example comes first)
  counts = Counter(re.findall(r"\d+\. (\w+)", listing))
  assert len(s.answers) == 10 and {counts[a] for a in s.answers} == {6}  # 6 times below 4096
  assert max(c for w, c in counts.items() if w not in s.answers) == 1
  assert text.endswith("appear most often in the list are:")


def test_samples_are_deterministic(tok):
  for task in ("niah_multikey", "common_words", "variable_tracking"):
    a, b = sample(tok, task, 1), sample(tok, task, 1)
    assert a == b
    assert sample(tok, task, 1, seed=1).ids != a.ids and sample(tok, task, 2).ids != a.ids


def test_bad_task_and_short_length(tok):
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    sample(tok, "nope")
  with pytest.raises(ValueError, match="length 512 is too short for task variable_tracking"):
    sample(tok, "variable_tracking", length=512)


@pytest.mark.parametrize(
  "prediction, answers, want",
  [
    (" 4401381.", ("4401381",), 1.0),
    ("The number is 44013812", ("4401381",), 0.0),  # whole words only
    ("", ("4401381",), 0.0),
    (' "Step-Ordinary".', ("step-ordinary",), 1.0),
    (":\n1. 6578193\n2. 4659132\n3. 3321493", ("4659132", "6578193", "1", "9"), 0.75),
    (" QBS YSM XOMNK", ("XOMNK", "QSZYZ"), 0.5),
    (" 1. variable 2. list", ("able", "list"), 0.5),
  ],
)
def test_score(prediction, answers, want):
  assert R.score(prediction, answers) == want


def test_padded_batches():
  assert ruler.padded_batches([1, 2, 3, 4, 5], 2) == [([1, 2], 2), ([3, 4], 2), ([5, 5], 1)]
  assert ruler.padded_batches([1, 2, 3, 4, 5], 4) == [([1, 2, 3], 3), ([4, 5, 5], 2)]
  assert ruler.padded_batches([1], 10) == [([1], 1)]


# ---------------------------------------------------------------- the command


def test_command_writes_table_json_plot_and_resumes(model_dir, tmp_path, capsys, monkeypatch):
  out, png = tmp_path / "r.json", tmp_path / "r.png"
  argv = ["eval", "ruler", "--model", str(model_dir), "--lengths", str(LENGTH), "--n", "3"]
  argv += ["--batch", "2", "--policies", "snapkv:window=8", "--budgets", "0.25"]
  argv += ["--tasks", "niah_single_number,common_words", "--max-new-tokens", str(NEW)]
  argv += ["--out", str(out)]
  real, calls = ruler.run_task, []

  def stop_second(model, task_samples, jobs, *args):  # Ctrl-C during the second task
    calls.append((task_samples[0].task, list(jobs)))
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(model, task_samples, jobs, *args)

  monkeypatch.setattr(ruler, "run_task", stop_second)
  assert cli.main(argv) == 130
  partial = tmp_path / "r.json.partial.json"
  cells = json.loads(partial.read_text())["cells"]
  assert (
    not out.exists() and [list(c["tasks"]) for c in cells.values()] == [["niah_single_number"]] * 2
  )
  capsys.readouterr()
  assert cli.main(argv) == 2  # a leftover progress file is not overwritten
  assert "--resume" in capsys.readouterr().err
  assert cli.main(argv + ["--resume", "--plot", str(png)]) == 0
  spec = "snapkv:window=8"
  both = [("full", None), (spec, 0.25)]
  # one call per task with both jobs (one forward per batch); the second task resumed
  assert calls == [("niah_single_number", both), ("common_words", both), ("common_words", both)]
  assert not partial.exists() and png.stat().st_size > 1000
  table = capsys.readouterr().out
  assert "length 2048 (3 samples per task)" in table and "s_num" in table and "cwe" in table
  res = json.loads(out.read_text())
  assert [(r["policy"], r["budget"]) for r in res["rows"]] == [("full", None), (spec, 0.25)]
  full, quarter = res["rows"][0], res["rows"][1]
  assert full["kept_fraction"] == pytest.approx(1.0)
  assert 0.25 <= quarter["kept_fraction"] < 0.3  # ceil(r * T) per row, layer and head
  assert len(full["samples"]) == 6 and set(full["tasks"]) == {"niah_single_number", "common_words"}
  assert all(0 <= s["score"] <= 1 and s["prompt_tokens"] <= LENGTH - NEW for s in full["samples"])
  meta = res["meta"]
  assert meta["max_new_tokens"] == {"niah_single_number": NEW, "common_words": NEW}
  assert meta["haystack"] == ruler_text.fingerprint() and meta["versions"]["python"]


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--tasks", "niah_single_number,nope"], "unknown task 'nope'"),
    (["--budgets", "0.5,1.5"], "Budget ratio must be in (0, 1], got 1.5"),
    (["--budgets", "0"], "Budget ratio must be in (0, 1], got 0"),
    (["--policies", "snapkv,nope"], "unknown policy 'nope'"),
    (["--lengths", "2048,x"], "--lengths must be comma-separated integers"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--lengths", "512", "--tasks", "variable_tracking"], "length 512 is too short for task"),
  ],
)
def test_bad_arguments_are_one_line(model_dir, tmp_path, capsys, flags, message):
  argv = ["eval", "ruler", "--model", str(model_dir), "--out", str(tmp_path / "r.json"), *flags]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("jmmkv: error:") and message in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "r.json").exists()


def test_progress_of_other_settings_is_refused(tmp_path):
  path = tmp_path / "r.json.partial.json"
  path.write_text(json.dumps({"settings": {"n": 3, "seed": 0}, "cells": {}}))
  assert ruler.read_cells(path, {"n": 3, "seed": 0}) == {}
  with pytest.raises(ValueError, match="other settings: n was 3, now 4"):
    ruler.read_cells(path, {"n": 4, "seed": 0})
  path.write_text("{}")
  with pytest.raises(ValueError, match="is not a RULER progress file"):
    ruler.read_cells(path, {"n": 3})
