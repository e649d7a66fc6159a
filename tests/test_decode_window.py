"""Long answers within budget: ``decode_window=W`` keeps the K/V of the last W generated tokens
only (the append buffer is a ring of W slots), so the cache stays at a fixed capacity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jmmkv
from hf_models import answer_window_mask, random_ids

MAX_NEW = 24
WINDOW = 6


def _prompts(seed: int, lengths) -> list[list[int]]:
  rng = np.random.default_rng(300 + seed)
  return [[1] + random_ids(rng, n - 1) for n in lengths]


@torch.no_grad()
def _windowed_hf_logits(torch_model, prompt, answer, window: int) -> np.ndarray:
  """Teacher-forced HF logits ``[len(answer), V]`` of the answer's steps: the query that feeds
  answer token i sees the whole prompt and answer tokens ``max(0, i - window + 1) .. i``."""
  n, ids = len(prompt), prompt + answer[:-1]
  mask = answer_window_mask(n, len(ids), window)
  out = torch_model(input_ids=torch.tensor([ids]), attention_mask=mask, use_cache=False)
  return out.logits[0, n - 1 :].float().numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_bounded_answer_follows_the_window_rule(tiny_model, jmmkv_model, seed):
  model = jmmkv_model("llama_gqa", 0)
  prompts = _prompts(seed, [13, 6])
  batch = model.prepare(input_ids=prompts)
  kw = dict(max_new_tokens=MAX_NEW, eos_token_id=[], output_scores=True, return_cache=True)
  free = jmmkv.generate(model, batch, **kw)
  bound = jmmkv.generate(model, batch, decode_window=WINDOW, **kw)
  # Until the bound acts (the step that feeds answer token WINDOW), the two runs are the same.
  np.testing.assert_allclose(
    bound.scores[:, : WINDOW + 1], free.scores[:, : WINDOW + 1], rtol=1e-5, atol=1e-5
  )
  assert [r[: WINDOW + 1] for r in bound.tokens] == [r[: WINDOW + 1] for r in free.tokens]
  # After it, every step equals transformers' forward with the window rule as a 4D mask.
  torch_model = tiny_model("llama_gqa", 0).torch_model
  for b, prompt in enumerate(prompts):
    want = _windowed_hf_logits(torch_model, prompt, bound.tokens[b], WINDOW)
    np.testing.assert_allclose(bound.scores[b], want, rtol=1e-4, atol=1e-4)
  assert free.tokens != bound.tokens  # the window changed the answer (the check can fail)
  # Fixed capacity: W append slots whatever max_new_tokens.
  assert bound.cache.append_k.shape[3] == WINDOW
  assert bound.cache.kv_bytes_used() <= bound.cache.kv_bytes_allocated()
  assert bound.stats["kv_bytes_allocated"] < free.stats["kv_bytes_allocated"]


@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_bounded_answer_with_a_policy(jmmkv_model, layout):
  model = jmmkv_model("llama_gqa", 0)
  batch = model.prepare(input_ids=_prompts(2, [40, 23]))
  policy, budget = jmmkv.policies.get("snapkv", window=4), jmmkv.Budget(ratio=0.3)
  kw = dict(max_new_tokens=MAX_NEW, eos_token_id=[], output_scores=True, layout=layout)
  free = jmmkv.generate(model, batch, policy, budget, **kw)
  bound = jmmkv.generate(model, batch, policy, budget, decode_window=WINDOW, **kw)
  np.testing.assert_allclose(
    bound.scores[:, : WINDOW + 1], free.scores[:, : WINDOW + 1], rtol=1e-5, atol=1e-5
  )
  assert not np.allclose(bound.scores[:, WINDOW + 1 :], free.scores[:, WINDOW + 1 :], atol=1e-4)
  assert bound.stats["kept_fraction"] == free.stats["kept_fraction"]
  assert bound.stats["kv_bytes_allocated"] < free.stats["kv_bytes_allocated"]


def test_a_window_at_least_the_answer_changes_nothing(jmmkv_model):
  model = jmmkv_model("llama_gqa", 0)
  batch = model.prepare(input_ids=_prompts(3, [9, 17]))
  kw = dict(max_new_tokens=8, eos_token_id=[], output_scores=True, return_cache=True)
  free = jmmkv.generate(model, batch, **kw)
  bound = jmmkv.generate(model, batch, decode_window=7, **kw)
  np.testing.assert_array_equal(bound.scores, free.scores)
  assert bound.cache.append_k.shape == free.cache.append_k.shape


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
def test_bad_windows_are_one_line_errors(jmmkv_model, bad):
  model = jmmkv_model("llama_gqa", 0)
  with pytest.raises((ValueError, TypeError), match="decode_window must be a positive integer"):
    jmmkv.generate(model, model.prepare(input_ids=_prompts(0, [5])), decode_window=bad)
