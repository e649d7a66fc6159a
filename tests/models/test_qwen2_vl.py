"""Qwen2-VL and Qwen2.5-VL (vision tower + merger, M-RoPE decoder) against transformers.

Tiny configs from tests/mm_models.py: 14 px patches, 2x2 merge, temporal patch 2; Qwen2.5-VL
with 56 px windows (2x2 merged tokens) in block 0 and full attention in block 1. Grids are
(t, h, w) in patches; an image or video has t*h*w/4 LLM tokens, wrapped in vision_start/end.
"""

from __future__ import annotations

import numpy as np
import pytest

from mm_models import (
  IMAGE_ID,
  QWEN,
  QWEN_FLAT,
  hf_image_features,
  hf_mm_logits,
  hf_rope_index,
  hf_video_features,
  make_case,
  max_diff_valid,
  mentions,
  mm_token_type_ids,
  modality_of,
  qwen_pixels,
)

SEEDS = (0, 1, 2)
FP32_ATOL = 1e-4
V = 1000
IMAGES = [(1, 4, 4), (1, 4, 6), (1, 2, 2)]  # 4 / 6 / 1 tokens
IMAGE_SETS = {"one": [(1, 4, 6)], "three": IMAGES, "windows": [(1, 6, 10), (1, 8, 4)]}
VIDEO_SETS = {"one": [(2, 4, 4)], "two": [(3, 4, 6), (2, 6, 4)], "long": [(5, 4, 4)]}
# Row specs: ints are random text runs; "image" / "video" the next image / video of the batch.
# Qwen2.5-VL layouts with videos also get second_per_grid_ts (one value per video).
LAYOUTS = {
  "one_image": dict(rows=[[3, "image", 6]], images=IMAGE_SETS["one"]),
  "three_images": dict(rows=[[2, "image", 4, "image", 3, "image", 5]], images=IMAGES),
  "video_only": dict(rows=[[3, "video", 5]], videos=VIDEO_SETS["one"], sec=[0.37]),
  # t=5 temporal steps > max(h, w) / merge = 2: HF v5 advances text positions by 2 only
  "long_video": dict(rows=[[2, "video", 4]], videos=VIDEO_SETS["long"]),
  "mixed": dict(
    rows=[[2, "image", 3, "video", 4, "image", 2, "video", 3]],
    images=[(1, 4, 4), (1, 2, 2)],
    videos=VIDEO_SETS["two"],
    sec=[0.37, 1.5],
  ),
  "batch_left": dict(
    rows=[[2, "image", 3, "image", 4], [5, "video", 2]],
    images=IMAGES[:2],
    videos=VIDEO_SETS["one"],
    sec=[0.5],
    side="left",
  ),
  "batch_right": dict(
    rows=[[4, "image", 9], ["video", 2, "image", 1]],
    images=[(1, 2, 2), (1, 4, 4)],
    videos=[(2, 6, 4)],
    sec=[2.0],
    side="right",
  ),
  "batch_text_row": dict(rows=[[2, "image", 3], [9]], images=[(1, 4, 6)], side="left"),
}


@pytest.fixture(scope="module")
def models(mm_model):
  """(family, seed) -> (HF model, jmmkv model, saved dir), shared by the session."""
  return mm_model


def _case(hf, family: str, seed: int, layout: str):
  spec = LAYOUTS[layout]
  rng = np.random.default_rng(100 * seed + sorted(LAYOUTS).index(layout))
  sec = spec.get("sec") if family == "qwen2_5_vl" else None
  return make_case(
    hf,
    family,
    rng,
    spec["rows"],
    spec.get("images", ()),
    spec.get("videos", ()),
    side=spec.get("side", "left"),
    second_per_grid_ts=sec,
  )


def _assert_features(got, want, what):
  assert len(got) == len(want), (what, len(got), len(want))
  for i, (g, w) in enumerate(zip(got, want)):
    assert np.asarray(g).shape == w.shape, (what, i, np.asarray(g).shape, w.shape)
    diff = float(np.max(np.abs(np.asarray(g) - w)))
    assert diff <= FP32_ATOL, f"{what} {i}: max |jmmkv - HF| = {diff:.3g}"


@pytest.mark.parametrize("grids", sorted(IMAGE_SETS))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", QWEN)
def test_image_features_match_hf(family, seed, grids, models):
  hf, model, _ = models(family, seed)
  pix, thw = qwen_pixels(np.random.default_rng(seed), IMAGE_SETS[grids])
  want = hf_image_features(hf, pix, image_grid_thw=thw)
  got = model.image_features(pix, image_grid_thw=thw)
  _assert_features(got, want, f"{family} seed={seed} {grids} image")


@pytest.mark.parametrize("grids", sorted(VIDEO_SETS))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", QWEN)
def test_video_features_match_hf(family, seed, grids, models):
  hf, model, _ = models(family, seed)
  pix, thw = qwen_pixels(np.random.default_rng(10 + seed), VIDEO_SETS[grids])
  want = hf_video_features(hf, pix, thw)
  got = model.video_features(pix, thw)
  _assert_features(got, want, f"{family} seed={seed} {grids} video")


