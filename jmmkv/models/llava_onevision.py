"""LLaVA-OneVision (and LLaVA-Video, which transformers loads as it): SigLIP tower -> LLaVA's
2-layer projector -> features spliced at image and video tokens of a Qwen2 (or Llama) decoder.

Packing, as transformers' ``LlavaOnevisionModel``:
- an image alone in its prompt is cut into anyres tiles plus a base image; its tokens are the base
  tile's features, then the tiles' grid with padding removed, shrunk bilinearly when it holds
  more than about ``anyres_max_N`` tiles' worth of features, with ``image_newline`` after each row;
- an image in a prompt with several (``batch_num_images``) is its base tile and one newline;
- a video is each frame's features pooled bilinearly to half the side (rounded up), all frames,
  then one newline.

All of it depends only on sizes, so the host computes it as four weighted taps per packed token
into the flat tile features (`jmmkv.models.anyres.resize_taps`); one gather does it on device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from jmmkv import inputs
from jmmkv.models import anyres, convert, llava, mm, siglip
from jmmkv.models.configs import DecoderConfig, decoder_config_from_hf
from jmmkv.models.family import Multimodal, embed_text, text_table
from jmmkv.models.layers import activation
from jmmkv.models.llama import Decoder
from jmmkv.typing import Array

TEXT_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
# transformers' LlavaOnevisionConfig defaults, for keys a config.json leaves out
DEFAULT_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
VISION_DEFAULTS = dict(
  hidden_size=1152,
  intermediate_size=4304,
  patch_size=14,
  image_size=384,
  num_hidden_layers=26,
  num_attention_heads=16,
  vision_use_head=False,
)


@dataclasses.dataclass(frozen=True)
class OnevisionConfig:
  text: DecoderConfig
  vision: siglip.SiglipVisionConfig
  image_token_id: int
  video_token_id: int
  grid_pinpoints: tuple[tuple[int, int], ...]
  max_tiles: int = 9  # vision_aspect_ratio "anyres_max_9"
  feature_layers: tuple[int, ...] = (-1,)  # vision_feature_layer(s); several are concatenated
  projector_bias: bool = True
  projector_act: str = "gelu"
  architecture: str = "LlavaOnevisionForConditionalGeneration"

  def __post_init__(self):
    activation(self.projector_act)
    if self.max_tiles < 1:
      raise ValueError(
        f"vision_aspect_ratio must be anyres_max_N with N >= 1, got {self.max_tiles}"
      )

  @property
  def side(self) -> int:  # patches per tile side
    return self.vision.image_size // self.vision.patch_size

  @property
  def pooled_side(self) -> int:  # patches per video frame side after pooling
    return -(-self.side // 2)

  @property
  def vision_layers_needed(self) -> int:
    n = self.vision.num_layers
    return max(l if l >= 0 else n + 1 + l for l in self.feature_layers)


def config_from_hf(cfg: dict, architecture: str) -> OnevisionConfig:
  text = cfg.get("text_config") or {}
  text_type = text.get("model_type", "qwen2")
  if text_type not in TEXT_ARCHITECTURES:
    raise ValueError(
      f"LLaVA-OneVision text model_type {text_type!r} is not supported; supported: "
      f"{', '.join(TEXT_ARCHITECTURES)}"
    )
  strategy = cfg.get("vision_feature_select_strategy", "full")
  if strategy != "full":
    raise ValueError(
      f"vision_feature_select_strategy={strategy!r} is not supported: a SigLIP tower has no "
      "class token, and transformers' anyres packing needs 'full'"
    )
  ratio = str(cfg.get("vision_aspect_ratio", "anyres_max_9"))
  match = re.fullmatch(r"anyres_max_(\d+)", ratio)
  if match is None:
    raise ValueError(f"vision_aspect_ratio must be 'anyres_max_N', got {ratio!r}")
  layers = cfg.get("vision_feature_layer", -1)
  pinpoints = cfg.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
  vision = VISION_DEFAULTS | dict(cfg.get("vision_config") or {})
  return OnevisionConfig(
    text=decoder_config_from_hf(text, TEXT_ARCHITECTURES[text_type]),
    vision=siglip.SiglipVisionConfig.from_hf(vision),
    image_token_id=int(cfg.get("image_token_id", cfg.get("image_token_index", 151646))),
    video_token_id=int(cfg.get("video_token_id", cfg.get("video_token_index", 151647))),
    grid_pinpoints=tuple(tuple(int(x) for x in p) for p in pinpoints),
    max_tiles=int(match.group(1)),
    feature_layers=tuple(layers) if isinstance(layers, (list, tuple)) else (int(layers),),
    projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
    projector_act=cfg.get("projector_hidden_act", "gelu"),
    architecture=architecture,
  )


# ---- host side: which tiles go through the tower, and the packing taps -----------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """The tower's input and how its flat features ``[N * P, D]`` become packed tokens."""

  pixels: np.ndarray  # [N, C, S, S] tiles, then video frames
  image_taps: np.ndarray  # [X_img, 4] int32 rows of the flat features (-1: image_newline)
  image_weights: np.ndarray  # [X_img, 4] float32
  video_taps: np.ndarray  # [X_vid, 4]
  video_weights: np.ndarray  # [X_vid, 4]
  image_counts: list[int]
  video_counts: list[int]


