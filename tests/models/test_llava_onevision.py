"""LLaVA-OneVision (SigLIP tower, anyres-max packing, multi-image prompts, pooled video frames)
against transformers (PyTorch, fp32, eager).

Tiny config (tests/mm_models.py): SigLIP 32 px tiles of 8 px patches (16 features a tile),
pinpoints up to 96x96, ``anyres_max_2``: a 64x64 image is a 2x2 grid whose 8x8 features shrink
to 5x5 (46 tokens with base and newlines); a video frame pools 4x4 to 2x2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from transformers import LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
  LlavaOnevisionImageProcessorPil,
)

import jmmkv
from hf_models import positions_from_mask
from policy_run import FAMILY_POLICIES, generate_and_check
from mm_models import (
  copy_model_dir,
  random_pil,
  CLIP_IMAGE,
  IMAGE_ID,
  OV_MAX_TILES,
  OV_PINPOINTS,
  VIDEO_ID,
  hf_image_features,
  hf_mm_greedy_generate,
  hf_mm_logits,
  hf_video_features,
  make_case,
  max_diff_valid,
  mentions,
  modality_of,
  onevision_arrays,
  respell,
)
from test_mm_prepare import _tokenizer

V5_SPELLING = (  # the hub's (what save_pretrained writes) -> transformers 5's module names
  ("language_model.model.", "model.language_model."),
  ("language_model.lm_head.", "lm_head."),
  ("vision_tower.", "model.vision_tower."),
  ("multi_modal_projector.", "model.multi_modal_projector."),
  ("image_newline", "model.image_newline"),
)

FAMILY = "llava_onevision"
SEEDS = (0, 1, 2)
FP32_ATOL = 1e-4
V = 1000
LAYOUTS = {
  # one image alone in its prompt: anyres tiles, unpadding, anyres_max shrinking
  "one_image": dict(rows=[[3, "image", 6]], images=[(64, 64)]),
  # batch of two, each prompt one image and the first a video too (left padded)
  "image_video": dict(
    rows=[[2, "image", 3, "video", 4], [5, "image", 2]], images=[(40, 96), (96, 50)], videos=[2]
  ),
  # several images in the first prompt: base tile + newline each (batch_num_images)
  "multi_image": dict(
    rows=[[2, "image", 3, "image", 4], [5, "image", 2]],
    images=[(64, 64), (32, 32), (40, 96)],
    batch_num_images=[2, 1],
    side="right",
  ),
  "videos": dict(rows=[["video", 3], [4, "video", 2]], videos=[3, 3]),
}


@pytest.fixture(scope="module")
def models(mm_model):
  """seed -> (HF model, jmmkv model, saved dir), shared by the session."""
  return lambda seed: mm_model(FAMILY, seed)


def _case(hf, seed: int, layout: str):
  spec = LAYOUTS[layout]
  rng = np.random.default_rng(100 * seed + sorted(LAYOUTS).index(layout))
  return make_case(
    hf,
    FAMILY,
    rng,
    spec["rows"],
    spec.get("images", ()),
    spec.get("videos", ()),
    side=spec.get("side", "left"),
    batch_num_images=spec.get("batch_num_images"),
  )


@pytest.mark.parametrize("seed", SEEDS)
def test_image_and_video_features_match_hf(seed, models):
  hf, model, _ = models(seed)
  rng = np.random.default_rng(seed)
  sizes = [(64, 64), (40, 96), (96, 50), (32, 32)]
  for per_prompt in (None, [1, 3], [2, 2]):
    arrays = onevision_arrays(hf, rng, sizes, batch_num_images=per_prompt)[0]
    want = hf_image_features(hf, **arrays)
    if per_prompt is None:  # 2x2 grid shrunk to 5x5; 1x3 and 3x2 grids unpadded; one tile
      assert [len(w) for w in want] == [46, 52, 56, 36]
    got = model.family.image_features(model, **arrays)
    assert [g.shape for g in got] == [w.shape for w in want]
    for i, (g, w) in enumerate(zip(got, want)):
      diff = float(np.max(np.abs(g - w)))
      assert diff <= FP32_ATOL, f"seed={seed} {per_prompt} image {i}: max |jmmkv - HF| = {diff:.3g}"
  arrays = onevision_arrays(hf, rng, videos=[3, 3])[0]
  want = hf_video_features(hf, arrays["pixel_values_videos"])
  got = model.video_features(arrays["pixel_values_videos"], None)
  assert [g.shape for g in got] == [w.shape for w in want] == [(13, 64)] * 2
  assert max(float(np.max(np.abs(g - w))) for g, w in zip(got, want)) <= FP32_ATOL


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("seed", SEEDS)
def test_logits_match_hf(seed, layout, models):
  hf, model, _ = models(seed)
  case = _case(hf, seed, layout)
  ref = hf_mm_logits(hf, case.ids, case.mask, **case.hf_inputs())
  got = np.asarray(model.logits(case.ids, attention_mask=case.mask, **case.arrays))
  assert got.shape == (*case.ids.shape, V) and got.dtype == np.float32, (got.shape, got.dtype)
  diff = max_diff_valid(got, ref, case.mask)
  assert diff <= FP32_ATOL, f"seed={seed} {layout}: max |jmmkv - HF| = {diff:.3g}"


@pytest.mark.parametrize("seed", [0])  # logits parity covers SEEDS
def test_greedy_matches_hf(seed, models):
  hf, model, _ = models(seed)
  case = _case(hf, seed, "image_video")
  kw = case.generate_inputs()
  want, margins = hf_mm_greedy_generate(hf, case.ids, case.mask, 16, **kw)
  assert min(min(m) for m in margins) > 1e-4, f"seed={seed}: near tie in HF greedy"
  batch = model.prepare(input_ids=case.ids, attention_mask=case.mask, **case.arrays)
  for b, row in enumerate(case.rows):
    np.testing.assert_array_equal(batch.modality[b], modality_of(row))
    np.testing.assert_array_equal(batch.media_index[b], case.media[b])
  out = jmmkv.generate(model, batch, max_new_tokens=16, eos_token_id=[])
  assert [[int(t) for t in r] for r in out.tokens] == want


@pytest.mark.parametrize("name", FAMILY_POLICIES)
def test_every_policy_in_generate(name, models):
  """Batch 2 with images and a video; each kept slot's modality is its token's (from the ids)."""
  hf, model, _ = models(0)
  rows = [[12, "image", 5, "video", 9], [4, "image", 20]]
  rng = np.random.default_rng(5)
  case = make_case(hf, FAMILY, rng, rows, images=[(64, 64), (40, 96)], videos=[2])
  pos, mod = generate_and_check(model, case, name)
  if name == "full":
    assert set(np.unique(mod[:, 0][pos[:, 0] >= 0])) == {1, 2, 3}


def test_round_trip_through_convert(models, tmp_path):
  hf, model, path = models(0)
  jmmkv.save(model, tmp_path / "ckpt")
  back = jmmkv.load(tmp_path / "ckpt")
  assert back.config == model.config
  case = _case(hf, 0, "image_video")
  a = model.logits(case.ids, attention_mask=case.mask, **case.arrays)
  b = back.logits(case.ids, attention_mask=case.mask, **case.arrays)
  np.testing.assert_array_equal(a, b)


def test_the_other_key_spelling_loads(models, tmp_path):
  """transformers 5 saves this model in the hub's spelling; its own spelling loads too."""
  hf, model, path = models(0)
  respell(path, tmp_path / "v5", V5_SPELLING)
  other = jmmkv.load(tmp_path / "v5")
  case = _case(hf, 0, "image_video")
  a = model.logits(case.ids, attention_mask=case.mask, **case.arrays)
  np.testing.assert_array_equal(a, other.logits(case.ids, attention_mask=case.mask, **case.arrays))


