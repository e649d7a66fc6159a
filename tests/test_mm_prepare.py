"""model.prepare(prompts=..., images=...) runs the checkpoint's own processor.

Each tiny model directory gets a local WordLevel tokenizer (with the family's special tokens at
the config's ids) and a torchvision-free (*Pil) image processor, saved as a real checkpoint
would hold them. Prompts mark images with "<image>" in every family (jmmkv rewrites it into
Qwen's "<|vision_start|><|image_pad|><|vision_end|>"). References: the HF processor called
directly on the family's own placeholder text, then the HF model.
Qwen's processors cannot be built here as HF builds them: their video processor needs
torchvision, absent in this environment, so the reference is the same processor class with
an images-only constructor (`_image_only`), and no video goes through the processor path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
  LlavaNextProcessor,
  LlavaProcessor,
  PreTrainedTokenizerFast,
  Qwen2_5_VLProcessor,
  Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
  LlavaNextImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from hf_models import pad_batch, positions_from_mask
from mm_models import (
  CLIP_IMAGE,
  FAMILIES,
  IMAGE_ID,
  PINPOINTS,
  QWEN,
  QWEN_PATCH,
  QWEN_TEMPORAL,
  VIDEO_ID,
  VISION_END_ID,
  VISION_START_ID,
  build_mm_model,
  hf_mm_greedy_generate,
  hf_mm_logits,
  max_diff_valid,
  mentions,
  mm_token_type_ids,
  modality_of,
)

FP32_ATOL = 1e-4
MAX_NEW = 8
TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
  "{% if add_generation_prompt %}assistant :{% endif %}"
)
QWEN_SPECIAL = {
  VISION_END_ID: "<|vision_end|>",
  VISION_START_ID: "<|vision_start|>",
  VIDEO_ID: "<|video_pad|>",
  IMAGE_ID: "<|image_pad|>",
}
NATIVE_IMAGE = {  # what the family's processor expands; prompts to jmmkv say "<image>"
  "llava": "<image>",
  "llava_next": "<image>",
  "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
  "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}
IMAGE_SIZES = {  # (H, W) of the random PIL images of each prompt
  "llava": [[(40, 50), (32, 32)], [(20, 70)]],
  "llava_next": [[(64, 64), (50, 90)], [(32, 32)]],
  "qwen2_vl": [[(64, 64), (40, 90)], [(100, 30)]],
  "qwen2_5_vl": [[(64, 64), (40, 90)], [(100, 30)]],
}


def _tokenizer(specials: dict[int, str]) -> PreTrainedTokenizerFast:
  words = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":"]
  words += [f"w{i}" for i in range(min(specials) - len(words))]
  vocab = {w: i for i, w in enumerate(words)} | {s: i for i, s in specials.items()}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials.values()])
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
  )
  fast.chat_template = TEMPLATE
  return fast


def _image_only(cls):
  """``cls`` (a Qwen processor) built without a video processor (that needs torchvision)."""

  class ImageOnly(cls):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
      super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

  return ImageOnly


def _save_processor(family: str, path) -> object:
  """Writes tokenizer + processor files into ``path``; returns the HF reference processor."""
  crop = dict(
    size={"shortest_edge": CLIP_IMAGE}, crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE}
  )
  if family in ("llava", "llava_next"):
    tok = _tokenizer({IMAGE_ID: "<image>"})
    if family == "llava":
      proc_cls, image_proc = LlavaProcessor, CLIPImageProcessorPil(**crop)
    else:
      proc_cls = LlavaNextProcessor
      image_proc = LlavaNextImageProcessorPil(**crop, image_grid_pinpoints=PINPOINTS)
    proc = proc_cls(
      image_processor=image_proc,
      tokenizer=tok,
      patch_size=8,
      vision_feature_select_strategy="default",
      num_additional_image_tokens=1,
    )
    proc.save_pretrained(path)
    return proc
  tok = _tokenizer(QWEN_SPECIAL)
  image_proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
  proc_cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
  tok.save_pretrained(path)
  image_proc.save_pretrained(path)  # preprocessor_config.json, as in the hub checkpoints
  cfg_file = path / "preprocessor_config.json"
  cfg_file.write_text(
    json.dumps(json.loads(cfg_file.read_text()) | {"processor_class": proc_cls.__name__})
  )
  return _image_only(proc_cls)(image_processor=image_proc, tokenizer=tok)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
  """family -> (HF model, reference processor, jmmkv model), built once per module."""
  import jmmkv

  cache = {}

  def get(family: str):
    if family not in cache:
      hf = build_mm_model(family, 7)
      path = tmp_path_factory.mktemp(f"{family}_proc")
      hf.save_pretrained(path)
      proc = _save_processor(family, path)
      cache[family] = (hf, proc, jmmkv.load(path, dtype="float32"))
    return cache[family]

  return get


def _prompts(family: str, seed: int = 0):
  """Two prompts (two images, then one) with text between and after, and their PIL images."""
  rng = np.random.default_rng(seed)
  prompts = ["w3 <image> w17 w5 <image> w250 w9", "<image> w40 w41 w42"]
  images = [
    [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    for sizes in IMAGE_SIZES[family]
  ]
  return prompts, images


def _reference(family, proc, prompts, images, chat_template: bool):
  """The HF processor's output for the batch (numpy, right-padded) and its unpadded id rows;
  "<image>" in the prompts becomes the family's own image placeholder text."""
  prompts = [p.replace("<image>", NATIVE_IMAGE[family]) for p in prompts]
  if chat_template:
    prompts = [
      proc.tokenizer.apply_chat_template(
        [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
      )
      for p in prompts
    ]
  out = proc(text=prompts, images=images, padding=True, return_tensors="np")
  out = {k: np.asarray(v) for k, v in out.items()}
  rows = [ids[m.astype(bool)] for ids, m in zip(out["input_ids"], out["attention_mask"])]
  return out, rows


def _media_index(ids: np.ndarray) -> np.ndarray:
  """Image number of each image token (runs of image tokens are images: the prompts always
  have text, or vision_end / vision_start, between two images), -1 elsewhere."""
  is_image = ids == IMAGE_ID
  starts = is_image & ~np.r_[False, is_image[:-1]]
  return np.where(is_image, np.cumsum(starts) - 1, -1)


@pytest.mark.parametrize("chat_template", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_prepare_matches_hf_processor(family, chat_template, setups):
  _, proc, model = setups(family)
  prompts, images = _prompts(family)
  ref, rows = _reference(family, proc, prompts, images, chat_template)
  batch = model.prepare(prompts=prompts, images=images, chat_template=chat_template)
  assert len(batch.input_ids) == 2
  for b, ids in enumerate(rows):
    assert (ids == IMAGE_ID).any() and (ids[0] == 1) == chat_template
    np.testing.assert_array_equal(batch.input_ids[b], ids, err_msg=f"{family} prompt {b}")
    np.testing.assert_array_equal(batch.modality[b], modality_of(ids))
    media = _media_index(ids)
    assert media.max() == len(images[b]) - 1
    np.testing.assert_array_equal(batch.media_index[b], media)
  # pixel arrays: the processor's, images of all prompts in order (NeXT: padded to most tiles)
  keys = {"llava": ["pixel_values"], "llava_next": ["pixel_values", "image_sizes"]}
  for key in keys.get(family, ["pixel_values", "image_grid_thw"]):
    got = np.asarray(getattr(batch.media, key))
    np.testing.assert_allclose(got, ref[key], rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_outputs_give_hf_logits_and_generation(family, setups):
  import jmmkv

  hf, proc, model = setups(family)
  prompts, images = _prompts(family, seed=1)
  ref, rows = _reference(family, proc, prompts, images, chat_template=True)
  arrays = {k: ref[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in ref}
  ids, mask = pad_batch([r.tolist() for r in rows], "left")
  extra = {"mm_token_type_ids": mm_token_type_ids(ids)} if family in QWEN else {}
  # logits of the processor's arrays (LLaVA: HF generate's cumsum positions)
  pos = {} if family in QWEN else {"position_ids": positions_from_mask(mask)}
  want = hf_mm_logits(hf, ids, mask, **arrays, **extra, **pos)
  got = np.asarray(model.logits(ids, attention_mask=mask, **arrays))
  diff = max_diff_valid(got, want, mask)
  assert diff <= FP32_ATOL, f"{family}: max |jmmkv - HF| = {diff:.3g}"
  # greedy generation from model.prepare(prompts, images) equals HF on the processor output
  tokens, margins = hf_mm_greedy_generate(hf, ids, mask, MAX_NEW, **arrays, **extra)
  assert min(min(m) for m in margins) > 1e-4, f"{family}: near tie in HF greedy; change the seed"
  batch = model.prepare(prompts=prompts, images=images)
  out = jmmkv.generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=[])
  assert [list(map(int, t)) for t in out.tokens] == tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_count_mismatch(family, setups):
  _, _, model = setups(family)
  prompts, images = _prompts(family)
  images = [images[0][:1], images[1]]  # prompt 0 has 2 placeholders but gets 1 image
  with pytest.raises(ValueError, match="placeholder") as err:
    model.prepare(prompts=prompts, images=images)
  assert mentions(str(err.value), 2, 1), str(err.value)
  with pytest.raises(ValueError, match="placeholder"):  # one image too many
    model.prepare(prompts=prompts[1:], images=[images[1] * 2])


def _video_reference(frames, mean, std, tp=QWEN_TEMPORAL, p=QWEN_PATCH, m=2):
  """Normalised frames in transformers' Qwen2-VL video-processor patch layout (numpy)."""
  x = np.stack([np.asarray(f, np.float32).transpose(2, 0, 1) / 255.0 for f in frames])
  x = (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
  x = np.concatenate([x, np.repeat(x[-1:], -len(x) % tp, axis=0)])
  n, c, h, w = x.shape
  gt, gh, gw = n // tp, h // p, w // p
  x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("num_frames", [3, 4])
def test_video_frames_through_prepare(family, num_frames, setups):
  """No torchvision here, so frames go through the PIL image processor; the result must be the
  video processor's layout, and generation must equal HF's on the same arrays."""
  import jmmkv

  hf, proc, model = setups(family)
  rng = np.random.default_rng(num_frames)
  frames = [
    Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)) for _ in range(num_frames)
  ]
  ip = proc.image_processor
  want_pix, grid = _video_reference(frames, ip.image_mean, ip.image_std)
  batch = model.prepare(
    prompts=["w3 <video> w5 w6"], videos=[[frames]], fps=4.0, chat_template=False
  )
  np.testing.assert_allclose(batch.media.pixel_values_videos, want_pix, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(batch.media.video_grid_thw, [grid])
  n = grid[0] * grid[1] * grid[2] // 4
  ids = batch.input_ids[0]
  assert (ids == VIDEO_ID).sum() == n
  start = int(np.flatnonzero(ids == VISION_START_ID)[0])
  assert list(ids[start : start + n + 2]) == [VISION_START_ID] + [VIDEO_ID] * n + [VISION_END_ID]
  np.testing.assert_array_equal(batch.modality[0], np.where(ids == VIDEO_ID, 3, 1))
  if family == "qwen2_5_vl":
    np.testing.assert_allclose(batch.media.second_per_grid_ts, [QWEN_TEMPORAL / 4.0])
  else:
    assert batch.media.second_per_grid_ts is None
  arrays = {"pixel_values_videos": want_pix, "video_grid_thw": np.array([grid])}
  if family == "qwen2_5_vl":
    arrays["second_per_grid_ts"] = np.array([QWEN_TEMPORAL / 4.0])
  row = ids[None].astype(np.int64)
  tokens, margins = hf_mm_greedy_generate(
    hf, row, np.ones_like(row), MAX_NEW, mm_token_type_ids=mm_token_type_ids(row), **arrays
  )
  assert min(min(m) for m in margins) > 1e-4
  out = jmmkv.generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=[])
  assert out.tokens == tokens


def test_images_must_be_one_list_per_prompt(setups):
  _, _, model = setups("llava")
  prompts, images = _prompts("llava")
  img = images[1][0]
  for bad in ([img], img, [img, [img]]):  # a flat list, a bare image, a mix
    with pytest.raises(ValueError, match=r"one list per prompt, e\.g\. images=\[\[img\]\]"):
      model.prepare(prompts=prompts[1:], images=bad)
  with pytest.raises(ValueError, match=r"videos=\[\[frames\]\]"):
    model.prepare(prompts=prompts[1:], images=[[img]], videos=[img])
  batch = model.prepare(prompts=prompts[1:], images=([img],))  # tuples are lists too
  assert (batch.modality[0] == 2).sum() > 0