def _newline_rows(taps, weights, rows: int):
  """``rows`` rows of taps with a newline (-1) appended to each."""
  k = taps.shape[-1]
  taps = np.concatenate([taps.reshape(rows, -1, k), np.full((rows, 1, k), -1)], axis=1)
  weights = np.concatenate([weights.reshape(rows, -1, k), np.zeros((rows, 1, k))], axis=1)
  return taps.reshape(-1, k), weights.reshape(-1, k)


def _identity(idx):
  idx = np.asarray(idx).reshape(-1, 1)
  return np.pad(idx, ((0, 0), (0, 3)), constant_values=0), np.pad(
    np.ones_like(idx, np.float32), ((0, 0), (0, 3))
  )


def image_taps(cfg: OnevisionConfig, size_hw, tiles: int, offset: int):
  """Taps of one image whose ``tiles`` tiles (base first) start at flat row ``offset``."""
  s, p = cfg.side, cfg.side**2
  base = _identity(offset + np.arange(p))
  newline = (np.full((1, 4), -1), np.zeros((1, 4)))
  if tiles == 1:
    parts = [base, newline]
  else:
    ph, pw = anyres.best_resolution(size_hw, cfg.grid_pinpoints)
    gh, gw = ph // cfg.vision.image_size, pw // cfg.vision.image_size
    grid = (offset + p + np.arange((tiles - 1) * p)).reshape(gh, gw, s, s)
    grid = anyres.unpad(grid.transpose(0, 2, 1, 3).reshape(gh * s, gw * s), size_hw)
    h, w = grid.shape
    ratio = math.sqrt(h * w / (cfg.max_tiles * s**2))
    if ratio > 1.1:
      h, w = int(h // ratio), int(w // ratio)
      taps = anyres.resize_taps(grid, h, w)
    else:
      taps = _identity(grid)
    parts = [base, _newline_rows(*taps, rows=h)]
  return (
    np.concatenate([t for t, _ in parts]).astype(np.int32),
    np.concatenate([w for _, w in parts]).astype(np.float32),
  )


def layout(cfg: OnevisionConfig, media: inputs.Media) -> Layout:
  """Checks the media arrays' shapes and lays them out (see the module docstring)."""
  c, s, p = cfg.vision.num_channels, cfg.vision.image_size, cfg.side**2
  tiles, taps, weights, counts = [], [], [], []
  offset = 0
  if media.pixel_values is not None:
    pix = np.asarray(media.pixel_values)
    if media.image_sizes is None:
      raise ValueError("LLaVA-OneVision needs image_sizes ([N, 2] original (h, w) of each image)")
    sizes = np.asarray(media.image_sizes).reshape(-1, 2)
    if pix.ndim != 5 or pix.shape[0] != len(sizes) or pix.shape[2:] != (c, s, s):
      raise ValueError(
        f"pixel_values must have shape [{len(sizes)}, max_patches, {c}, {s}, {s}], got shape "
        f"{pix.shape}"
      )
    per_prompt = (
      [1] * len(sizes)
      if media.batch_num_images is None
      else [int(n) for n in np.asarray(media.batch_num_images).reshape(-1)]
    )
    if sum(per_prompt) != len(sizes) or min(per_prompt, default=1) < 1:
      raise ValueError(
        f"batch_num_images {per_prompt} must be positive and add up to the {len(sizes)} images"
      )
    alone = [n == 1 for n in per_prompt for _ in range(n)]
    for i, (size_hw, single) in enumerate(zip(sizes.tolist(), alone)):
      n = anyres.num_patches(size_hw, cfg.grid_pinpoints, s) if single else 1
      if n > pix.shape[1]:
        raise ValueError(
          f"pixel_values shape {pix.shape} has fewer patches than image {i} needs ({n})"
        )
      t, w = image_taps(cfg, size_hw, n, offset)
      tiles.append(pix[i, :n])
      taps.append(t)
      weights.append(w)
      counts.append(len(t))
      offset += n * p
  vtaps, vweights, vcounts = [], [], []
  if media.pixel_values_videos is not None:
    vid = np.asarray(media.pixel_values_videos)
    if vid.ndim != 5 or vid.shape[2:] != (c, s, s):
      raise ValueError(
        f"pixel_values_videos must have shape [videos, frames, {c}, {s}, {s}], got shape "
        f"{vid.shape}"
      )
    q = cfg.pooled_side
    for frames in vid:
      frame_taps = [
        anyres.resize_taps((offset + f * p + np.arange(p)).reshape(cfg.side, cfg.side), q, q)
        for f in range(len(frames))
      ]
      t = np.concatenate([ft for ft, _ in frame_taps] + [np.full((1, 4), -1)])
      w = np.concatenate([fw for _, fw in frame_taps] + [np.zeros((1, 4))])
      tiles.append(frames)
      vtaps.append(t.astype(np.int32))
      vweights.append(w.astype(np.float32))
      vcounts.append(len(t))
      offset += len(frames) * p
  empty = (np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32))
  cat = lambda xs, e: np.concatenate(xs) if xs else e
  return Layout(
    pixels=np.concatenate(tiles) if tiles else np.zeros((0, c, s, s), np.float32),
    image_taps=cat(taps, empty[0]),
    image_weights=cat(weights, empty[1]),
    video_taps=cat(vtaps, empty[0]),
    video_weights=cat(vweights, empty[1]),
    image_counts=counts,
    video_counts=vcounts,
  )