# ---- the processor path: PIL images and frames through model.prepare --------------------------


def _save_processor(path):
  tok = _tokenizer({VIDEO_ID: "<video>", IMAGE_ID: "<image>"})
  ip = LlavaOnevisionImageProcessorPil(
    size={"height": CLIP_IMAGE, "width": CLIP_IMAGE}, image_grid_pinpoints=OV_PINPOINTS
  )
  tok.save_pretrained(path)
  ip.save_pretrained(path)
  extra = dict(
    num_image_tokens=16,
    vision_feature_select_strategy="full",
    vision_aspect_ratio=f"anyres_max_{OV_MAX_TILES}",
  )
  (path / "processor_config.json").write_text(
    json.dumps({"processor_class": "LlavaOnevisionProcessor", **extra})
  )

  class ImagesOnly(LlavaOnevisionProcessor):  # its video processor needs torchvision
    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
      super().__init__(image_processor, tokenizer, None, **kwargs)

  return ImagesOnly(image_processor=ip, tokenizer=tok, **extra)


@pytest.fixture(scope="module")
def with_processor(models, tmp_path_factory):
  hf, _, path = models(0)
  proc_dir = tmp_path_factory.mktemp("ov_proc")
  copy_model_dir(path, proc_dir)
  proc = _save_processor(proc_dir)
  return hf, proc, jmmkv.load(proc_dir)


