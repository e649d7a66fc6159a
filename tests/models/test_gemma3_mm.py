"""Gemma 3 with images (``Gemma3ForConditionalGeneration``: SigLIP tower, pooled and projected
features, a Gemma 3 decoder with local and global layers) against transformers (PyTorch, fp32,
eager).

The tiny model (tests/mm_models.py): 3 text layers (local, global, local) with a window of 8,
32 px images of 8 px patches pooled 4x4 -> 2x2: 4 tokens an image, between ``<start_of_image>``
and ``<end_of_image>``. Transformers' forward gets ``token_type_ids`` (its processor's): the
image tokens of each image attend to each other both ways.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import Gemma3Processor
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

import jmmkv
from hf_models import pad_batch
from mm_models import (
  BOI_ID,
  CLIP_IMAGE,
  EOI_ID,
  GEMMA3_TOKENS,
  IMAGE_ID,
  build_gemma3_mm,
  copy_model_dir,
  gemma3_case,
  gemma3_mm_config,
  gemma3_token_types,
  hf_image_features,
  hf_mm_greedy_generate,
  hf_mm_logits,
  max_diff_valid,
  modality_of,
  random_pil,
  respell,
  word_tokenizer,
)
from policy_run import FAMILY_POLICIES, generate_and_check_windowed

SEEDS = (0, 1, 2)
FEATURES_ATOL, LOGITS_ATOL = 1e-5, 1e-4
LAYOUTS = {  # images of a row: <start_of_image>, 4 image tokens, <end_of_image>
  "batch_left": dict(rows=[[3, "image", 5, "image", 2], [4, "image", 6]]),
  "batch_right": dict(rows=[["image", 11], [2, "image", "image", 3]], side="right"),
}
SPELLINGS = {  # what transformers 5.25's save_pretrained writes -> other spellings of the keys
  "hub": (("vision_tower.", "vision_tower.vision_model."),),  # google's checkpoints
  "v5_modules": (  # transformers 5.25's module names
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
  ),
  "v5_vision_model": (  # earlier transformers 5 releases (SigLIP under .vision_model)
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
  ),
}
ARCH = "Gemma3ForConditionalGeneration"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
  """Factory seed -> (HF model, jmmkv model, saved dir), each built once per module."""
  cache = {}

  def get(seed: int):
    if seed not in cache:
      hf = build_gemma3_mm(seed)
      path = tmp_path_factory.mktemp(f"gemma3_mm_s{seed}")
      hf.save_pretrained(path)
      cache[seed] = (hf, jmmkv.load(path, dtype="float32"), path)
    return cache[seed]

  return get


def _case(seed: int, layout: str):
  spec = LAYOUTS[layout]
  rng = np.random.default_rng(100 * seed + sorted(LAYOUTS).index(layout))
  return gemma3_case(rng, spec["rows"], spec.get("side", "left"))


def _hf_inputs(case) -> dict:
  return dict(case.hf_inputs(), token_type_ids=gemma3_token_types(case.ids))


@pytest.mark.parametrize("seed", SEEDS)
def test_features_and_logits_match_hf(seed, gemma):
  """Features within 1e-5 of ``get_image_features``; logits of padded batches within 1e-4 of
  the forward with the bidirectional image blocks (which move them by far more than that)."""
  hf, model, _ = gemma(seed)
  for layout in sorted(LAYOUTS):
    case = _case(seed, layout)
    want = hf_image_features(hf, case.arrays["pixel_values"])
    got = model.image_features(case.arrays["pixel_values"])
    assert [g.shape for g in got] == [w.shape for w in want] == [(GEMMA3_TOKENS, 64)] * len(want)
    diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
    assert diff <= FEATURES_ATOL, f"seed={seed} {layout} features: {diff:.3g}"
    ref = hf_mm_logits(hf, case.ids, case.mask, **_hf_inputs(case))
    out = model.logits(case.ids, attention_mask=case.mask, **case.arrays)
    diff = max_diff_valid(out, ref, case.mask)
    assert diff <= LOGITS_ATOL, f"seed={seed} {layout}: max |jmmkv - HF| = {diff:.3g}"
    causal = hf_mm_logits(hf, case.ids, case.mask, **case.hf_inputs())
    assert max_diff_valid(causal, ref, case.mask) > 100 * LOGITS_ATOL


def test_greedy_matches_hf(gemma):
  hf, model, _ = gemma(0)
  case = gemma3_case(np.random.default_rng(3), LAYOUTS["batch_left"]["rows"])  # no near ties
  inputs = dict(case.generate_inputs(), token_type_ids=gemma3_token_types(case.ids))
  want, margins = hf_mm_greedy_generate(hf, case.ids, case.mask, 16, **inputs)
  assert min(min(m) for m in margins) > 1e-4, "near tie in HF greedy"
  batch = model.prepare(input_ids=case.ids, attention_mask=case.mask, **case.arrays)
  out = jmmkv.generate(model, batch, max_new_tokens=16, eos_token_id=[])
  assert [[int(t) for t in r] for r in out.tokens] == want


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_other_key_spellings_load(spelling, gemma, tmp_path):
  _, model, path = gemma(0)
  respell(path, tmp_path / spelling, SPELLINGS[spelling])
  other = jmmkv.load(tmp_path / spelling)
  case = _case(0, "batch_right")
  a = model.logits(case.ids, attention_mask=case.mask, **case.arrays)
  np.testing.assert_array_equal(a, other.logits(case.ids, attention_mask=case.mask, **case.arrays))


@pytest.mark.parametrize("name", FAMILY_POLICIES)
def test_every_policy_in_generate(name, gemma):
  """Batch 2: the policies compress the global layer, the local layers keep their window."""
  _, model, _ = gemma(0)
  rows = [[12, "image", 5, "image", 9], [4, "image", 20]]
  case = gemma3_case(np.random.default_rng(6), rows)
  pos, mod = generate_and_check_windowed(model, case, name)
  if name == "full":
    assert set(np.unique(mod[pos >= 0])) == {1, 2}


def test_round_trip_through_convert(gemma, tmp_path):
  _, model, _ = gemma(0)
  jmmkv.save(model, tmp_path / "ckpt")
  back = jmmkv.load(tmp_path / "ckpt")
  assert back.config == model.config and back.config.text.bidirectional_images
  case = _case(0, "batch_left")
  a = model.logits(case.ids, attention_mask=case.mask, **case.arrays)
  np.testing.assert_array_equal(a, back.logits(case.ids, attention_mask=case.mask, **case.arrays))


def _tokenizer():
  specials = {
    IMAGE_ID: "<image_soft_token>",
    998: "<unused0>",
    BOI_ID: "<start_of_image>",
    EOI_ID: "<end_of_image>",
  }
  names = ("image_token", "boi_token", "eoi_token")
  return word_tokenizer(
    specials, dict(zip(names, (specials[i] for i in (IMAGE_ID, BOI_ID, EOI_ID))))
  )


def test_prepare_matches_the_processor_and_generation_matches_hf(gemma, tmp_path):
  """``model.prepare(prompts=..., images=...)`` with the PIL image processor (no torchvision)
  gives the processor's ids and pixels; greedy decoding from it matches transformers'."""
  hf, _, path = gemma(0)
  copy_model_dir(path, tmp_path)
  size = {"height": CLIP_IMAGE, "width": CLIP_IMAGE}
  proc = Gemma3Processor(
    image_processor=Gemma3ImageProcessorPil(size=size),
    tokenizer=_tokenizer(),
    image_seq_length=GEMMA3_TOKENS,
  )
  proc.save_pretrained(tmp_path)
  model = jmmkv.load(tmp_path)
  assert type(model.processor.image_processor).__name__ == "Gemma3ImageProcessorPil"
  rng = np.random.default_rng(2)
  images = [[random_pil(rng, 64, 48), random_pil(rng, 30, 90)], [random_pil(rng, 32, 32)], []]
  texts = ["w3 <image> w5 w8 <image> w6", "<image> w9 w4", "w7 w1 w2"]
  ref = proc(
    text=[t.replace("<image>", "<start_of_image>") for t in texts],
    images=images,
    return_tensors="np",
    padding=True,
  )
  batch = model.prepare(prompts=texts, images=images, chat_template=False)
  rows = [ids[m.astype(bool)] for ids, m in zip(ref["input_ids"], ref["attention_mask"])]
  for b, row in enumerate(rows):
    np.testing.assert_array_equal(batch.input_ids[b], row)
    np.testing.assert_array_equal(batch.modality[b], modality_of(row))
  assert [int((r == IMAGE_ID).sum()) for r in rows] == [2 * GEMMA3_TOKENS, GEMMA3_TOKENS, 0]
  np.testing.assert_allclose(batch.media.pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)
  ids, mask = pad_batch([r.tolist() for r in rows], "left")
  want, margins = hf_mm_greedy_generate(
    hf, ids, mask, 8, pixel_values=ref["pixel_values"], token_type_ids=gemma3_token_types(ids)
  )
  assert min(min(m) for m in margins) > 1e-4
  out = jmmkv.generate(model, batch, max_new_tokens=8, eos_token_id=[])
  assert [[int(t) for t in r] for r in out.tokens] == want


def test_bad_inputs_are_one_line_errors(gemma):
  _, model, _ = gemma(0)
  case = _case(0, "batch_left")
  pix = case.arrays["pixel_values"]
  with pytest.raises(ValueError, match="pixel_values must have shape"):
    model.logits(case.ids, pixel_values=pix[:, :, :16])
  with pytest.raises(ValueError, match="image tokens"):
    model.logits(case.ids, pixel_values=pix[:-1])
  with pytest.raises(ValueError, match="takes no videos"):
    model.logits(case.ids, pixel_values=pix, pixel_values_videos=pix[None])


def test_config_defaults_and_refusals():
  """A config.json as the hub's (text_config mostly left to Gemma3TextConfig's defaults) reads;
  tied unless the top level says not; towers and grids it cannot run are refused."""
  from jmmkv.models import gemma3_mm

  d = gemma3_mm_config().to_dict()
  cfg = gemma3_mm.FAMILY.config_from_hf(d, ARCH, ())
  assert cfg.text.tie_word_embeddings and cfg.text.bidirectional_images
  assert (cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id) == (IMAGE_ID, BOI_ID, EOI_ID)
  assert cfg.text.window_layers == (0, 2) and cfg.pool == 2
  untied = gemma3_mm.FAMILY.config_from_hf(d | {"tie_word_embeddings": False}, ARCH, ())
  assert not untied.text.tie_word_embeddings
  assert "language_model.lm_head.weight" in gemma3_mm.key_table(untied)
  keep = ("vision_config", "image_token_index", "mm_tokens_per_image")
  hub = {"text_config": {"model_type": "gemma3_text", "hidden_size": 2560}} | {
    k: d[k] for k in keep
  }
  big = gemma3_mm.FAMILY.config_from_hf(hub, ARCH, (1, 106))
  assert (big.text.vocab_size, big.text.num_layers, big.text.head_dim) == (262_208, 26, 256)
  assert big.text.eos_token_ids == (1, 106) and big.text.sliding_window == 4096
  with pytest.raises(ValueError, match="mm_tokens_per_image=9"):
    gemma3_mm.config_from_hf(d | {"mm_tokens_per_image": 9}, ARCH)
  with pytest.raises(ValueError, match="vision_use_head"):
    gemma3_mm.config_from_hf(d | {"vision_config": {"vision_use_head": True}}, ARCH)
