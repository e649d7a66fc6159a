"""Greedy jmmkv.generate with images (and videos) is token-identical to transformers' generate.

HF generates from left-padded batches (its generate derives positions from the mask; Qwen adds
its M-RoPE deltas after the prompt, so decoding steps exercise positions after images). jmmkv
gets the same HF arrays through model.prepare: padded ids + mask, or unpadded rows.
"""

from __future__ import annotations

import numpy as np
import pytest

from mm_models import FAMILIES, QWEN, hf_mm_greedy_generate, make_case

SEEDS = (0, 1)
MAX_NEW = 16
MIN_MARGIN = 1e-4  # a top-2 logit gap below this makes greedy parity fragile in fp32
CASES = {  # per family kind: batch of one (unpadded rows) and batch of two (left-padded)
  "llava": {
    "one": dict(rows=[[3, "image", 5, "image", 2]], images=2),
    "two": dict(rows=[[2, "image", 6], [4, "image", 3, "image", 9]], images=3),
  },
  "llava_next": {
    "one": dict(rows=[[3, "image", 4]], images=[(40, 64)]),
    "two": dict(
      rows=[[2, "image", 6], [4, "image", 3, "image", 9]], images=[(64, 64), (32, 32), (40, 64)]
    ),
  },
  "qwen": {
    "one": dict(
      rows=[[3, "image", 4, "video", 3]], images=[(1, 4, 6)], videos=[(2, 4, 4)], sec=[0.37]
    ),
    "two": dict(
      rows=[[2, "image", 6, "video", 2], [4, "image", 3, "image", 9]],
      images=[(1, 4, 4), (1, 2, 2), (1, 4, 6)],
      videos=[(3, 4, 6)],
      sec=[0.5],
    ),
  },
}


@pytest.fixture(scope="module")
def models(mm_model):
  """(family, seed) -> (HF model, jmmkv model, saved dir), shared by the session."""
  return mm_model


@pytest.mark.parametrize("size", ["one", "two"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf(family, seed, size, models):
  import jmmkv

  hf, model, _ = models(family, seed)
  spec = CASES["qwen" if family in QWEN else family][size]
  rng = np.random.default_rng(300 + 10 * seed + len(spec["rows"]))
  case = make_case(
    hf,
    family,
    rng,
    spec["rows"],
    spec.get("images", ()),
    spec.get("videos", ()),
    side="left",
    second_per_grid_ts=spec.get("sec") if family == "qwen2_5_vl" else None,
  )
  want, margins = hf_mm_greedy_generate(hf, case.ids, case.mask, MAX_NEW, **case.generate_inputs())
  low = min(min(m) for m in margins)
  assert low > MIN_MARGIN, f"{family} seed={seed}: near tie in HF greedy ({low:.2g}); change seed"
  if size == "one":
    batch = model.prepare(input_ids=[list(r) for r in case.rows], **case.arrays)
  else:
    batch = model.prepare(input_ids=case.ids, attention_mask=case.mask, **case.arrays)
  out = jmmkv.generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=[])
  got = [[int(t) for t in row] for row in out.tokens]
  for b in range(len(case.rows)):
    assert got[b] == want[b], (
      f"{family} seed={seed} row {b} ({len(case.rows[b])} prompt tokens):\n"
      f" jmmkv {got[b]}\n HF    {want[b]}"
    )