def test_prepare_matches_the_processor_and_generation_matches_hf(with_processor):
  hf, proc, model = with_processor
  rng = np.random.default_rng(3)
  prompts = ["w3 <image> w17 <image> w5", "<image> w40 w41"]
  images = [[random_pil(rng, 64, 64), random_pil(rng, 40, 90)], [random_pil(rng, 50, 100)]]
  ref = proc(text=prompts, images=images, padding=True, return_tensors="np")
  assert list(ref["batch_num_images"]) == [2, 1]
  batch = model.prepare(prompts=prompts, images=images, chat_template=False)
  for b, (ids, m) in enumerate(zip(ref["input_ids"], ref["attention_mask"])):
    np.testing.assert_array_equal(batch.input_ids[b], ids[m.astype(bool)])
  for key in ("pixel_values", "image_sizes", "batch_num_images"):
    np.testing.assert_allclose(getattr(batch.media, key), ref[key], rtol=0, atol=1e-6)
  # the multi-image prompt's images are base tile + newline: 17 tokens each
  assert (batch.input_ids[0] == IMAGE_ID).sum() == 34
  rows = [r.tolist() for r in batch.input_ids]
  from hf_models import pad_batch

  ids, mask = pad_batch(rows, "left")
  arrays = {k: ref[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
  want, margins = hf_mm_greedy_generate(hf, ids, mask, 8, **arrays)
  assert min(min(m) for m in margins) > 1e-4
  out = jmmkv.generate(model, batch, max_new_tokens=8, eos_token_id=[])
  assert [[int(t) for t in r] for r in out.tokens] == want
  ref_logits = hf_mm_logits(hf, ids, mask, **arrays, position_ids=positions_from_mask(mask))
  got = model.logits(ids, attention_mask=mask, **arrays)
  assert max_diff_valid(got, ref_logits, mask) <= FP32_ATOL


def test_video_frames_through_prepare(with_processor):
  """No torchvision: frames are resized with PIL (bicubic) and normalised with the image
  processor's mean / std, written out here from that description."""
  hf, proc, model = with_processor
  rng = np.random.default_rng(4)
  frames = [random_pil(rng, 40, 56) for _ in range(3)]
  batch = model.prepare(prompts=["w3 <video> w5"], videos=[[frames]], chat_template=False)
  ip = proc.image_processor
  mean = np.asarray(ip.image_mean, np.float32)[:, None, None]
  std = np.asarray(ip.image_std, np.float32)[:, None, None]
  want = np.stack(
    [
      (
        np.asarray(f.resize((CLIP_IMAGE, CLIP_IMAGE), Image.BICUBIC), np.float32).transpose(2, 0, 1)
        / 255.0
        - mean
      )
      / std
      for f in frames
    ]
  )[None]
  np.testing.assert_allclose(batch.media.pixel_values_videos, want, rtol=0, atol=1e-5)
  ids = batch.input_ids[0]
  assert (ids == VIDEO_ID).sum() == 3 * 4 + 1
  np.testing.assert_array_equal(batch.modality[0], modality_of(ids))
  row = ids[None].astype(np.int64)
  tokens, margins = hf_mm_greedy_generate(
    hf, row, np.ones_like(row), 8, pixel_values_videos=want.astype(np.float32)
  )
  assert min(min(m) for m in margins) > 1e-4
  out = jmmkv.generate(model, batch, max_new_tokens=8, eos_token_id=[])
  assert out.tokens == tokens


# ---- errors -----------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(models):
  hf, model, _ = models(0)
  case = _case(hf, 0, "multi_image")
  arrays = dict(case.arrays)
  with pytest.raises(ValueError, match="batch_num_images") as err:
    model.logits(case.ids, **dict(arrays, batch_num_images=np.array([2, 2])))
  assert mentions(str(err.value), 3)
  with pytest.raises(ValueError, match="image_sizes"):
    model.logits(case.ids, pixel_values=arrays["pixel_values"])
  with pytest.raises(ValueError, match="pixel_values must have shape"):
    model.logits(case.ids, **dict(arrays, pixel_values=arrays["pixel_values"][:, :, :, :16]))
  video = _case(hf, 0, "videos")
  with pytest.raises(ValueError, match="pixel_values_videos must have shape"):
    model.logits(video.ids, pixel_values_videos=video.arrays["pixel_values_videos"][0])
  ids = video.ids.copy()
  ids[ids == VIDEO_ID] = 7
  with pytest.raises(ValueError, match="video tokens") as err:
    model.logits(ids, **video.arrays)
  assert mentions(str(err.value), 0, 26)


@pytest.mark.parametrize(
  "edit, message",
  [
    ({"vision_feature_select_strategy": "default"}, "vision_feature_select_strategy"),
    ({"vision_aspect_ratio": "anyres"}, "anyres_max_N"),
    ({"text_config": {"model_type": "gemma"}}, "text model_type 'gemma'"),
  ],
)
def test_unsupported_configs_are_refused(edit, message):
  from jmmkv.models import llava_onevision

  cfg, _ = __import__("mm_models").make_config(FAMILY)
  d = cfg.to_dict()
  d.update(edit)
  with pytest.raises(ValueError, match=message):
    llava_onevision.config_from_hf(d, "LlavaOnevisionForConditionalGeneration")


def test_config_defaults_and_tie_as_transformers():
  import copy

  from transformers import LlavaOnevisionConfig as HFConfig

  from jmmkv.models import llava_onevision
  from mm_models import make_config

  d = make_config(FAMILY)[0].to_dict()
  d.pop("image_grid_pinpoints")
  d["text_config"]["tie_word_embeddings"] = True
  d["tie_word_embeddings"] = False
  cfg = llava_onevision.FAMILY.config_from_hf(d, "LlavaOnevisionForConditionalGeneration", ())
  hf = HFConfig(**copy.deepcopy(d))  # transformers edits its input
  assert [list(p) for p in cfg.grid_pinpoints] == hf.image_grid_pinpoints  # 36 of 384 multiples
  assert cfg.text.tie_word_embeddings == hf.tie_word_embeddings is True  # either flag ties
  d.pop("vision_config")
  vision = llava_onevision.config_from_hf(d, "LlavaOnevisionForConditionalGeneration").vision
  want = HFConfig(**copy.deepcopy(d)).vision_config
  assert (vision.hidden_size, vision.image_size, vision.patch_size, vision.num_layers) == (
    want.hidden_size,
    want.image_size,
    want.patch_size,
    want.num_hidden_layers,
  )


def test_frames_must_be_images_or_uint8(with_processor):
  _, _, model = with_processor
  frames = [np.random.default_rng(0).random((32, 32, 3))] * 2  # floats in [0, 1]
  with pytest.raises(ValueError, match=r"PIL images or \[H, W, 3\] uint8 arrays, got float64"):
    model.prepare(prompts=["<video> w3"], videos=[[frames]], chat_template=False)
