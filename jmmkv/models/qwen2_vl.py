"""Qwen2-VL and Qwen2.5-VL: the Qwen vision transformer, features spliced at image/video tokens,
and a Qwen2 decoder with M-RoPE whose [3, B, T] position ids are computed on the host (`mrope`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jmmkv import inputs
from jmmkv.models import convert, mm, mrope, processing, qwen_vision
from jmmkv.models.family import Multimodal, text_table
from jmmkv.models.configs import DecoderConfig, decoder_config_from_hf
from jmmkv.models.llama import Decoder
from jmmkv.models.qwen_vision import QwenVisionConfig, QwenVisionTower

VARIANTS = {
  "Qwen2VLForConditionalGeneration": "qwen2_vl",
  "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
  text: DecoderConfig
  vision: QwenVisionConfig
  image_token_id: int
  video_token_id: int
  vision_start_token_id: int
  vision_end_token_id: int
  variant: str = "qwen2_vl"
  tokens_per_second: float | None = None  # Qwen2.5-VL: temporal position ids per second of video
  architecture: str = "Qwen2VLForConditionalGeneration"

  @property
  def merge(self) -> int:
    return self.vision.spatial_merge_size


def config_from_hf(cfg: dict, architecture: str) -> QwenVLConfig:
  variant = VARIANTS[architecture]
  text = dict(cfg.get("text_config") or cfg)
  text.setdefault("vocab_size", cfg.get("vocab_size"))
  vision = cfg["vision_config"]
  tps = vision.get("tokens_per_second", cfg.get("tokens_per_second"))
  return QwenVLConfig(
    text=decoder_config_from_hf(text, architecture),
    vision=QwenVisionConfig.from_hf(vision, variant),
    image_token_id=int(cfg["image_token_id"]),
    video_token_id=int(cfg["video_token_id"]),
    vision_start_token_id=int(cfg["vision_start_token_id"]),
    vision_end_token_id=int(cfg["vision_end_token_id"]),
    variant=variant,
    tokens_per_second=None if tps is None else float(tps),
    architecture=architecture,
  )


def grid_of(grid_thw) -> tuple[tuple[int, int, int], ...]:
  return tuple(tuple(int(x) for x in g) for g in np.asarray(grid_thw).reshape(-1, 3))


def num_features(cfg: QwenVLConfig, grid) -> list[int]:
  return [t * h * w // cfg.merge**2 for t, h, w in grid]


def check_pixels(cfg: QwenVLConfig, pixel_values, grid, name: str) -> np.ndarray:
  v = cfg.vision
  width = v.in_channels * v.temporal_patch_size * v.patch_size**2
  rows = sum(t * h * w for t, h, w in grid)
  pix = np.asarray(pixel_values)
  if pix.shape != (rows, width):
    raise ValueError(
      f"{name} must have shape [{rows}, {width}] for grid {list(grid)}, got shape {pix.shape}"
    )
  for t, h, w in grid:
    if h % cfg.merge or w % cfg.merge:
      raise ValueError(f"grid (t, h, w) = {(t, h, w)}: h and w must be multiples of {cfg.merge}")
  return pix


@functools.partial(jax.jit, static_argnames=("grid", "cfg", "dtype"))
def vision_features(params, pixel_PX, *, grid, cfg: QwenVLConfig, dtype: str):
  """Merged features ``[sum(t*h*w) / merge**2, D]`` of the images (or videos) of ``grid``
  (Qwen3-VL: and its DeepStack features, a list of such arrays)."""
  tower = QwenVisionTower(cfg.vision, jnp.dtype(dtype))
  return tower.apply(params["vision"], pixel_PX.astype(jnp.dtype(dtype)), grid)


@functools.partial(jax.jit, static_argnames=("image_grid", "video_grid", "cfg", "dtype"))
def embed(
  params,
  ids_BT,
  image_PX,
  video_PX,
  img_b,
  img_t,
  vid_b,
  vid_t,
  *,
  image_grid,
  video_grid,
  cfg: QwenVLConfig,
  dtype: str,
):
  """Token embeddings ``[B, T, D]`` with image and video features spliced in."""
  x_BTD = Decoder(cfg.text, jnp.dtype(dtype)).apply(params["text"], ids_BT, method=Decoder.embed)
  if image_grid:
    feats = vision_features(params, image_PX, grid=image_grid, cfg=cfg, dtype=dtype)
    x_BTD = mm.splice(x_BTD, feats, img_b, img_t)
  if video_grid:
    feats = vision_features(params, video_PX, grid=video_grid, cfg=cfg, dtype=dtype)
    x_BTD = mm.splice(x_BTD, feats, vid_b, vid_t)
  return x_BTD


def token_types(cfg: QwenVLConfig, ids_BT: np.ndarray) -> np.ndarray:
  """HF ``mm_token_type_ids``: 0 text, 1 image, 2 video."""
  ids_BT = np.asarray(ids_BT)
  return (ids_BT == cfg.image_token_id) * 1 + (ids_BT == cfg.video_token_id) * 2


def rope_index(
  cfg: QwenVLConfig,
  ids_BT,
  mm_token_type_ids=None,
  image_grid_thw=None,
  video_grid_thw=None,
  attention_mask=None,
  second_per_grid_ts=None,
):
  """M-RoPE ids ``[3, B, T]`` and deltas ``[B, 1]``, as HF ``get_rope_index``."""
  types = token_types(cfg, ids_BT) if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
  return mrope.rope_index(
    np.asarray(ids_BT),
    types,
    None if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3),
    None if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3),
    None if attention_mask is None else np.asarray(attention_mask),
    spatial_merge_size=cfg.merge,
    variant=cfg.variant,
    second_per_grid_ts=None if second_per_grid_ts is None else np.asarray(second_per_grid_ts),
    tokens_per_second=cfg.tokens_per_second,
  )


RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))
PROCESSORS = {  # without a video processor when AutoProcessor would need torchvision for one
  "Qwen2VLForConditionalGeneration": "Qwen2VLProcessor",
  "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLProcessor",
}


def key_table(cfg: QwenVLConfig) -> dict[str, convert.Entry]:
  table = text_table(cfg.text, "model.", "lm_head.weight")
  table.update(convert.nest(qwen_vision.key_table(cfg.vision, "visual."), ("vision", "params")))
  return table


class QwenVLFamily(Multimodal):
  """Qwen2-VL and Qwen2.5-VL (`jmmkv.models.family`): images and videos, M-RoPE positions."""

  name = "Qwen2-VL / Qwen2.5-VL"
  architectures = tuple(VARIANTS)
  config_type = QwenVLConfig
  renames = RENAMES
  takes_videos = True

  parse_config = staticmethod(config_from_hf)
  key_table = staticmethod(key_table)
  embed_fn = staticmethod(embed)  # the jitted splice `embed` calls (Qwen3-VL has its own)

  def video_token_id(self, cfg: QwenVLConfig) -> int:
    return cfg.video_token_id

  def media_counts(self, model, media: inputs.Media):
    counts = []
    for pix, grid, name in (
      (media.pixel_values, media.image_grid_thw, "pixel_values"),
      (media.pixel_values_videos, media.video_grid_thw, "pixel_values_videos"),
    ):
      if pix is None:
        counts.append([])
        continue
      if grid is None:
        raise ValueError(f"{name} given without its grid_thw")
      grid = grid_of(grid)
      check_pixels(model.config, pix, grid, name)
      counts.append(num_features(model.config, grid))
    return counts[0], counts[1]

  def _features(self, model, pixel_values, grid_thw, name: str) -> list[np.ndarray]:
    grid = grid_of(grid_thw)
    pix = check_pixels(model.config, pixel_values, grid, name)
    flat = vision_features(model.params, pix, grid=grid, cfg=model.config, dtype=model.dtype_name)
    if isinstance(flat, tuple):  # Qwen3-VL: (tokens, DeepStack tokens)
      flat = flat[0]
    counts = num_features(model.config, grid)
    return np.split(np.asarray(flat, np.float32), np.cumsum(counts)[:-1])

  def image_features(
    self, model, pixel_values, image_sizes=None, image_grid_thw=None, batch_num_images=None
  ):
    return self._features(model, pixel_values, image_grid_thw, "pixel_values")

  def video_features(self, model, pixel_values_videos, video_grid_thw):
    return self._features(model, pixel_values_videos, video_grid_thw, "pixel_values_videos")

  def embed(self, model, ids_BT, media: inputs.Media, counts):
    img_counts, vid_counts = counts
    c = model.config
    ib, it = mm.placeholder_index(ids_BT, c.image_token_id, sum(img_counts))
    vb, vt = mm.placeholder_index(ids_BT, c.video_token_id, sum(vid_counts), "video")
    igrid = grid_of(media.image_grid_thw) if img_counts else ()
    vgrid = grid_of(media.video_grid_thw) if vid_counts else ()
    ipix = media.pixel_values if img_counts else np.zeros((0, 1), np.float32)
    vpix = media.pixel_values_videos if vid_counts else np.zeros((0, 1), np.float32)
    return self.embed_fn(
      model.params,
      ids_BT,
      np.asarray(ipix),
      np.asarray(vpix),
      ib,
      it,
      vb,
      vt,
      image_grid=igrid,
      video_grid=vgrid,
      cfg=c,
      dtype=model.dtype_name,
    )

  def positions(self, model, ids_BT, valid_BT, media: inputs.Media, mm_token_type_ids=None):
    return self.rope_index(
      model,
      ids_BT,
      mm_token_type_ids,
      media.image_grid_thw,
      media.video_grid_thw,
      valid_BT,
      media.second_per_grid_ts,
    )[0]

  def rope_index(self, model, *args, **kwargs):
    return rope_index(model.config, *args, **kwargs)

  def images_only_processor(self, architecture: str) -> str | None:
    return PROCESSORS[architecture]

  def placeholders(self, model, image_mark: str, video_mark: str) -> tuple[str, str]:
    c = model.config
    start, end, image, video = model.tokenizer.convert_ids_to_tokens(
      [c.vision_start_token_id, c.vision_end_token_id, c.image_token_id, c.video_token_id]
    )
    return f"{start}{image}{end}", f"{start}{video}{end}"

  def video_arrays(self, model, frames: list, fps: float) -> dict:
    image_processor = model.processor.image_processor
    return processing.video_arrays(image_processor, frames, fps, model.config.variant)


FAMILY = QwenVLFamily()
