"""`jmmkv.Conversation`: turns over one cache equal one forward over the whole conversation;
follow-up prompts rendered by the chat template; bad caches are one-line errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from test_mm_prepare import _tokenizer

import jmmkv
from hf_models import random_ids
from jmmkv.models.processing import follow_up_text

NEW = 4


@pytest.mark.parametrize("seed", [0, 1])
def test_three_turns_equal_one_forward_over_the_conversation(tiny_model, jmmkv_model, seed):
  """Row answers stop at an EOS (row 1's, chosen from a dry run) or run out: both the EOS fed
  back and the unfed last token are carried right; turn 3's logits equal transformers'."""
  model = jmmkv_model("llama_gqa", 0)
  torch_model = tiny_model("llama_gqa", 0).torch_model
  rng = np.random.default_rng(90 + seed)
  turns = [
    [[1] + random_ids(rng, 12), [1] + random_ids(rng, 5)],
    [random_ids(rng, 7), random_ids(rng, 3)],
    [random_ids(rng, 4), random_ids(rng, 9)],
  ]
  dry = jmmkv.generate(
    model, model.prepare(input_ids=turns[0]), max_new_tokens=NEW, eos_token_id=[]
  )
  eos = dry.tokens[1][1]  # row 1 stops at its second token in turn 1
  chat = jmmkv.Conversation(model, max_new_tokens=NEW, eos_token_id=[eos], output_scores=True)
  outs = [chat.ask(input_ids=t) for t in turns]
  assert outs[0].tokens[1] == dry.tokens[1][:2]
  for b in range(2):
    before = []
    for t, out in zip(turns[:-1], outs[:-1]):
      before += t[b] + out.tokens[b]
    before += turns[-1][b]
    ids = before + outs[-1].tokens[b][:-1]
    with torch.no_grad():
      want = torch_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = outs[-1].scores[b][: len(outs[-1].tokens[b])]
    np.testing.assert_allclose(got, want[len(before) - 1 :][: len(got)], rtol=1e-5, atol=1e-5)
    assert chat.context_tokens[b] == len(before) + len(outs[-1].tokens[b]) - (
      len(outs[-1].tokens[b]) == NEW  # the last token, never fed back
    )
  assert outs[-1].stats["kept_fraction"] == 1.0


CHAT = (
  "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
  "{% if add_generation_prompt %}<s> assistant :{% endif %}"
)


def test_follow_up_text_is_what_the_template_puts_after_an_answer():
  tok = _tokenizer({999: "<image>"})
  tok.chat_template = CHAT
  assert (
    follow_up_text(tok, "w3 <image> w4", "</s>") == "<s> user : w3 <image> w4 </s><s> assistant :"
  )
  assert follow_up_text(tok, "w3", None) == " </s><s> user : w3 </s><s> assistant :"
  tok.chat_template = None
  assert follow_up_text(tok, "w3 w4", "</s>") == "w3 w4"


def test_bad_caches_and_settings_are_one_line_errors(jmmkv_model):
  model = jmmkv_model("llama_gqa", 0)
  rng = np.random.default_rng(5)
  batch = model.prepare(input_ids=[[1] + random_ids(rng, 9), [1] + random_ids(rng, 4)])
  turn = model.prepare(input_ids=[random_ids(rng, 3), random_ids(rng, 2)])
  run = lambda **kw: jmmkv.generate(model, batch, max_new_tokens=3, return_cache=True, **kw).cache
  cases = [
    (dict(cache=run(layout="dense")), ValueError, "fold it in first"),
    (dict(cache=jmmkv.compress(model, batch), policy="snapkv"), ValueError, "needs a budget"),
    (dict(cache=run(policy="adakv", budget=0.3, layout="paged")), TypeError, "dense KVCache"),
  ]
  for kw, error, message in cases:
    with pytest.raises(error, match=message):
      jmmkv.generate(model, turn, max_new_tokens=2, **kw)
  one = model.prepare(input_ids=[random_ids(rng, 3)])
  with pytest.raises(ValueError, match="the cache has 2 rows, the new turn 1"):
    jmmkv.generate(model, one, cache=jmmkv.compress(model, batch))
  with pytest.raises(TypeError, match="sets cache, layout itself"):
    jmmkv.Conversation(model, layout="paged", cache=None)


def test_ten_turns_stay_within_the_budget_and_compile_nothing_after_the_second(jmmkv_model):
  """SnapKV with a fixed budget of 40 tokens per (layer, KV head): after every turn each
  (layer, row, head) holds at most 40 prompt slots plus its answer, in a 64-slot prefix; from
  the third turn on (same buckets) nothing is compiled, eager operations included."""
  model = jmmkv_model("llama_gqa", 0)
  rng = np.random.default_rng(11)
  chat = jmmkv.Conversation(
    model, "snapkv:window=8", jmmkv.Budget(tokens=40), max_new_tokens=4, eos_token_id=[]
  )
  compiled = []
  counting = [False]

  def count(name, secs, **kw):
    if counting[0] and name == "/jax/core/compile/backend_compile_duration":
      compiled.append(name)

  jax.monitoring.register_event_duration_secs_listener(count)
  context = chat.ask(input_ids=[[1] + random_ids(rng, 60), [1] + random_ids(rng, 45)]).stats
  assert context["prompt_tokens"] == 107
  try:
    for turn in range(2, 11):
      counting[0] = turn > 2
      out = chat.ask(input_ids=[random_ids(rng, 12), random_ids(rng, 9)])
      cache = chat.cache
      kept = np.stack([(np.asarray(p) >= 0).sum(-1) for p in cache.layer_positions])
      np.testing.assert_array_equal(kept, 40)  # the budget, exactly (SnapKV)
      assert cache.capacity == 64 and int(cache.index) == 3  # 3 answer tokens fed back
      assert out.stats["prompt_tokens"] == 107 + (turn - 1) * (21 + 2 * 4)
  finally:
    counting[0] = False
  assert compiled == [], f"{len(compiled)} compilations in turns 3-10"
