"""LLaVA-1.5 (CLIP tower + projector + Llama) against transformers (PyTorch, fp32, eager).

References come from `LlavaForConditionalGeneration` only (tests/mm_models.py builds tiny random
models); jmmkv loads the saved directories. Generation parity lives in tests/test_mm_generate.py,
the processor path in tests/test_mm_prepare.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hf_models import positions_from_mask
from mm_models import (
  IMAGE_ID,
  LLAVA_TOKENS,
  hf_image_features,
  hf_mm_logits,
  llava_pixels,
  make_case,
  max_diff_valid,
  mentions,
  modality_of,
)

FAMILY = "llava"
SEEDS = (0, 1, 2)
FP32_ATOL = 1e-4
V = 1000
# Row specs: ints are random text runs, "image" the next image of the batch (16 tokens each).
LAYOUTS = {
  "one_image": dict(rows=[[3, "image", 6]], images=1),
  "three_images": dict(rows=[[2, "image", 4, "image", "image", 5]], images=3),  # two adjacent
  "image_first": dict(rows=[["image", 7]], images=1),
  "batch_left": dict(rows=[[2, "image", 3, "image", 4], [5, "image", 2]], images=3, side="left"),
  "batch_right": dict(rows=[[4, "image", 9], ["image", 2, "image", 1]], images=3, side="right"),
}


@pytest.fixture(scope="module")
def models(mm_model):
  """seed -> (HF model, jmmkv model, saved dir), shared by the session."""
  return lambda seed: mm_model(FAMILY, seed)


def _case(hf, seed: int, layout: str):
  spec = LAYOUTS[layout]
  rng = np.random.default_rng(100 * seed + sorted(LAYOUTS).index(layout))
  return make_case(hf, FAMILY, rng, spec["rows"], spec["images"], side=spec.get("side", "left"))


@pytest.mark.parametrize("n_images", [1, 3])
@pytest.mark.parametrize("seed", SEEDS)
def test_image_features_match_hf(seed, n_images, models):
  hf, model, _ = models(seed)
  pix = llava_pixels(np.random.default_rng(seed), n_images)
  want = hf_image_features(hf, pix)
  got = model.image_features(pix)
  assert len(got) == n_images
  for i, (g, w) in enumerate(zip(got, want)):
    assert np.asarray(g).shape == w.shape == (LLAVA_TOKENS, 64), (i, np.asarray(g).shape)
    diff = float(np.max(np.abs(np.asarray(g) - w)))
    assert diff <= FP32_ATOL, f"seed={seed} image {i}: max |jmmkv - HF| = {diff:.3g}"


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
def test_logits_explicit_positions_and_rows_alone(seed, models):
  """Explicit cumsum positions change nothing; each row run alone gives its batch logits."""
  hf, model, _ = models(seed)
  case = _case(hf, seed, "batch_left")
  batch = np.asarray(model.logits(case.ids, attention_mask=case.mask, **case.arrays))
  pos = positions_from_mask(case.mask)
  explicit = np.asarray(
    model.logits(case.ids, attention_mask=case.mask, position_ids=pos, **case.arrays)
  )
  assert max_diff_valid(explicit, batch, case.mask) <= 1e-5
  pix, start = case.arrays["pixel_values"], 0
  for b, row in enumerate(case.rows):
    n = row.count(IMAGE_ID) // LLAVA_TOKENS
    ids = np.asarray([row])
    alone = np.asarray(model.logits(ids, pixel_values=pix[start : start + n]))
    ref = hf_mm_logits(hf, ids, pixel_values=pix[start : start + n])
    start += n
    valid = case.mask[b].astype(bool)
    assert float(np.max(np.abs(alone[0] - ref[0]))) <= FP32_ATOL
    assert float(np.max(np.abs(alone[0] - batch[b, valid]))) <= FP32_ATOL


@pytest.mark.parametrize("padded", [True, False])
def test_prepare_modality_and_media_index(padded, models):
  hf, model, _ = models(0)
  case = _case(hf, 0, "batch_right" if padded else "three_images")
  if padded:
    batch = model.prepare(input_ids=case.ids, attention_mask=case.mask, **case.arrays)
  else:
    batch = model.prepare(input_ids=[list(r) for r in case.rows], **case.arrays)
  assert len(batch.input_ids) == len(case.rows)
  for b, row in enumerate(case.rows):
    np.testing.assert_array_equal(batch.input_ids[b], row)
    np.testing.assert_array_equal(batch.modality[b], modality_of(row))
    np.testing.assert_array_equal(batch.media_index[b], case.media[b])
  # images are numbered within each row, in order of appearance
  assert np.asarray(batch.media_index[0]).max() == max(case.media[0])


def _mismatched_ids(n_image_tokens: int) -> np.ndarray:
  ids = np.full((1, n_image_tokens + 6), 5, np.int64)
  ids[0, 0] = 1
  ids[0, 3 : 3 + n_image_tokens] = IMAGE_ID
  return ids


def test_logits_rejects_image_token_count_mismatch(models):
  _, model, _ = models(0)
  pix = llava_pixels(np.random.default_rng(0), 1)
  with pytest.raises(ValueError, match="image tokens") as err:
    model.logits(_mismatched_ids(LLAVA_TOKENS - 1), pixel_values=pix)
  assert mentions(str(err.value), LLAVA_TOKENS - 1, LLAVA_TOKENS), str(err.value)


def test_prepare_rejects_image_token_count_mismatch(models):
  _, model, _ = models(0)
  pix = llava_pixels(np.random.default_rng(0), 2)
  with pytest.raises(ValueError, match="image tokens") as err:
    model.prepare(input_ids=_mismatched_ids(LLAVA_TOKENS), pixel_values=pix)  # 16 vs 32
  assert mentions(str(err.value), LLAVA_TOKENS, 2 * LLAVA_TOKENS), str(err.value)


@pytest.mark.parametrize("shape", [(1, 4, 32, 32), (1, 3, 24, 24), (3, 32, 32)])
def test_pixel_values_wrong_shape(shape, models):
  _, model, _ = models(0)
  pix = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  with pytest.raises(ValueError, match="pixel_values") as err:
    model.logits(_mismatched_ids(LLAVA_TOKENS), pixel_values=pix)
  assert "shape" in str(err.value)
  with pytest.raises(ValueError, match="pixel_values") as err:
    model.image_features(pix)
  assert "shape" in str(err.value)


def test_unsupported_architecture(models, tmp_path):
  import jmmkv

  _, _, path = models(0)
  dst = shutil.copytree(path, tmp_path / "blip")
  cfg = json.loads((dst / "config.json").read_text())
  cfg["architectures"] = ["BlipForConditionalGeneration"]
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="unsupported architecture"):
    jmmkv.load(dst)
