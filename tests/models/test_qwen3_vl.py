"""Qwen3-VL (vision tower with resampled learned positions, DeepStack into the first decoder
layers, Qwen3 decoder with interleaved M-RoPE, videos split per frame by timestamps) against
transformers (PyTorch, fp32, eager).

Tiny config (tests/mm_models.py): 3 vision blocks, DeepStack from blocks 0 and 2 (into decoder
layers 0 and 1), a 4x4 learned position table, M-RoPE sections [2, 3, 3] of 8 frequencies.
A video's frames are separate vision spans with timestamp text between them, as its processor
writes them: the tests build them as one-frame "videos" and then give the grid of the whole video.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import jmmkv
from hf_models import pad_batch
from mm_models import (
  copy_model_dir,
  random_pil,
  hf_image_features,
  hf_mm_greedy_generate,
  hf_mm_logits,
  hf_rope_index,
  make_case,
  max_diff_valid,
  mm_token_type_ids,
  modality_of,
  respell,
)
from policy_run import FAMILY_POLICIES, generate_and_check
from test_mm_prepare import QWEN_SPECIAL, _tokenizer

FAMILY = "qwen3_vl"
SEEDS = (0, 1, 2)
FP32_ATOL = 1e-4
LAYOUTS = {  # frames: (h, w) grid of each video's one-temporal-patch frames, and their count
  "images": dict(
    rows=[[3, "image", 5, "image", 2], [4, "image", 6]], images=[(1, 4, 6), (1, 2, 2), (1, 4, 4)]
  ),
  "image_video": dict(
    rows=[[2, "image", 2, "video", 2, "video", 3], [5, "image", 1]],
    images=[(1, 4, 4), (1, 2, 4)],
    video=(2, 4, 4),
    side="right",
  ),
  "video": dict(rows=[[1, "video", 2, "video", 2, "video", 1], [6]], video=(3, 2, 2)),
}


def _case(hf, seed: int, layout: str):
  spec = LAYOUTS[layout]
  rng = np.random.default_rng(100 * seed + sorted(LAYOUTS).index(layout))
  frames = []
  if "video" in spec:
    t, h, w = spec["video"]
    frames = [(1, h, w)] * t
  case = make_case(
    hf, FAMILY, rng, spec["rows"], spec.get("images", ()), frames, side=spec.get("side", "left")
  )
  if frames:  # one video of t temporal patches, written frame by frame
    case.arrays["video_grid_thw"] = np.asarray([spec["video"]], np.int64)
  return case


@pytest.mark.parametrize("seed", SEEDS)
def test_features_positions_and_logits_match_hf(seed, mm_model):
  hf, model, _ = mm_model(FAMILY, seed)
  for layout in sorted(LAYOUTS):
    case = _case(hf, seed, layout)
    if "pixel_values" in case.arrays:
      want = hf_image_features(
        hf, case.arrays["pixel_values"], image_grid_thw=case.arrays["image_grid_thw"]
      )
      got = model.image_features(
        case.arrays["pixel_values"], image_grid_thw=case.arrays["image_grid_thw"]
      )
      assert max(float(np.max(np.abs(g - w))) for g, w in zip(got, want)) <= FP32_ATOL
    pos, _ = hf_rope_index(hf, case.ids, case.mask, **case.arrays)
    m = case.mask.astype(bool)
    grids = {k: v for k, v in case.arrays.items() if k.endswith("grid_thw")}
    got_pos = model.positions(case.ids, m, jmmkv.inputs.Media(**grids))
    np.testing.assert_array_equal(got_pos[:, m], pos[:, m])
    ref = hf_mm_logits(hf, case.ids, case.mask, **case.hf_inputs())
    out = model.logits(case.ids, attention_mask=case.mask, **case.arrays)
    diff = max_diff_valid(out, ref, case.mask)
    assert diff <= FP32_ATOL, f"seed={seed} {layout}: max |jmmkv - HF| = {diff:.3g}"


def test_deepstack_matters(mm_model):
  """The parity above would not hold without DeepStack: dropping its features moves logits."""
  hf, model, _ = mm_model(FAMILY, 0)
  case = _case(hf, 0, "images")
  ref = hf_mm_logits(hf, case.ids, case.mask, **case.hf_inputs())
  saved = hf.model.visual.deepstack_visual_indexes
  hf.model.visual.deepstack_visual_indexes = []
  try:
    without = hf_mm_logits(hf, case.ids, case.mask, **case.hf_inputs())
  finally:
    hf.model.visual.deepstack_visual_indexes = saved
  assert max_diff_valid(without, ref, case.mask) > 1e-2


@pytest.mark.parametrize("seed", [0])  # logits parity covers SEEDS
def test_greedy_matches_hf(seed, mm_model):
  hf, model, _ = mm_model(FAMILY, seed)
  case = _case(hf, seed, "image_video")
  ids, mask = pad_batch(case.rows, "left")
  kw = dict(case.arrays, mm_token_type_ids=mm_token_type_ids(ids))
  want, margins = hf_mm_greedy_generate(hf, ids, mask, 16, **kw)
  assert min(min(m) for m in margins) > 1e-4, f"seed={seed}: near tie in HF greedy"
  batch = model.prepare(input_ids=ids, attention_mask=mask, **case.arrays)
  for b, row in enumerate(case.rows):
    np.testing.assert_array_equal(batch.modality[b], modality_of(row))
  out = jmmkv.generate(model, batch, max_new_tokens=16, eos_token_id=[])
  assert [[int(t) for t in r] for r in out.tokens] == want


@pytest.mark.parametrize("name", FAMILY_POLICIES)
def test_every_policy_in_generate(name, mm_model):
  hf, model, _ = mm_model(FAMILY, 0)
  case = _case(hf, 0, "image_video")
  pos, mod = generate_and_check(model, case, name)
  if name == "full":
    assert set(np.unique(mod[:, 0][pos[:, 0] >= 0])) == {1, 2, 3}


def test_round_trip_through_convert(mm_model, tmp_path):
  hf, model, _ = mm_model(FAMILY, 0)
  jmmkv.save(model, tmp_path / "ckpt")
  back = jmmkv.load(tmp_path / "ckpt")
  assert back.config == model.config
  case = _case(hf, 0, "image_video")
  a = model.logits(case.ids, attention_mask=case.mask, **case.arrays)
  np.testing.assert_array_equal(a, back.logits(case.ids, attention_mask=case.mask, **case.arrays))


def test_the_other_key_spelling_loads(mm_model, tmp_path):
  """transformers 5 writes model.language_model. / model.visual.; Qwen2-VL's older spelling
  (model. / visual.) loads too."""
  hf, model, path = mm_model(FAMILY, 0)
  rules = (("model.language_model.", "model."), ("model.visual.", "visual."))
  respell(path, tmp_path / "old", rules)
  other = jmmkv.load(tmp_path / "old")
  case = _case(hf, 0, "image_video")
  a = model.logits(case.ids, attention_mask=case.mask, **case.arrays)
  np.testing.assert_array_equal(a, other.logits(case.ids, attention_mask=case.mask, **case.arrays))


def test_prepare_with_the_processor(mm_model, tmp_path):
  hf, _, path = mm_model(FAMILY, 1)
  copy_model_dir(path, tmp_path)
  tok = _tokenizer(QWEN_SPECIAL)
  ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
  tok.save_pretrained(tmp_path)
  ip.save_pretrained(tmp_path)
  cfg_file = tmp_path / "preprocessor_config.json"
  import json

  cfg_file.write_text(
    json.dumps(json.loads(cfg_file.read_text()) | {"processor_class": "Qwen3VLProcessor"})
  )

  class ImagesOnly(Qwen3VLProcessor):  # its video processor needs torchvision
    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
      super().__init__(image_processor, tokenizer, None, **kwargs)

  proc = ImagesOnly(image_processor=ip, tokenizer=tok)
  model = jmmkv.load(tmp_path)
  rng = np.random.default_rng(2)
  pil = lambda h, w: random_pil(rng, h, w)
  images = [[pil(64, 64), pil(40, 90)], [pil(100, 30)]]
  span = "<|vision_start|><|image_pad|><|vision_end|>"
  ref = proc(
    text=[f"w3 {span} w5 {span} w6", f"{span} w9"],
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
  np.testing.assert_allclose(batch.media.pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)
  ids, mask = pad_batch([r.tolist() for r in rows], "left")
  arrays = {k: ref[k] for k in ("pixel_values", "image_grid_thw")}
  want, margins = hf_mm_greedy_generate(
    hf, ids, mask, 8, mm_token_type_ids=mm_token_type_ids(ids), **arrays
  )
  assert min(min(m) for m in margins) > 1e-4
  out = jmmkv.generate(model, batch, max_new_tokens=8, eos_token_id=[])
  assert [[int(t) for t in r] for r in out.tokens] == want
  with pytest.raises(ValueError, match="video processor"):
    model.prepare(prompts=["<video> w3"], videos=[[[pil(56, 56)] * 2]])


def test_moe_is_refused():
  from jmmkv.models import qwen3_vl
  from mm_models import make_config

  d = make_config(FAMILY)[0].to_dict()
  d["text_config"]["num_experts"] = 4
  with pytest.raises(ValueError, match="MoE"):
    qwen3_vl.config_from_hf(d, "Qwen3VLForConditionalGeneration")


def test_config_keys_read_as_transformers_reads_them():
  """rope_theta beside rope_scaling (the hub's layout), transformers' defaults for missing keys
  (theta 5e5, head_dim 128, 27 vision blocks of 16 px patches) and the top-level tie flag."""
  import copy

  from transformers import Qwen3VLConfig as HFConfig

  from jmmkv.models import qwen3_vl
  from mm_models import make_config

  d = make_config(FAMILY)[0].to_dict()
  text = d["text_config"]
  text.pop("rope_parameters")
  text["rope_scaling"] = {
    "rope_type": "default",
    "mrope_section": [2, 3, 3],
    "mrope_interleaved": True,
  }
  text["rope_theta"] = 123456.0
  cfg = qwen3_vl.config_from_hf(d, "Qwen3VLForConditionalGeneration")
  hf_text = HFConfig(text_config=copy.deepcopy(text)).text_config  # transformers edits its input
  assert cfg.text.rope.theta == hf_text.rope_parameters["rope_theta"]
  assert cfg.text.rope.theta == 123456.0 and cfg.text.mrope_section == (2, 3, 3)
  for key in ("rope_theta", "head_dim"):
    text.pop(key)
  text["tie_word_embeddings"] = True
  d.pop("tie_word_embeddings", None)
  d["vision_config"] = {
    k: v for k, v in d["vision_config"].items() if k not in ("depth", "patch_size")
  }
  model_cfg = qwen3_vl.FAMILY.config_from_hf(d, "Qwen3VLForConditionalGeneration", ())
  hf = HFConfig(**copy.deepcopy(d))
  assert model_cfg.text.rope.theta == hf.text_config.rope_parameters["rope_theta"] == 500000.0
  assert model_cfg.text.head_dim == hf.text_config.head_dim == 128
  assert (model_cfg.vision.depth, model_cfg.vision.patch_size) == (27, 16)
  assert model_cfg.text.tie_word_embeddings is False  # the top level decides, default False


def test_shared_forward_comparison_equals_generate(mm_model):
  """`jmmkv.compare.generate_each` (one prompt forward for every policy, what `jmmkv eval`
  runs) carries DeepStack's additions through as `generate` does."""
  from jmmkv import compare

  hf, model, _ = mm_model(FAMILY, 0)
  case = _case(hf, 0, "image_video")
  batch = model.prepare(input_ids=case.ids, attention_mask=case.mask, **case.arrays)
  jobs = [("meda", 0.3)]
  both = compare.generate_each(model, batch, jobs, max_new_tokens=4, eos_token_id=[])
  for (spec, ratio), got in zip(jobs, both):
    want = jmmkv.generate(
      model, batch, jmmkv.policies.from_spec(spec), ratio, max_new_tokens=4, eos_token_id=[]
    )
    assert got.tokens == want.tokens
