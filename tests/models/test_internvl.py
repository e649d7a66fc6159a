"""InternVL (InternViT tower, pixel shuffle, LayerNorm projector; transformers' native format)
against transformers (PyTorch, fp32, eager).

Two tiny towers (tests/mm_models.py): "internvl" in InternViT-6B's style (RMSNorm, q/k norm, a
final LayerNorm) and "internvl_plain" in InternViT-300M's (LayerNorm, attention bias, no final
norm). 32 px tiles of 8 px patches, pixel-shuffled 4x4 -> 2x2: 4 tokens a tile.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

import jmmkv
from hf_models import pad_batch
from policy_run import FAMILY_POLICIES, generate_and_check
from mm_models import (
  copy_model_dir,
  random_pil,
  CLIP_IMAGE,
  IMAGE_ID,
  INTERNVL,
  INTERNVL_TOKENS,
  hf_image_features,
  hf_mm_greedy_generate,
  hf_mm_logits,
  make_case,
  max_diff_valid,
  mentions,
  modality_of,
  respell,
  word_tokenizer,
)

SEEDS = (0, 1, 2)
FP32_ATOL = 1e-4
LAYOUTS = {  # images: tiles of each image (the processor's crops + thumbnail)
  "batch_left": dict(rows=[[3, "image", 5, "image", 2], [4, "image", 6]], images=[2, 1, 3]),
  "batch_right": dict(rows=[["image", 7], [2, "image", 3]], images=[5, 1], side="right"),
}
START, END, VIDEO = 997, 996, 998
V5_SPELLING = (  # the hub's (what save_pretrained writes) -> transformers 5's module names
  ("language_model.model.", "model.language_model."),
  ("language_model.lm_head.", "lm_head."),
  ("vision_tower.", "model.vision_tower."),
  ("multi_modal_projector.", "model.multi_modal_projector."),
)
# <img>, </img>, <video> in the processor test's tokenizer


def _case(hf, family: str, seed: int, layout: str):
  spec = LAYOUTS[layout]
  rng = np.random.default_rng(100 * seed + sorted(LAYOUTS).index(layout))
  return make_case(hf, family, rng, spec["rows"], spec["images"], side=spec.get("side", "left"))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", INTERNVL)
def test_features_and_logits_match_hf(family, seed, mm_model):
  hf, model, _ = mm_model(family, seed)
  for layout in sorted(LAYOUTS):
    case = _case(hf, family, seed, layout)
    want = hf_image_features(hf, case.arrays["pixel_values"])
    got = model.image_features(case.arrays["pixel_values"])
    assert [g.shape for g in got] == [w.shape for w in want] == [(INTERNVL_TOKENS, 64)] * len(want)
    diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
    assert diff <= FP32_ATOL, f"{family} seed={seed} {layout} features: {diff:.3g}"
    ref = hf_mm_logits(hf, case.ids, case.mask, **case.hf_inputs())
    out = model.logits(case.ids, attention_mask=case.mask, **case.arrays)
    diff = max_diff_valid(out, ref, case.mask)
    assert diff <= FP32_ATOL, f"{family} seed={seed} {layout}: max |jmmkv - HF| = {diff:.3g}"


@pytest.mark.parametrize("seed", [0])  # logits parity covers SEEDS
def test_greedy_matches_hf(seed, mm_model):
  hf, model, _ = mm_model("internvl", seed)
  case = _case(hf, "internvl", seed, "batch_left")
  want, margins = hf_mm_greedy_generate(hf, case.ids, case.mask, 16, **case.generate_inputs())
  assert min(min(m) for m in margins) > 1e-4, f"seed={seed}: near tie in HF greedy"
  batch = model.prepare(input_ids=case.ids, attention_mask=case.mask, **case.arrays)
  out = jmmkv.generate(model, batch, max_new_tokens=16, eos_token_id=[])
  assert [[int(t) for t in r] for r in out.tokens] == want


@pytest.mark.parametrize("name", FAMILY_POLICIES)
def test_every_policy_in_generate(name, mm_model):
  hf, model, _ = mm_model("internvl_plain", 0)
  rows = [[12, "image", 5, "image", 9], [4, "image", 20]]
  case = make_case(hf, "internvl_plain", np.random.default_rng(6), rows, images=[3, 2, 4])
  pos, mod = generate_and_check(model, case, name)
  if name == "full":
    assert set(np.unique(mod[pos >= 0])) == {1, 2}


def test_round_trip_through_convert(mm_model, tmp_path):
  hf, model, _ = mm_model("internvl", 0)
  jmmkv.save(model, tmp_path / "ckpt")
  back = jmmkv.load(tmp_path / "ckpt")
  assert back.config == model.config
  case = _case(hf, "internvl", 0, "batch_right")
  a = model.logits(case.ids, attention_mask=case.mask, **case.arrays)
  np.testing.assert_array_equal(a, back.logits(case.ids, attention_mask=case.mask, **case.arrays))


def test_the_other_key_spelling_loads(mm_model, tmp_path):
  """transformers 5 saves this model in the hub's spelling; its own spelling loads too."""
  hf, model, path = mm_model("internvl", 0)
  respell(path, tmp_path / "v5", V5_SPELLING)
  other = jmmkv.load(tmp_path / "v5")
  case = _case(hf, "internvl", 0, "batch_left")
  a = model.logits(case.ids, attention_mask=case.mask, **case.arrays)
  np.testing.assert_array_equal(a, other.logits(case.ids, attention_mask=case.mask, **case.arrays))


