"""The bundled model (jmmkv/synthetic/model): small enough to ship, loads in jmmkv and in
transformers, both give the same greedy replies, and it answers the held-out tasks at full cache.
"""

from __future__ import annotations

import json

import pytest

from jmmkv.synthetic import MODEL_DIR, evaluate, tasks

SHORT = tasks.TaskSettings(n_images=3, filler=3)


@pytest.fixture(scope="module")
def model():
  import jmmkv

  return jmmkv.load(MODEL_DIR)


def test_shipped_files_are_small_and_complete():
  names = {p.name for p in MODEL_DIR.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= names
  assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= 20 * 2**20


def test_transformers_gives_the_same_greedy_replies(model):
  import torch
  from transformers import AutoProcessor, LlavaForConditionalGeneration

  samples = tasks.heldout_all(2, SHORT)
  want = evaluate.predictions(
    model, samples, "full", None, batch_size=len(samples), max_new_tokens=3
  )
  hf = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR).eval()
  proc = AutoProcessor.from_pretrained(MODEL_DIR, backend="pil")
  got = []
  for s in samples:
    x = proc(text=[s.prompt], images=s.images, return_tensors="pt")
    with torch.no_grad():
      out = hf.generate(**x, max_new_tokens=4, do_sample=False)
    reply = proc.tokenizer.decode(out[0, x["input_ids"].shape[1] :])
    got.append(evaluate.reply_answer(reply, s.echo))
  assert got == want
  assert all(a == s.answer for a, s in zip(got, samples))


def test_answers_the_default_held_out_prompts(model):
  """The first 6 held-out samples per task at the default settings (16 images), full cache: the
  recorded held-out accuracy (training.json, 50 per task) is >= 0.9 on every task, and a fresh
  measurement gets at least 5 of 6 right per task."""
  meta = json.loads((MODEL_DIR / "training.json").read_text())
  recorded = meta["heldout"]["accuracy"]
  assert set(recorded) == set(tasks.TASKS) and min(recorded.values()) >= 0.9, recorded
  samples = tasks.heldout_all(6)
  acc = evaluate.accuracy(model, samples, "full", None, batch_size=len(samples))
  assert all(acc[t] >= 5 / 6 for t in tasks.TASKS), acc


def test_reply_answer_reads_the_word_after_the_echo():
  assert evaluate.reply_answer("star red </s>", "star") == "red"
  assert evaluate.reply_answer("red star blue", "red star") == "blue"
  assert evaluate.reply_answer("red blue", "red star") == ""  # wrong echo: wrong
  assert evaluate.reply_answer("star", "star") == ""


def test_echo_is_what_the_question_asks_about():
  s = {x.task: x for x in tasks.heldout_all(1, SHORT)}
  assert s["image_needle"].prompt.endswith(f"what colour is the {s['image_needle'].echo} ?")
  assert s["text_needle"].prompt.endswith(f"what is the {s['text_needle'].echo} ?")
  assert s["temporal"].prompt.endswith(f"comes after the {s['temporal'].echo} ?")
  assert s["counting"].prompt.endswith(f"how many images are {s['counting'].echo} ?")


def test_a_second_turn_question_with_the_full_cache_gets_the_same_replies(model):
  """The question asked against the cache of the context alone (`jmmkv.turns`) is the same
  forward as the whole prompt at once: same answers. With SnapKV the context is compressed
  without the question (kept whole), so more of the prompt is kept."""
  samples = tasks.heldout_all(3, SHORT)
  first = evaluate.predictions(model, samples, "full", None, batch_size=len(samples))
  second = evaluate.predictions(
    model, samples, "full", None, batch_size=len(samples), second_turn=True
  )
  assert second == first and sum(a == s.answer for a, s in zip(first, samples)) >= 10
  _, kept1 = evaluate.run(model, samples, "snapkv", 0.3, len(samples))
  _, kept2 = evaluate.run(model, samples, "snapkv", 0.3, len(samples), second_turn=True)
  assert 0.25 < kept1 < kept2 < 0.45