@pytest.mark.parametrize("given_types", [True, False])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("family", QWEN)
def test_rope_index_equals_hf(family, layout, given_types, models):
  hf, model, _ = models(family, 0)
  case = _case(hf, family, 0, layout)
  kw = {k: case.arrays.get(k) for k in ("image_grid_thw", "video_grid_thw")}
  if family == "qwen2_5_vl":
    kw["second_per_grid_ts"] = case.arrays.get("second_per_grid_ts")
  want_pos, want_deltas = hf_rope_index(hf, case.ids, case.mask, **kw)
  types = mm_token_type_ids(case.ids) if given_types else None
  pos, deltas = model.rope_index(case.ids, mm_token_type_ids=types, attention_mask=case.mask, **kw)
  pos, deltas = np.asarray(pos), np.asarray(deltas)
  assert pos.shape == want_pos.shape and deltas.shape == want_deltas.shape
  valid = np.broadcast_to(case.mask.astype(bool), pos.shape)
  np.testing.assert_array_equal(pos[valid], want_pos[valid], err_msg=f"{family} {layout}")
  np.testing.assert_array_equal(deltas, want_deltas, err_msg=f"{family} {layout}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", QWEN)
def test_logits_match_hf(family, seed, layout, models):
  hf, model, _ = models(family, seed)
  case = _case(hf, family, seed, layout)
  ref = hf_mm_logits(hf, case.ids, case.mask, **case.hf_inputs())
  got = np.asarray(model.logits(case.ids, attention_mask=case.mask, **case.arrays))
  assert got.shape == (*case.ids.shape, V) and got.dtype == np.float32, (got.shape, got.dtype)
  assert np.all(np.isfinite(got[case.mask.astype(bool)]))
  diff = max_diff_valid(got, ref, case.mask)
  assert diff <= FP32_ATOL, f"{family} seed={seed} {layout}: max |jmmkv - HF| = {diff:.3g}"


@pytest.mark.parametrize("family", QWEN)
def test_logits_with_explicit_types_and_positions(family, models):
  """mm_token_type_ids given explicitly, and HF's own M-RoPE ids passed as position_ids."""
  hf, model, _ = models(family, 1)
  case = _case(hf, family, 1, "batch_left")
  ref = hf_mm_logits(hf, case.ids, case.mask, **case.hf_inputs())
  types = mm_token_type_ids(case.ids)
  got = np.asarray(
    model.logits(case.ids, attention_mask=case.mask, mm_token_type_ids=types, **case.arrays)
  )
  assert max_diff_valid(got, ref, case.mask) <= FP32_ATOL
  kw = {k: case.arrays.get(k) for k in ("image_grid_thw", "video_grid_thw")}
  if family == "qwen2_5_vl":
    kw["second_per_grid_ts"] = case.arrays.get("second_per_grid_ts")
  pos, _ = hf_rope_index(hf, case.ids, case.mask, **kw)
  got = np.asarray(
    model.logits(case.ids, attention_mask=case.mask, position_ids=pos, **case.arrays)
  )
  assert max_diff_valid(got, ref, case.mask) <= FP32_ATOL


@pytest.mark.parametrize("layout", ["batch_left", "mixed"])
@pytest.mark.parametrize("family", QWEN)
def test_prepare_modality_and_media_index(family, layout, models):
  hf, model, _ = models(family, 0)
  case = _case(hf, family, 0, layout)
  if case.ids.shape[0] > 1:  # padded arrays, with the processor's mm_token_type_ids
    types = mm_token_type_ids(case.ids)
    batch = model.prepare(
      input_ids=case.ids, attention_mask=case.mask, mm_token_type_ids=types, **case.arrays
    )
  else:
    batch = model.prepare(input_ids=[list(r) for r in case.rows], **case.arrays)
  for b, row in enumerate(case.rows):
    np.testing.assert_array_equal(batch.input_ids[b], row)
    np.testing.assert_array_equal(batch.modality[b], modality_of(row))
    np.testing.assert_array_equal(batch.media_index[b], case.media[b])
  assert 3 in np.concatenate(batch.modality) and 2 in np.concatenate(batch.modality)


@pytest.mark.parametrize("family", QWEN)
def test_image_token_count_mismatch(family, models):
  hf, model, _ = models(family, 0)
  case = _case(hf, family, 0, "one_image")  # 6 image tokens
  ids = case.ids.copy()
  ids[0, int(np.flatnonzero(ids[0] == IMAGE_ID)[0])] = 7  # 5 tokens for 6 features
  with pytest.raises(ValueError, match="image tokens") as err:
    model.logits(ids, **case.arrays)
  assert mentions(str(err.value), 5, 6), str(err.value)
  with pytest.raises(ValueError, match="image tokens") as err:
    model.prepare(input_ids=ids, **case.arrays)
  assert mentions(str(err.value), 5, 6), str(err.value)


@pytest.mark.parametrize("what", ["flat_width", "rows_vs_grid", "not_flat"])
@pytest.mark.parametrize("family", QWEN)
def test_pixel_values_wrong_shape(family, what, models):
  hf, model, _ = models(family, 0)
  case = _case(hf, family, 0, "one_image")
  pix, thw = case.arrays["pixel_values"], case.arrays["image_grid_thw"]
  bad = {
    "flat_width": pix[:, : QWEN_FLAT - 1],
    "rows_vs_grid": pix[:-4],
    "not_flat": pix.reshape(len(pix), 3, 2, 14, 14),
  }[what]
  with pytest.raises(ValueError, match="pixel_values") as err:
    model.logits(case.ids, pixel_values=bad, image_grid_thw=thw)
  assert "shape" in str(err.value)
  with pytest.raises(ValueError, match="pixel_values") as err:
    model.image_features(bad, image_grid_thw=thw)
  assert "shape" in str(err.value)