# ---- device side ------------------------------------------------------------------------------


def tile_features(params, pixel_NCSS: Array, cfg: OnevisionConfig, dtype) -> Array:
  """Projected features ``[N * P, D]`` of N tiles / frames, flat."""
  hidden = siglip.SiglipVisionTower(cfg.vision, dtype).apply(
    params["vision"], pixel_NCSS.astype(dtype), num_layers=cfg.vision_layers_needed
  )
  n = cfg.vision.num_layers
  picked = jnp.concatenate([hidden[l if l >= 0 else n + 1 + l] for l in cfg.feature_layers], -1)
  feats_NPD = llava.projector(cfg, dtype).apply(params["projector"], picked)
  return feats_NPD.reshape(-1, feats_NPD.shape[-1])


def pack(flat_XD: Array, taps_YK, weights_YK, newline_D: Array) -> Array:
  """Packed tokens ``[Y, D]``: per token, the weighted sum of its ``K`` taps of the flat
  features, or ``newline_D`` where the first tap is -1."""
  rows_YKD = jnp.take(flat_XD, jnp.maximum(taps_YK, 0), axis=0).astype(jnp.float32)
  out_YD = jnp.einsum("YK,YKD->YD", weights_YK.astype(jnp.float32), rows_YKD)  # weights stay f32
  out_YD = out_YD.astype(flat_XD.dtype)
  return jnp.where((taps_YK[:, :1] >= 0), out_YD, newline_D.astype(out_YD.dtype)[None, :])


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def media_features(params, pixels, img_taps, img_w, vid_taps, vid_w, *, cfg, dtype: str):
  """(image tokens ``[X_img, D]``, video tokens ``[X_vid, D]``) of a `Layout`'s arrays."""
  flat_XD = tile_features(params, pixels, cfg, jnp.dtype(dtype))
  newline = params["image_newline"]
  return pack(flat_XD, img_taps, img_w, newline), pack(flat_XD, vid_taps, vid_w, newline)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def embed(params, ids_BT, pixels, img_taps, img_w, vid_taps, vid_w, b_idx, t_idx, *, cfg, dtype):
  """Token embeddings ``[B, T, D]`` with the image then the video tokens spliced in
  (``b_idx, t_idx``: image placeholders, then video placeholders)."""
  x_BTD = Decoder(cfg.text, jnp.dtype(dtype)).apply(params["text"], ids_BT, method=Decoder.embed)
  img, vid = media_features(params, pixels, img_taps, img_w, vid_taps, vid_w, cfg=cfg, dtype=dtype)
  return mm.splice(x_BTD, jnp.concatenate([img, vid]), b_idx, t_idx)


def key_table(cfg: OnevisionConfig) -> dict[str, convert.Entry]:
  table = text_table(cfg.text, "language_model.model.", "language_model.lm_head.weight")
  table.update(
    convert.nest(siglip.key_table(cfg.vision, "vision_tower.vision_model."), ("vision", "params"))
  )
  table.update(llava.projector_table(cfg))
  table["image_newline"] = (("image_newline",), (cfg.text.hidden_size,), lambda x: x)
  return table


