"""Decoding after a prompt that ends right after a long video (Qwen2.5-VL).

transformers v5 places text after a video max(h, w) / merge positions on, which can be below the
video's largest temporal position; generate() then continues from the last prompt position + 1,
not from the largest. This pins jmmkv's decode positions to that rule.
"""

import numpy as np
import pytest

import jmmkv
from mm_models import (
  VIDEO_ID,
  VISION_END_ID,
  VISION_START_ID,
  build_mm_model,
  hf_mm_greedy_generate,
  hf_rope_index,
  mm_token_type_ids,
  qwen_num_tokens,
  qwen_pixels,
  random_text,
)


@pytest.mark.parametrize("seed", [0, 1])
def test_generation_after_a_long_video_matches_hf(tmp_path, seed):
  hf = build_mm_model("qwen2_5_vl", seed)
  hf.save_pretrained(tmp_path)
  model = jmmkv.load(tmp_path)
  rng = np.random.default_rng(seed)
  grid = [[6, 2, 2]]  # 6 temporal patches, one merged patch each
  n = qwen_num_tokens(grid)[0]
  ids = np.array([random_text(rng, 4) + [VISION_START_ID] + [VIDEO_ID] * n + [VISION_END_ID]])
  mask = np.ones_like(ids)
  pixels, thw = qwen_pixels(rng, grid)
  arrays = dict(pixel_values_videos=pixels, video_grid_thw=thw, second_per_grid_ts=np.array([2.0]))
  pos, _ = hf_rope_index(hf, ids, mask, **arrays)
  assert pos[:, 0, -1].max() < pos[:, 0].max()  # the case this test is about
  # HF applies M-RoPE only when given mm_token_type_ids (its processor always returns them).
  want, margins = hf_mm_greedy_generate(
    hf, ids, mask, 8, mm_token_type_ids=mm_token_type_ids(ids), **arrays
  )
  assert min(min(m) for m in margins) > 1e-4
  out = jmmkv.generate(
    model, model.prepare(input_ids=ids, **arrays), max_new_tokens=8, eos_token_id=[]
  )
  assert out.tokens == want
