"""Tiny random HF multimodal models (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, and
LLaVA-OneVision and InternVL, which are not in `FAMILIES`: their tests are in tests/models) and
their inputs.

Plain helpers, independent of jmmkv: they build the reference models, random pixel arrays and
token rows, and compute reference outputs with transformers (PyTorch, fp32, eager). Configs
follow reference/ENVIRONMENT.md section 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import re
from typing import Sequence

import numpy as np
import torch
from transformers import (
  CLIPVisionConfig,
  GenerationConfig,
  LlamaConfig,
  LlavaConfig,
  LlavaForConditionalGeneration,
  LlavaNextConfig,
  LlavaNextForConditionalGeneration,
  InternVLConfig,
  InternVLForConditionalGeneration,
  InternVLVisionConfig,
  LlavaOnevisionConfig,
  LlavaOnevisionForConditionalGeneration,
  Qwen2_5_VLConfig,
  Qwen2_5_VLForConditionalGeneration,
  Qwen2VLConfig,
  Qwen2VLForConditionalGeneration,
  Qwen2Config,
  Qwen3VLConfig,
  Qwen3VLForConditionalGeneration,
  SiglipVisionConfig,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from hf_models import TEXT, pad_batch, positions_from_mask

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
QWEN = ("qwen2_vl", "qwen2_5_vl")
QWEN_LIKE = (*QWEN, "qwen3_vl")  # Qwen vision spans and M-RoPE (Qwen3-VL: tests/models)
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 999, 998, 997, 996
MAX_TEXT_ID = 990  # random text ids are drawn from [3, MAX_TEXT_ID): no pad/bos/eos/special ids
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
CLIP_IMAGE = 32  # CLIP image_size (and LLaVA-NeXT tile size)
LLAVA_TOKENS = 16  # (32 / 8)^2 patch tokens per LLaVA image ("default" drops CLS)
QWEN_PATCH, QWEN_TEMPORAL, QWEN_MERGE = 14, 2, 2
QWEN_FLAT = 3 * QWEN_TEMPORAL * QWEN_PATCH * QWEN_PATCH  # 1176 values per flat patch
# LLaVA-OneVision: SigLIP 32 px tiles of 8 px patches (16 features a tile, 4 per pooled frame);
# anyres_max_2 shrinks grids of more than 2 tiles' features (a 2x2 grid: 8x8 -> 5x5)
OV_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64], [96, 96]]
OV_MAX_TILES = 2
INTERNVL = ("internvl", "internvl_plain")  # InternViT with / without qk-norm, RMSNorm, final norm
INTERNVL_TOKENS = 4  # a 4x4-patch tile pixel-shuffled to 2x2

_CLIP = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  image_size=CLIP_IMAGE,
  patch_size=8,
  projection_dim=32,
)
_QWEN_TEXT = dict(
  TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
)
_QWEN_TOKENS = dict(
  image_token_id=IMAGE_ID,
  video_token_id=VIDEO_ID,
  vision_start_token_id=VISION_START_ID,
  vision_end_token_id=VISION_END_ID,
)


def make_config(family: str):
  """The HF config and model class of one tiny multimodal family."""
  if family == "llava":
    cfg = LlavaConfig(
      vision_config=CLIPVisionConfig(**_CLIP),
      text_config=LlamaConfig(**TEXT),
      image_token_index=IMAGE_ID,
      image_seq_length=LLAVA_TOKENS,
      vision_feature_layer=-2,
      vision_feature_select_strategy="default",
    )
    return cfg, LlavaForConditionalGeneration
  if family == "llava_next":
    cfg = LlavaNextConfig(
      vision_config=CLIPVisionConfig(**_CLIP),
      text_config=LlamaConfig(**TEXT),
      image_token_index=IMAGE_ID,
      vision_feature_layer=-2,
      vision_feature_select_strategy="default",
      image_grid_pinpoints=PINPOINTS,
    )
    return cfg, LlavaNextForConditionalGeneration
  if family == "qwen2_vl":
    vision = dict(
      depth=2,
      embed_dim=32,
      hidden_size=64,
      num_heads=4,
      mlp_ratio=2,
      patch_size=QWEN_PATCH,
      spatial_merge_size=QWEN_MERGE,
      temporal_patch_size=QWEN_TEMPORAL,
    )
    cfg = Qwen2VLConfig(text_config=_QWEN_TEXT, vision_config=vision, **_QWEN_TOKENS)
    return cfg, Qwen2VLForConditionalGeneration
  if family == "qwen2_5_vl":
    vision = dict(
      depth=2,
      hidden_size=32,
      out_hidden_size=64,
      intermediate_size=64,
      num_heads=4,
      patch_size=QWEN_PATCH,
      spatial_merge_size=QWEN_MERGE,
      temporal_patch_size=QWEN_TEMPORAL,
      window_size=56,  # 2x2 merged tokens = 4x4 patches per window
      fullatt_block_indexes=[1],
    )
    cfg = Qwen2_5_VLConfig(text_config=_QWEN_TEXT, vision_config=vision, **_QWEN_TOKENS)
    return cfg, Qwen2_5_VLForConditionalGeneration
  if family == "llava_onevision":
    vision = SiglipVisionConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=CLIP_IMAGE,
      patch_size=8,
      vision_use_head=False,
    )
    cfg = LlavaOnevisionConfig(
      vision_config=vision,
      text_config=Qwen2Config(**TEXT),
      image_token_index=IMAGE_ID,
      video_token_index=VIDEO_ID,
      image_grid_pinpoints=OV_PINPOINTS,
      vision_aspect_ratio=f"anyres_max_{OV_MAX_TILES}",
      vision_feature_layer=-1,
      vision_feature_select_strategy="full",
    )
    return cfg, LlavaOnevisionForConditionalGeneration
  if family in INTERNVL:
    big = family == "internvl"  # InternViT-6B's style; "internvl_plain" is InternViT-300M's
    vision = InternVLVisionConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=CLIP_IMAGE,
      patch_size=8,
      attention_bias=not big,
      use_qk_norm=big,
      norm_type="rms_norm" if big else "layer_norm",
      use_mean_pooling=not big,
    )
    cfg = InternVLConfig(
      vision_config=vision,
      text_config=Qwen2Config(**TEXT),
      image_token_id=IMAGE_ID,
      image_seq_length=INTERNVL_TOKENS,
      downsample_ratio=0.5,
      tie_word_embeddings=False,
    )
    return cfg, InternVLForConditionalGeneration
  if family == "qwen3_vl":
    vision = dict(
      depth=3,
      hidden_size=32,
      intermediate_size=64,
      num_heads=4,
      out_hidden_size=64,
      patch_size=QWEN_PATCH,
      spatial_merge_size=QWEN_MERGE,
      temporal_patch_size=QWEN_TEMPORAL,
      num_position_embeddings=16,  # a 4x4 table resampled to every grid
      deepstack_visual_indexes=[0, 2],
    )
    text = dict(
      TEXT,
      head_dim=16,
      rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
    )
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **_QWEN_TOKENS)
    return cfg, Qwen3VLForConditionalGeneration
  known = FAMILIES + ("llava_onevision", "qwen3_vl") + INTERNVL
  raise KeyError(f"unknown multimodal family {family!r}; known: {known}")


def _is_norm(name: str) -> bool:
  return "norm" in name or ".ln_" in name  # layer_norm1, pre_layrnorm, norm1, ln_q, model.norm


@torch.no_grad()
def randomize_mm_(model: torch.nn.Module, seed: int) -> None:
  """Re-initialises every parameter with random, non-degenerate values (in place).

  Like hf_models.randomize_: biases N(0, 0.2^2) (norm biases included), norm weights
  1 + N(0, 0.1^2), token embeddings N(0, 0.3^2), position embeddings N(0, 0.3^2), other 1-D
  parameters (CLIP class embedding, LLaVA-NeXT image_newline) N(0, 1), and weights of linear and
  conv layers N(0, 1/fan_in) with fan_in the product of all but the first dimension. None of
  the tiny configs ties embeddings.
  """
  assert not model.config.tie_word_embeddings
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
    if name.endswith(".bias"):
      p.copy_(0.2 * noise)
    elif _is_norm(name):
      p.copy_(1.0 + 0.1 * noise)
    elif "embed_tokens" in name or "position_embedding" in name:
      p.copy_(0.3 * noise)
    elif p.ndim == 1:
      p.copy_(noise)
    else:
      p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


def build_mm_model(family: str, seed: int) -> torch.nn.Module:
  """A tiny fp32 eager HF multimodal model with random parameters (eval mode)."""
  cfg, cls = make_config(family)
  torch.manual_seed(seed)
  model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
  randomize_mm_(model, seed)
  return model.eval()


# ---------------------------------------------------------------------------------------------
# Inputs


def random_text(rng: np.random.Generator, n: int) -> list[int]:
  """n random text ids in [3, MAX_TEXT_ID): never pad/bos/eos or an image/video/vision id."""
  return [int(i) for i in rng.integers(3, MAX_TEXT_ID, size=n)]


def llava_pixels(rng: np.random.Generator, n: int) -> np.ndarray:
  """[n, 3, 32, 32] float32 LLaVA pixel values."""
  return rng.standard_normal((n, 3, CLIP_IMAGE, CLIP_IMAGE)).astype(np.float32)


def next_num_patches(size: Sequence[int]) -> int:
  """Tiles (base image + anyres crops) of an LLaVA-NeXT image of (H, W) ``size``."""
  return int(image_size_to_num_patches(list(size), PINPOINTS, CLIP_IMAGE))


def llava_next_pixels(rng: np.random.Generator, sizes: Sequence[Sequence[int]]):
  """(pixel_values [n, max_tiles, 3, 32, 32] float32, image_sizes [n, 2] int64).

  Rows are padded to the largest tile count with random values (not zeros, as the processor
  does): the model must slice each image by its size and never read them.
  """
  tiles = max(next_num_patches(s) for s in sizes)
  pix = rng.standard_normal((len(sizes), tiles, 3, CLIP_IMAGE, CLIP_IMAGE)).astype(np.float32)
  return pix, np.asarray(sizes, np.int64).reshape(-1, 2)


def qwen_pixels(rng: np.random.Generator, grids: Sequence[Sequence[int]]):
  """(flat pixel values [sum(t*h*w), 1176] float32, grid_thw [n, 3] int64)."""
  thw = np.asarray(grids, np.int64).reshape(-1, 3)
  assert np.all(thw[:, 1:] % QWEN_MERGE == 0), thw
  n = int(np.prod(thw, axis=1).sum())
  return rng.standard_normal((n, QWEN_FLAT)).astype(np.float32), thw


def qwen_num_tokens(grids: Sequence[Sequence[int]]) -> list[int]:
  """LLM tokens of each Qwen image / video: t * h * w / merge^2."""
  return [int(np.prod(g)) // QWEN_MERGE**2 for g in grids]


def build_row(rng: np.random.Generator, spec, family: str) -> tuple[list[int], list[int]]:
  """A prompt row from ``spec``: ints are runs of random text, ("image", n) / ("video", n) are n
  placeholder tokens (wrapped in vision_start / vision_end for Qwen).

  Returns (ids, media): media[i] is the index within the row of the image (or video) token i
  belongs to, -1 for text (vision_start / vision_end included).
  """
  ids, media, count = [1], [-1], {"image": 0, "video": 0}  # BOS first
  for item in spec:
    if isinstance(item, int):
      ids += random_text(rng, item)
      media += [-1] * item
      continue
    kind, n = item
    token = {"image": IMAGE_ID, "video": VIDEO_ID}[kind]
    qwen = family in QWEN_LIKE
    if qwen:
      ids.append(VISION_START_ID)
      media.append(-1)
    ids += [token] * n
    media += [count[kind]] * n
    count[kind] += 1
    if qwen:
      ids.append(VISION_END_ID)
      media.append(-1)
  return ids, media


def mm_token_type_ids(ids: np.ndarray) -> np.ndarray:
  """HF v5 ``mm_token_type_ids``: 0 text, 1 image, 2 video (same shape as ``ids``)."""
  ids = np.asarray(ids)
  return ((ids == IMAGE_ID) * 1 + (ids == VIDEO_ID) * 2).astype(np.int64)


def modality_of(ids: np.ndarray) -> np.ndarray:
  """jmmkv modality ids expected for real tokens: 1 text, 2 image, 3 video."""
  ids = np.asarray(ids)
  return np.where(ids == IMAGE_ID, 2, np.where(ids == VIDEO_ID, 3, 1)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Case:
  """A padded batch of multimodal prompts and its HF media arrays."""

  ids: np.ndarray  # [B, T] int64, padded with 0
  mask: np.ndarray  # [B, T] int64
  rows: list[list[int]]  # unpadded rows
  media: list[list[int]]  # per token: index of its image / video within the row, -1 for text
  arrays: dict  # pixel_values, image_sizes / image_grid_thw, pixel_values_videos, ...
  family: str

  def hf_inputs(self) -> dict:
    """Keyword inputs of the HF forward besides ids and mask: the media arrays, plus
    mm_token_type_ids (Qwen) or the cumsum positions of padded batches (LLaVA; HF's forward
    would use arange positions, its generate uses these)."""
    if self.family in QWEN_LIKE:
      return dict(self.arrays, mm_token_type_ids=mm_token_type_ids(self.ids))
    return dict(self.arrays, position_ids=positions_from_mask(self.mask))

  def generate_inputs(self) -> dict:
    """Like hf_inputs without positions (generate derives them from the mask)."""
    kw = self.hf_inputs()
    kw.pop("position_ids", None)
    return kw


def onevision_arrays(model, rng: np.random.Generator, images=(), videos=(), batch_num_images=None):
  """LLaVA-OneVision media: ``images`` (H, W) sizes (tiles padded to the most with random
  values), ``videos`` frame counts (all videos of a batch have the same count, as the video
  processor pads them); token counts from the HF model."""
  arrays: dict = {}
  image_tokens, video_tokens = [], []
  if len(images):
    tiles = max(ov_num_patches(s) for s in images)
    arrays["pixel_values"] = rng.standard_normal(
      (len(images), tiles, 3, CLIP_IMAGE, CLIP_IMAGE)
    ).astype(np.float32)
    arrays["image_sizes"] = np.asarray(images, np.int64).reshape(-1, 2)
    if batch_num_images is not None:
      arrays["batch_num_images"] = np.asarray(batch_num_images, np.int64)
    image_tokens = [len(f) for f in hf_image_features(model, **arrays)]
  if len(videos):
    assert len(set(videos)) == 1, videos
    shape = (len(videos), videos[0], 3, CLIP_IMAGE, CLIP_IMAGE)
    arrays["pixel_values_videos"] = rng.standard_normal(shape).astype(np.float32)
    video_tokens = [len(f) for f in hf_video_features(model, arrays["pixel_values_videos"])]
  return arrays, image_tokens, video_tokens


def ov_num_patches(size: Sequence[int]) -> int:
  """Tiles (anyres crops + base) of a LLaVA-OneVision image alone in its prompt."""
  return int(image_size_to_num_patches(list(size), OV_PINPOINTS, CLIP_IMAGE))


def media_arrays(
  model,
  family: str,
  rng: np.random.Generator,
  images=(),
  videos=(),
  second_per_grid_ts=None,
  batch_num_images=None,
):
  """(HF media arrays, tokens per image, tokens per video) for images / videos in batch order.

  ``images``: a count (LLaVA), (H, W) sizes (LLaVA-NeXT) or (t, h, w) grids (Qwen); ``videos``:
  (t, h, w) grids (Qwen). Token counts come from the grids, or from the HF model (NeXT).
  """
  arrays: dict = {}
  if family == "llava":
    n = images if isinstance(images, int) else len(images)
    if n:
      arrays["pixel_values"] = llava_pixels(rng, n)
    image_tokens = [LLAVA_TOKENS] * n
  elif family == "llava_next":
    image_tokens = []
    if len(images):
      arrays["pixel_values"], arrays["image_sizes"] = llava_next_pixels(rng, images)
      image_tokens = [len(f) for f in hf_image_features(model, **arrays)]
  elif family == "llava_onevision":
    return onevision_arrays(model, rng, images, videos, batch_num_images)
  elif family in INTERNVL:  # images: tiles per image
    tiles = sum(images)
    if tiles:
      arrays["pixel_values"] = llava_pixels(rng, tiles)
    image_tokens = [INTERNVL_TOKENS * n for n in images]
  else:
    image_tokens = qwen_num_tokens(images)
    if len(images):
      arrays["pixel_values"], arrays["image_grid_thw"] = qwen_pixels(rng, images)
  video_tokens = qwen_num_tokens(videos)
  if len(videos):
    assert family in QWEN_LIKE
    arrays["pixel_values_videos"], arrays["video_grid_thw"] = qwen_pixels(rng, videos)
    if second_per_grid_ts is not None:
      arrays["second_per_grid_ts"] = np.asarray(second_per_grid_ts, np.float32)
  return arrays, image_tokens, video_tokens


def make_case(
  model,
  family: str,
  rng: np.random.Generator,
  rows,
  images=(),
  videos=(),
  side: str = "left",
  second_per_grid_ts=None,
  batch_num_images=None,
) -> Case:
  """A padded batch from row specs: ints are runs of random text, "image" / "video" the next
  image / video of ``images`` / ``videos`` (batch order). See `media_arrays`."""
  arrays, image_tokens, video_tokens = media_arrays(
    model, family, rng, images, videos, second_per_grid_ts, batch_num_images
  )
  queues = {"image": list(image_tokens), "video": list(video_tokens)}
  seqs, media = [], []
  for spec in rows:
    spec = [item if isinstance(item, int) else (item, queues[item].pop(0)) for item in spec]
    ids, idx = build_row(rng, spec, family)
    seqs.append(ids)
    media.append(idx)
  assert not queues["image"] and not queues["video"], "unused images / videos"
  ids, mask = pad_batch(seqs, side)
  return Case(ids, mask, seqs, media, arrays, family)


def max_diff_valid(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  """max |a - b| over the positions where ``mask`` is set ([B, T, ...] arrays)."""
  m = np.asarray(mask).astype(bool)
  return float(np.max(np.abs(np.asarray(a)[m] - np.asarray(b)[m])))


def mentions(message: str, *numbers: int) -> bool:
  """Whether every number appears in ``message`` as a whole number."""
  found = {int(x) for x in re.findall(r"(?<![\d.])\d+(?![\d.])", message)}
  return all(int(n) in found for n in numbers)


# ---------------------------------------------------------------------------------------------
# transformers references


def _torch(arrays: dict) -> dict:
  out = {}
  for k, v in arrays.items():
    if v is None:
      continue
    a = np.asarray(v)
    out[k] = torch.from_numpy(a.astype(np.float32 if a.dtype.kind == "f" else np.int64))
  return out


@torch.no_grad()
def hf_mm_logits(model, input_ids, attention_mask=None, **arrays) -> np.ndarray:
  """Reference logits [B, T, V] float32 of the HF forward (no cache) on numpy inputs."""
  kw = _torch(dict(input_ids=input_ids, attention_mask=attention_mask, **arrays))
  if hasattr(model.model, "rope_deltas"):
    model.model.rope_deltas = None  # Qwen caches deltas across calls; start afresh
  return model(**kw, use_cache=False).logits.float().numpy()


@torch.no_grad()
def hf_image_features(
  model, pixel_values, image_sizes=None, image_grid_thw=None, batch_num_images=None
):
  """``get_image_features(...).pooler_output`` as a list of [n_i, D] float32 arrays."""
  kw = _torch(
    dict(image_sizes=image_sizes, image_grid_thw=image_grid_thw, batch_num_images=batch_num_images)
  )
  out = model.model.get_image_features(pixel_values=_torch(dict(p=pixel_values))["p"], **kw)
  feats = out.pooler_output
  if isinstance(feats, torch.Tensor):  # LLaVA: one [N, 16, D] tensor
    feats = list(feats)
  return [f.float().numpy() for f in feats]


@torch.no_grad()
def hf_video_features(model, pixel_values_videos, video_grid_thw=None):
  kw = _torch(dict(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw))
  return [f.float().numpy() for f in model.model.get_video_features(**kw).pooler_output]


@torch.no_grad()
def hf_rope_index(model, input_ids, attention_mask=None, **arrays):
  """Qwen ``get_rope_index``: (position_ids [3, B, T] int64, deltas [B, 1] int64)."""
  if arrays.get("mm_token_type_ids") is None:
    arrays["mm_token_type_ids"] = mm_token_type_ids(input_ids)
  kw = _torch(dict(input_ids=input_ids, attention_mask=attention_mask, **arrays))
  pos, deltas = model.model.get_rope_index(**kw)
  return pos.numpy(), deltas.numpy()


@torch.no_grad()
def hf_mm_greedy_generate(model, input_ids, attention_mask, max_new_tokens: int, **arrays):
  """HF greedy generation without EOS on a left-padded batch with its media arrays.

  Returns (tokens, margins): new ids per row (exactly max_new_tokens) and, per row and step,
  the gap between the best and second-best raw logit (to detect fragile near ties).
  """
  ids = np.asarray(input_ids)
  mask = np.asarray(attention_mask)
  assert np.all(mask[:, -1] == 1), "HF generate needs left padding"
  gc = GenerationConfig(
    do_sample=False,
    max_new_tokens=max_new_tokens,
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=1,
    return_dict_in_generate=True,
    output_logits=True,
  )
  saved = model.generation_config.eos_token_id
  model.generation_config.eos_token_id = None  # else generate() falls back to EOS id 2
  if hasattr(model.model, "rope_deltas"):
    model.model.rope_deltas = None
  try:
    out = model.generate(
      **_torch(dict(input_ids=ids, attention_mask=mask, **arrays)), generation_config=gc
    )
  finally:
    model.generation_config.eos_token_id = saved
  new = out.sequences[:, ids.shape[1] :].numpy()
  logits = torch.stack(out.logits, dim=1).float().numpy()  # [B, M, V] raw
  assert new.shape == (len(ids), max_new_tokens), new.shape
  np.testing.assert_array_equal(np.argmax(logits, -1), new)  # no processor changed anything
  top2 = np.sort(logits, axis=-1)[..., -2:]
  return new.tolist(), (top2[..., 1] - top2[..., 0]).tolist()


def respell(src, dst, rules) -> None:
  """A copy of the model directory ``src`` at ``dst`` whose tensor names are rewritten by the
  first matching (old prefix, new prefix) rule: the same checkpoint in another key spelling."""
  import shutil

  from safetensors.numpy import load_file, save_file

  shutil.copytree(src, dst)
  for path in dst.glob("*.safetensors"):
    tensors = load_file(path)
    renamed = {}
    for key, x in tensors.items():
      old = next((o for o, _ in rules if key.startswith(o)), None)
      renamed[key if old is None else dict(rules)[old] + key[len(old) :]] = x
    save_file(renamed, path, metadata={"format": "pt"})


def random_pil(rng: np.random.Generator, h: int, w: int):
  """A random ``h x w`` RGB PIL image."""
  from PIL import Image

  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def copy_model_dir(src, dst) -> None:
  """The files of a saved model directory, copied into ``dst`` (to add processor files)."""
  dst.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())


# ---------------------------------------------------------------------------------------------
# Gemma 3 with images (tests/models/test_gemma3_mm.py)

GEMMA3_TOKENS = 4  # mm_tokens_per_image: the 4x4 SigLIP patch grid average-pooled 2x2
GEMMA3_WINDOW = 8  # the local layers' sliding_window
BOI_ID, EOI_ID = VISION_START_ID, VISION_END_ID  # <start_of_image>, <end_of_image>


def gemma3_mm_config():
  """A tiny ``Gemma3Config``: 3 text layers (local, global, local; window 8), a 2-layer SigLIP
  tower of 32 px images in 8 px patches, 4 tokens an image; embeddings tied (its default)."""
  from transformers import Gemma3Config, Gemma3TextConfig

  text = Gemma3TextConfig(
    **{
      **TEXT,
      "num_hidden_layers": 3,
      "head_dim": 16,
      "query_pre_attn_scalar": 24,
      "sliding_window": GEMMA3_WINDOW,
      "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
      "pad_token_id": 0,
    }
  )
  clip = {k: v for k, v in _CLIP.items() if k != "projection_dim"}
  vision = SiglipVisionConfig(**clip, vision_use_head=False)
  return Gemma3Config(
    text_config=text,
    vision_config=vision,
    mm_tokens_per_image=GEMMA3_TOKENS,
    image_token_index=IMAGE_ID,
    boi_token_index=BOI_ID,
    eoi_token_index=EOI_ID,
  )


def build_gemma3_mm(seed: int) -> torch.nn.Module:
  """A tiny fp32 eager ``Gemma3ForConditionalGeneration`` with random parameters (eval mode;
  `hf_models.randomize_`, then the patch-embedding conv rescaled to N(0, 1/fan_in))."""
  from transformers import Gemma3ForConditionalGeneration

  from hf_models import randomize_

  torch.manual_seed(seed)
  model = Gemma3ForConditionalGeneration._from_config(
    gemma3_mm_config(), attn_implementation="eager", dtype=torch.float32
  )
  randomize_(model, seed)
  with torch.no_grad():
    conv = model.model.vision_tower.embeddings.patch_embedding.weight
    conv.mul_(np.sqrt(conv.shape[1] / np.prod(conv.shape[1:])))
  return model.eval()


def gemma3_case(rng: np.random.Generator, rows, side: str = "left") -> Case:
  """A padded batch as Gemma 3's processor lays it out: ints are runs of random text, "image" is
  ``<start_of_image>``, 4 image tokens and ``<end_of_image>``; random pixels, one image each."""
  seqs, media = [], []
  n = 0
  for spec in rows:
    ids, idx, k = [1], [-1], 0
    for item in spec:
      if isinstance(item, int):
        ids += random_text(rng, item)
        idx += [-1] * item
      else:
        ids += [BOI_ID] + [IMAGE_ID] * GEMMA3_TOKENS + [EOI_ID]
        idx += [-1] + [k] * GEMMA3_TOKENS + [-1]
        k += 1
    seqs.append(ids)
    media.append(idx)
    n += k
  ids, mask = pad_batch(seqs, side)
  arrays = {"pixel_values": llava_pixels(rng, n)} if n else {}
  return Case(ids, mask, seqs, media, arrays, "gemma3")


def gemma3_token_types(ids: np.ndarray) -> np.ndarray:
  """HF Gemma 3's ``token_type_ids``: 1 at image tokens (their bidirectional blocks), else 0."""
  return (np.asarray(ids) == IMAGE_ID).astype(np.int64)


def word_tokenizer(specials: dict[int, str], named: dict[str, str]):
  """A word-level tokenizer for processor tests: ``<pad> <s> </s> <unk>``, then words ``w0,
  w1, ...`` up to the lowest special id, and ``specials`` (id -> text) as special tokens;
  ``named``: the processor's names for some of them (``image_token="<image>"``)."""
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(min(specials) - 4)]
  vocab = {w: i for i, w in enumerate(words)} | {s: i for i, s in specials.items()}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials.values()])
  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<s>",
    eos_token="</s>",
    unk_token="<unk>",
    pad_token="<pad>",
    extra_special_tokens=named,
  )