@dataclasses.dataclass(frozen=True)
class FramesProcessor:
  """transformers' LLaVA-OneVision video processor without torchvision: every frame resized to
  the image processor's tile size with PIL (its resample, bicubic by default), rescaled and
  normalised with its mean and std. Frames: PIL images or ``[H, W, 3]`` uint8 arrays."""

  image_processor: object

  def __call__(self, videos, **kwargs) -> dict:
    from PIL import Image

    ip = self.image_processor
    h, w = int(ip.size["height"]), int(ip.size["width"])  # a dict or transformers' SizeDict
    mean = np.asarray(ip.image_mean, np.float32)[:, None, None]
    std = np.asarray(ip.image_std, np.float32)[:, None, None]
    out = []
    for i, frames in enumerate(videos):
      if len(frames) == 0:
        raise ValueError(f"video {i} has no frames")
      pix = []
      for f in frames:
        if not isinstance(f, Image.Image):
          a = np.asarray(f)
          if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(
              f"video {i}: frames must be PIL images or [H, W, 3] uint8 arrays, got "
              f"{a.dtype} {a.shape}"
            )
          f = Image.fromarray(a)
        img = f
        x = np.asarray(img.convert("RGB").resize((w, h), int(ip.resample)), np.float32)
        pix.append((x.transpose(2, 0, 1) * np.float32(ip.rescale_factor) - mean) / std)
      out.append(np.stack(pix))
    if len({v.shape for v in out}) > 1:
      raise ValueError(
        f"the videos of one batch must have the same number of frames, got {[len(v) for v in out]}"
      )
    return {"pixel_values_videos": np.stack(out).astype(np.float32)}


class OnevisionFamily(Multimodal):
  """LLaVA-OneVision / LLaVA-Video (`jmmkv.models.family`)."""

  name = "LLaVA-OneVision / LLaVA-Video"
  architectures = ("LlavaOnevisionForConditionalGeneration",)

  def tied(self, hf_cfg: dict, text_tied: bool) -> bool:
    return bool(hf_cfg.get("tie_word_embeddings", False)) or text_tied  # as its config class

  config_type = OnevisionConfig
  renames = llava.RENAMES
  takes_videos = True
  images_per_prompt = True  # the processor is given each prompt's images as one list

  parse_config = staticmethod(config_from_hf)
  key_table = staticmethod(key_table)

  def video_token_id(self, cfg) -> int | None:
    return cfg.video_token_id

  def images_only_processor(self, architecture: str) -> str | None:
    return "LlavaOnevisionProcessor"

  def frames_processor(self, processor):
    return FramesProcessor(processor.image_processor)

  def media_counts(self, model, media: inputs.Media):
    lay = layout(model.config, media)
    return lay.image_counts, lay.video_counts

  def _features(self, model, media):
    lay = layout(model.config, media)
    img, vid = media_features(
      model.params,
      lay.pixels,
      lay.image_taps,
      lay.image_weights,
      lay.video_taps,
      lay.video_weights,
      cfg=model.config,
      dtype=model.dtype_name,
    )
    split = lambda x, counts: np.split(np.asarray(x, np.float32), np.cumsum(counts)[:-1])
    return split(img, lay.image_counts), split(vid, lay.video_counts)

  def image_features(
    self, model, pixel_values, image_sizes=None, image_grid_thw=None, batch_num_images=None
  ):
    media = inputs.Media(
      pixel_values=pixel_values, image_sizes=image_sizes, batch_num_images=batch_num_images
    )
    return self._features(model, media)[0]

  def video_features(self, model, pixel_values_videos, video_grid_thw=None):
    return self._features(model, inputs.Media(pixel_values_videos=pixel_values_videos))[1]

  def embed(self, model, ids_BT, media: inputs.Media, counts):
    img_counts, vid_counts = counts
    cfg = model.config
    bi, ti = mm.placeholder_index(ids_BT, cfg.image_token_id, sum(img_counts))
    bv, tv = mm.placeholder_index(ids_BT, cfg.video_token_id, sum(vid_counts), "video")
    if not img_counts and not vid_counts:
      return embed_text(model.params, ids_BT, cfg=model.text_config, dtype=model.dtype_name)
    lay = layout(cfg, media)
    return embed(
      model.params,
      ids_BT,
      lay.pixels,
      lay.image_taps,
      lay.image_weights,
      lay.video_taps,
      lay.video_weights,
      np.concatenate([bi, bv]),
      np.concatenate([ti, tv]),
      cfg=cfg,
      dtype=model.dtype_name,
    )


FAMILY = OnevisionFamily()
