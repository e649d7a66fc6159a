"""A conversation's next turn prefilled against the cache (`jmmkv.turns`): with Full, every
step's logits equal transformers' forward over all the turns at once (M-RoPE included)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import jmmkv
from hf_models import random_ids
from jmmkv.cache.fold import fold_answer
from jmmkv.kernels import flash_attention
from mm_models import (
  LLAVA_TOKENS,
  build_row,
  hf_mm_logits,
  hf_rope_index,
  llava_pixels,
  mm_token_type_ids,
  qwen_num_tokens,
  qwen_pixels,
)

NEW1, NEW2 = 5, 4
ANSWERED = (NEW1, 3)  # row 1 as if it had stopped at its third token (EOS)
TOL = dict(rtol=1e-5, atol=1e-5)


def _two_turns(model, turn1, arrays1, turn2, arrays2):
  """Turn 1 (``NEW1`` tokens, row answers folded in at `ANSWERED`), then turn 2 against the
  cache (``NEW2`` tokens with their logits). Returns (answers 1, turn-2 rows as fed, output 2)."""
  out1 = jmmkv.generate(
    model,
    model.prepare(input_ids=turn1, **arrays1),
    max_new_tokens=NEW1,
    eos_token_id=[],
    return_cache=True,
    layout="dense",
  )
  cache = fold_answer(out1.cache, ANSWERED)
  fed = [min(a, NEW1 - 1) for a in ANSWERED]  # the last sampled token was never fed back
  answers = [out1.tokens[b][: ANSWERED[b]] for b in range(2)]
  fed2 = [answers[b][fed[b] :] + turn2[b] for b in range(2)]  # the unfed token starts turn 2
  out2 = jmmkv.generate(
    model,
    model.prepare(input_ids=fed2, **arrays2),
    max_new_tokens=NEW2,
    eos_token_id=[],
    cache=cache,
    output_scores=True,
    return_cache=True,
  )
  return answers, out2


def _check_logits(got_MV, want_TV, start: int, what: str):
  """Step m's logits against the reference's at token ``start + m``."""
  want = want_TV[start : start + NEW2]
  np.testing.assert_allclose(got_MV, want, **TOL, err_msg=what)


@pytest.mark.parametrize("seed", [0, 1])
def test_llama_second_turn_equals_one_forward_over_both(tiny_model, jmmkv_model, seed):
  model = jmmkv_model("llama_gqa", 0)
  torch_model = tiny_model("llama_gqa", 0).torch_model
  rng = np.random.default_rng(70 + seed)
  turn1 = [[1] + random_ids(rng, n - 1) for n in (13, 6)]
  turn2 = [random_ids(rng, n) for n in (7, 11)]
  answers, out2 = _two_turns(model, turn1, {}, turn2, {})
  for b in range(2):
    before = turn1[b] + answers[b] + turn2[b]
    ids = before + out2.tokens[b][:-1]
    with torch.no_grad():
      want = torch_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    _check_logits(out2.scores[b], want, len(before) - 1, f"row {b}")
    assert int(out2.cache.lengths[b]) == len(before)
  assert out2.stats["prompt_tokens"] == sum(
    len(t1) + len(a) + len(t2) for t1, a, t2 in zip(turn1, answers, turn2)
  )


def _media(family, rng):
  """Three images A, B (turn 1: rows 0, 1) and C (turn 2: row 0): (per image arrays, tokens)."""
  if family == "llava":
    pix = llava_pixels(rng, 3)
    return [dict(pixel_values=pix[i : i + 1]) for i in range(3)], [LLAVA_TOKENS] * 3
  grids = [(1, 4, 4), (1, 2, 2), (1, 4, 6)]
  out = []
  for g in grids:
    pix, thw = qwen_pixels(rng, [g])
    out.append(dict(pixel_values=pix, image_grid_thw=thw))
  return out, qwen_num_tokens(grids)


def _joined(*arrays):
  return {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}


def test_llama_second_turn_through_the_kernels(tiny_model, jmmkv_model, monkeypatch):
  """The kernels TPU/GPU run (interpret mode): the second turn's attention after the cache goes
  through the flash kernel with an offset, and the logits still equal transformers'."""
  model = jmmkv_model("llama_gqa", 0)
  torch_model = tiny_model("llama_gqa", 0).torch_model
  offsets = []
  kernel = flash_attention.causal_attention_pallas

  def counted(*args, **kwargs):
    offsets.append(kwargs.get("offset", 0))
    return kernel(*args, **kwargs)

  monkeypatch.setattr(flash_attention, "causal_attention_pallas", counted)
  monkeypatch.setenv("JMMKV_KERNELS", "interpret")
  jax.clear_caches()  # jitted steps traced in reference mode would be reused otherwise
  try:
    rng = np.random.default_rng(72)
    turn1 = [[1] + random_ids(rng, n - 1) for n in (13, 6)]
    turn2 = [random_ids(rng, n) for n in (7, 11)]
    answers, out2 = _two_turns(model, turn1, {}, turn2, {})
  finally:
    jax.clear_caches()  # nor may later tests reuse these
  assert 0 in offsets and any(o > 0 for o in offsets), offsets
  for b in range(2):
    before = turn1[b] + answers[b] + turn2[b]
    with torch.no_grad():
      want = torch_model(input_ids=torch.tensor([before + out2.tokens[b][:-1]])).logits[0]
    _check_logits(out2.scores[b], want.numpy(), len(before) - 1, f"row {b}")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_multimodal_second_turn_with_an_image_equals_one_forward(mm_model, family):
  hf, model, _ = mm_model(family, 0)
  rng = np.random.default_rng(80)
  media, n = _media(family, rng)
  turn1 = [
    build_row(rng, [3, ("image", n[0]), 4], family)[0],
    build_row(rng, [6, ("image", n[1]), 2], family)[0],
  ]
  turn2 = [
    build_row(rng, [3, ("image", n[2]), 2], family)[0][1:],  # no BOS
    build_row(rng, [5], family)[0][1:],
  ]
  answers, out2 = _two_turns(model, turn1, _joined(media[0], media[1]), turn2, media[2])
  for b, row_media in enumerate([_joined(media[0], media[2]), media[1]]):
    before = turn1[b] + answers[b] + turn2[b]
    ids = np.array([before + out2.tokens[b][:-1]])
    extra = {}
    if family == "qwen2_vl":
      extra["mm_token_type_ids"] = mm_token_type_ids(ids)
      pos, _ = hf_rope_index(hf, ids, np.ones_like(ids), **row_media)
      # the first answer token's M-RoPE position on each axis: where decoding continued from
      np.testing.assert_array_equal(np.asarray(out2.cache.rope_start)[:, b], pos[:, 0, len(before)])
    want = hf_mm_logits(hf, ids, np.ones_like(ids), **row_media, **extra)[0]
    _check_logits(out2.scores[b], want, len(before) - 1, f"{family} row {b}")
