"""`fold_answer`: an answer's K/V join the prefix exactly as transformers computes the K/V of the
prompt and answer together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jmmkv
from hf_models import answer_window_mask, random_ids
from jmmkv.cache.fold import fold_answer
from jmmkv.typing import TEXT

NEW = 8


@torch.no_grad()
def _hf_kv(torch_model, prompt, answer, window):
  """Per layer (keys, values) ``[K, T, H]`` of transformers' forward over prompt + answer (after
  RoPE), answer token i seeing the prompt and answer tokens ``i - window + 1 .. i`` (a 4D mask;
  every token with ``window=None``), as they were decoded."""
  ids = prompt + answer
  mask = answer_window_mask(len(prompt), len(ids), window)
  out = torch_model(input_ids=torch.tensor([ids]), attention_mask=mask, use_cache=True)
  return [(layer.keys[0].numpy(), layer.values[0].numpy()) for layer in out.past_key_values.layers]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("window", [None, 3])
def test_folded_answer_equals_a_forward_over_prompt_and_answer(
  tiny_model, jmmkv_model, seed, window
):
  model = jmmkv_model("llama_gqa", 0)
  rng = np.random.default_rng(40 + seed)
  prompts = [[1] + random_ids(rng, n - 1) for n in (13, 6)]
  out = jmmkv.generate(
    model,
    model.prepare(input_ids=prompts),
    max_new_tokens=NEW,
    eos_token_id=[],
    return_cache=True,
    decode_window=window,
  )
  answered = [NEW, 5]  # row 1 as if it had stopped at its fifth token (EOS)
  cache = fold_answer(out.cache, answered)
  fed = [min(a, NEW - 1) for a in answered]  # the last sampled token was never fed back
  first = 0 if window is None else NEW - 1 - window  # what the ring still held
  np.testing.assert_array_equal(np.asarray(cache.lengths), [13 + fed[0], 6 + fed[1]])
  np.testing.assert_array_equal(np.asarray(cache.rope_start), [13 + fed[0], 6 + fed[1]])
  assert int(cache.index) == 0 and cache.capacity % 32 == 0
  torch_model = tiny_model("llama_gqa", 0).torch_model
  for b, prompt in enumerate(prompts):
    n = len(prompt)
    want_pos = list(range(n)) + list(range(n + first, n + fed[b]))
    ref = _hf_kv(torch_model, prompt, out.tokens[b][: fed[b]], window)
    for l, (k_ref, v_ref) in enumerate(ref):
      pos = np.asarray(cache.layer_positions[l][b])  # [K, C]
      for kh in range(pos.shape[0]):
        live = pos[kh] >= 0
        assert pos[kh][live].tolist() == want_pos
        assert (np.asarray(cache.layer_modality[l][b, kh])[live] == TEXT).all()
        k = np.asarray(cache.layer_k[l][b, kh])[live]
        v = np.asarray(cache.layer_v[l][b, kh])[live]
        np.testing.assert_allclose(k, k_ref[kh, want_pos], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v, v_ref[kh, want_pos], rtol=1e-5, atol=1e-5)


def test_bad_input_is_one_line_errors(jmmkv_model):
  model = jmmkv_model("llama_gqa", 0)
  batch = model.prepare(input_ids=[[1, 5, 9], [1, 7]])
  kw = dict(max_new_tokens=3, return_cache=True)
  cache = jmmkv.generate(model, batch, **kw).cache
  for bad in ([3], [3, -1], [[1, 2], [3, 4]]):
    with pytest.raises(ValueError, match="answered_B must be 2 non-negative answer lengths"):
      fold_answer(cache, bad)
  paged = jmmkv.generate(model, batch, layout="paged", **kw).cache
  with pytest.raises(TypeError, match="fold_answer takes a dense KVCache"):
    fold_answer(paged, [3, 3])