def _tokenizer():
  specials = {IMAGE_ID: "<IMG_CONTEXT>", VIDEO: "<video>", START: "<img>", END: "</img>"}
  names = ("context_image_token", "video_token", "start_image_token", "end_image_token")
  return word_tokenizer(specials, dict(zip(names, specials.values())))


def test_prepare_matches_the_processor_and_generation_matches_hf(mm_model, tmp_path):
  hf, _, path = mm_model("internvl", 1)
  copy_model_dir(path, tmp_path)
  tok = _tokenizer()
  ip = GotOcr2ImageProcessorPil(
    size={"height": CLIP_IMAGE, "width": CLIP_IMAGE}, crop_to_patches=True, max_patches=4
  )
  tok.save_pretrained(tmp_path)
  ip.save_pretrained(tmp_path)
  (tmp_path / "processor_config.json").write_text(
    json.dumps({"processor_class": "InternVLProcessor", "image_seq_length": INTERNVL_TOKENS})
  )

  class ImagesOnly(InternVLProcessor):  # its video processor needs torchvision
    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
      super().__init__(image_processor, tokenizer, None, **kwargs)

  proc = ImagesOnly(image_processor=ip, tokenizer=tok, image_seq_length=INTERNVL_TOKENS)
  model = jmmkv.load(tmp_path)
  rng = np.random.default_rng(2)
  pil = lambda h, w: random_pil(rng, h, w)
  images = [[pil(64, 64), pil(40, 90)], [pil(30, 30)]]
  ref = proc(
    text=["w3 <IMG_CONTEXT> w5 <IMG_CONTEXT> w6", "<IMG_CONTEXT> w9"],
    images=[im for ims in images for im in ims],
    return_tensors="np",
    padding=True,
  )
  batch = model.prepare(
    prompts=["w3 <image> w5 <image> w6", "<image> w9"], images=images, chat_template=False
  )
  rows = [ids[m.astype(bool)] for ids, m in zip(ref["input_ids"], ref["attention_mask"])]
  for b, row in enumerate(rows):
    np.testing.assert_array_equal(batch.input_ids[b], row)
    np.testing.assert_array_equal(batch.modality[b], modality_of(row))
  assert [int((r == IMAGE_ID).sum()) for r in rows] == [4 * 8, 4]  # 5 + 3 tiles; 1 tile
  np.testing.assert_allclose(batch.media.pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)
  ids, mask = pad_batch([r.tolist() for r in rows], "left")
  want, margins = hf_mm_greedy_generate(hf, ids, mask, 8, pixel_values=ref["pixel_values"])
  assert min(min(m) for m in margins) > 1e-4
  out = jmmkv.generate(model, batch, max_new_tokens=8, eos_token_id=[])
  assert [[int(t) for t in r] for r in out.tokens] == want


def test_bad_inputs_are_one_line_errors(mm_model):
  hf, model, _ = mm_model("internvl", 0)
  case = _case(hf, "internvl", 0, "batch_left")
  pix = case.arrays["pixel_values"]
  with pytest.raises(ValueError, match="pixel_values must have shape"):
    model.logits(case.ids, pixel_values=pix[:, :, :16])
  with pytest.raises(ValueError, match="image tokens") as err:
    model.logits(case.ids, pixel_values=pix[:-1])
  assert mentions(str(err.value), 24, 20)
  with pytest.raises(ValueError, match="frames given as images"):
    model.logits(case.ids, pixel_values=pix, pixel_values_videos=pix[None])


@pytest.mark.parametrize(
  "edit, message",
  [
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
    ({"vision_feature_layer": -2}, "vision_feature_layer=-2"),
    ({"downsample_ratio": 0.3}, "downsample_ratio"),
    ({"text_config": {"model_type": "internlm2"}}, "text model_type 'internlm2'"),
  ],
)
def test_unsupported_configs_are_refused(edit, message):
  from jmmkv.models import internvl
  from mm_models import make_config

  d = make_config("internvl")[0].to_dict()
  d.update(edit)
  with pytest.raises(ValueError, match=message):
    internvl.config_from_hf(d, "InternVLForConditionalGeneration")


def test_tied_unless_the_top_level_says_not():
  from jmmkv.models import internvl
  from mm_models import make_config

  d = make_config("internvl")[0].to_dict()
  arch = "InternVLForConditionalGeneration"
  assert not internvl.FAMILY.config_from_hf(d, arch, ()).text.tie_word_embeddings
  d.pop("tie_word_embeddings")
  assert internvl.FAMILY.config_from_hf(
    d, "InternVLForConditionalGeneration", ()
  ).text.tie_word_embeddings
