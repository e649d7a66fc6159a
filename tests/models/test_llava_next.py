"""LLaVA-NeXT (anyres tiles, unpadding, image_newline) against transformers (PyTorch, fp32, eager).

Tiny config: CLIP 32 px tiles of 8 px patches, ``image_grid_pinpoints`` [[32,64],[64,32],[64,64]];
a 64x64 or 40x64 image has 5 tiles (2x2 grid + base), 32x32 has 3 (tests/mm_models.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from hf_models import positions_from_mask
from mm_models import (
  IMAGE_ID,
  hf_image_features,
  hf_mm_logits,
  llava_next_pixels,
  make_case,
  max_diff_valid,
  mentions,
  modality_of,
  next_num_patches,
)

FAMILY = "llava_next"
SEEDS = (0, 1, 2)
FP32_ATOL = 1e-4
V = 1000
SIZES = {  # (H, W) of each image
  "one": [(64, 64)],
  "three": [(64, 64), (40, 64), (32, 32)],  # 5 / 5 / 3 tiles, 88 / 70 / 36 tokens
  "odd": [(64, 32), (23, 61), (50, 20), (64, 48)],  # tall, wide, unpadding on both axes
}
LAYOUTS = {
  "one_image": dict(rows=[[3, "image", 6]], images=SIZES["one"]),
  "three_images": dict(rows=[[2, "image", 4, "image", 3, "image", 5]], images=SIZES["three"]),
  "adjacent": dict(rows=[["image", "image", 4]], images=[(40, 64), (32, 32)]),
  "batch_left": dict(
    rows=[[2, "image", 3, "image", 4], [5, "image", 2]], images=SIZES["three"], side="left"
  ),
  "batch_right": dict(
    rows=[[4, "image", 9], ["image", 2, "image", 1]], images=SIZES["three"][::-1], side="right"
  ),
}


@pytest.fixture(scope="module")
def models(mm_model):
  """seed -> (HF model, jmmkv model, saved dir), shared by the session."""
  return lambda seed: mm_model(FAMILY, seed)


def _case(hf, seed: int, layout: str):
  spec = LAYOUTS[layout]
  rng = np.random.default_rng(100 * seed + sorted(LAYOUTS).index(layout))
  return make_case(hf, FAMILY, rng, spec["rows"], spec["images"], side=spec.get("side", "left"))


def test_tile_counts_of_the_tiny_config():
  assert [next_num_patches(s) for s in SIZES["three"]] == [5, 5, 3]


@pytest.mark.parametrize("sizes", sorted(SIZES))
@pytest.mark.parametrize("seed", SEEDS)
def test_image_features_match_hf(seed, sizes, models):
  hf, model, _ = models(seed)
  pix, image_sizes = llava_next_pixels(np.random.default_rng(seed), SIZES[sizes])
  want = hf_image_features(hf, pix, image_sizes=image_sizes)
  got = model.image_features(pix, image_sizes=image_sizes)
  assert len(got) == len(want)
  if sizes == "three":
    assert [len(w) for w in want] == [88, 70, 36]
  for i, (g, w) in enumerate(zip(got, want)):
    assert np.asarray(g).shape == w.shape, (i, np.asarray(g).shape, w.shape)
    diff = float(np.max(np.abs(np.asarray(g) - w)))
    assert diff <= FP32_ATOL, f"seed={seed} {sizes} image {i}: max |jmmkv - HF| = {diff:.3g}"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("seed", SEEDS)
def test_logits_match_hf(seed, layout, models):
  hf, model, _ = models(seed)
  case = _case(hf, seed, layout)
  ref = hf_mm_logits(hf, case.ids, case.mask, **case.hf_inputs())
  got = np.asarray(model.logits(case.ids, attention_mask=case.mask, **case.arrays))
  assert got.shape == (*case.ids.shape, V) and got.dtype == np.float32, (got.shape, got.dtype)
  assert np.all(np.isfinite(got[case.mask.astype(bool)]))
  diff = max_diff_valid(got, ref, case.mask)
  assert diff <= FP32_ATOL, f"seed={seed} {layout}: max |jmmkv - HF| = {diff:.3g}"


@pytest.mark.parametrize("seed", SEEDS)
def test_logits_explicit_positions(seed, models):
  hf, model, _ = models(seed)
  case = _case(hf, seed, "batch_left")
  pos = positions_from_mask(case.mask)
  ref = hf_mm_logits(hf, case.ids, case.mask, **case.hf_inputs())
  got = np.asarray(
    model.logits(case.ids, attention_mask=case.mask, position_ids=pos, **case.arrays)
  )
  assert max_diff_valid(got, ref, case.mask) <= FP32_ATOL


@pytest.mark.parametrize("padded", [True, False])
def test_prepare_modality_and_media_index(padded, models):
  hf, model, _ = models(0)
  case = _case(hf, 0, "batch_left" if padded else "adjacent")
  if padded:
    batch = model.prepare(input_ids=case.ids, attention_mask=case.mask, **case.arrays)
  else:
    batch = model.prepare(input_ids=[list(r) for r in case.rows], **case.arrays)
  for b, row in enumerate(case.rows):
    np.testing.assert_array_equal(batch.input_ids[b], row)
    np.testing.assert_array_equal(batch.modality[b], modality_of(row))
    np.testing.assert_array_equal(batch.media_index[b], case.media[b])


def test_logits_rejects_image_token_count_mismatch(models):
  hf, model, _ = models(0)
  case = _case(hf, 0, "one_image")
  ids = case.ids.copy()
  first = int(np.flatnonzero(ids[0] == IMAGE_ID)[0])
  ids[0, first] = 7  # 87 image tokens for 88 features
  with pytest.raises(ValueError, match="image tokens") as err:
    model.logits(ids, **case.arrays)
  assert mentions(str(err.value), 87, 88), str(err.value)
  with pytest.raises(ValueError, match="image tokens") as err:
    model.prepare(input_ids=ids, **case.arrays)
  assert mentions(str(err.value), 87, 88), str(err.value)


@pytest.mark.parametrize("shape", [(1, 5, 4, 32, 32), (1, 5, 3, 24, 24), (5, 3, 32, 32, 1)])
def test_pixel_values_wrong_shape(shape, models):
  hf, model, _ = models(0)
  case = _case(hf, 0, "one_image")
  pix = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  with pytest.raises(ValueError, match="pixel_values") as err:
    model.logits(case.ids, pixel_values=pix, image_sizes=case.arrays["image_sizes"])
  assert "shape" in str(err.value)
