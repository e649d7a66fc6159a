"""LLaVA-1.5 and LLaVA-NeXT: CLIP tower -> 2-layer projector -> features spliced at image tokens.

NeXT ("anyres") cuts each image into tiles chosen from ``image_grid_pinpoints`` plus a downscaled
base image, then packs the tile features row by row with padding removed and an ``image_newline``
after each row (layout computed on the host, see `anyres`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jmmkv import inputs
from jmmkv.models import anyres, clip, convert, mm
from jmmkv.models.clip import ClipVisionConfig, ClipVisionTower
from jmmkv.models.family import Multimodal, embed_text, text_table
from jmmkv.models.configs import DecoderConfig, decoder_config_from_hf
from jmmkv.models.layers import Einsum, activation
from jmmkv.models.llama import Decoder
from jmmkv.typing import Array


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  text: DecoderConfig
  vision: ClipVisionConfig
  image_token_id: int
  feature_layers: tuple[int, ...] = (-2,)  # vision_feature_layer(s); several are concatenated
  select_strategy: str = "default"  # "default" drops the CLS token, "full" keeps it
  projector_bias: bool = True
  projector_act: str = "gelu"
  grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # LLaVA-NeXT only
  architecture: str = "LlavaForConditionalGeneration"

  def __post_init__(self):
    if self.select_strategy not in ("default", "full"):
      raise ValueError(
        f"vision_feature_select_strategy must be 'default' or 'full', got {self.select_strategy!r}"
      )
    if self.is_next and self.select_strategy != "default":
      raise ValueError("LLaVA-NeXT packing needs vision_feature_select_strategy='default'")
    activation(self.projector_act)

  @property
  def is_next(self) -> bool:
    return self.grid_pinpoints is not None

  @property
  def side(self) -> int:  # patches per tile side
    return self.vision.image_size // self.vision.patch_size

  @property
  def tokens_per_tile(self) -> int:  # P
    return self.side**2 + (self.select_strategy == "full")

  @property
  def vision_layers_needed(self) -> int:
    n = self.vision.num_layers
    return max(l if l >= 0 else n + 1 + l for l in self.feature_layers)


def config_from_hf(cfg: dict, architecture: str) -> LlavaConfig:
  text = cfg["text_config"]
  layers = cfg.get("vision_feature_layer", -2)
  pinpoints = cfg.get("image_grid_pinpoints") if "Next" in architecture else None
  return LlavaConfig(
    text=decoder_config_from_hf(text, (text.get("architectures") or ["LlamaForCausalLM"])[0]),
    vision=ClipVisionConfig.from_hf(cfg["vision_config"]),
    image_token_id=int(cfg.get("image_token_id", cfg.get("image_token_index", 32000))),
    feature_layers=tuple(layers) if isinstance(layers, (list, tuple)) else (int(layers),),
    select_strategy=cfg.get("vision_feature_select_strategy", "default"),
    projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
    projector_act=cfg.get("projector_hidden_act", "gelu"),
    grid_pinpoints=tuple(tuple(int(x) for x in p) for p in pinpoints) if pinpoints else None,
    architecture=architecture,
  )


class Projector(nn.Module):
  """linear_1 -> act -> linear_2, from vision width (x feature layers) to text width."""

  d_in: int
  d_out: int
  bias: bool
  act: str
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x_NPE):
    b1, b2 = ((self.d_out,), (self.d_out,)) if self.bias else (None, None)
    h_NPD = Einsum((self.d_in, self.d_out), b1, self.dtype, name="linear_1")("NPE,ED->NPD", x_NPE)
    h_NPD = activation(self.act)(h_NPD)
    return Einsum((self.d_out, self.d_out), b2, self.dtype, name="linear_2")("NPD,DE->NPE", h_NPD)


def projector(cfg, dtype) -> Projector:
  """The projector of a config with LLaVA's fields (``vision``, ``text``, ``feature_layers``,
  ``projector_bias``, ``projector_act``)."""
  d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
  return Projector(d_in, cfg.text.hidden_size, cfg.projector_bias, cfg.projector_act, dtype)


def tile_features(params, pixel_NCHW: Array, cfg: LlavaConfig, dtype) -> Array:
  """Projected features ``[N, P, D]`` of N images (LLaVA-1.5) or tiles (NeXT)."""
  hidden = ClipVisionTower(cfg.vision, dtype).apply(
    params["vision"], pixel_NCHW.astype(dtype), num_layers=cfg.vision_layers_needed
  )
  n = cfg.vision.num_layers
  picked = [hidden[l if l >= 0 else n + 1 + l] for l in cfg.feature_layers]
  if cfg.select_strategy == "default":
    picked = [h[:, 1:] for h in picked]
  return projector(cfg, dtype).apply(params["projector"], jnp.concatenate(picked, axis=-1))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def image_features(params, pixel_NCHW, pack_X, *, cfg: LlavaConfig, dtype: str) -> Array:
  """All image features in order, ``[X, D]``: tiles flattened (1.5) or packed (NeXT, ``pack_X``)."""
  feats_NPD = tile_features(params, pixel_NCHW, cfg, jnp.dtype(dtype))
  flat_XD = feats_NPD.reshape(-1, feats_NPD.shape[-1])
  if not cfg.is_next:
    return flat_XD
  packed = jnp.take(flat_XD, jnp.maximum(pack_X, 0), axis=0)
  newline = params["image_newline"].astype(packed.dtype)
  return jnp.where((pack_X >= 0)[:, None], packed, newline[None, :])


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def embed(params, ids_BT, pixel_NCHW, pack_X, b_idx, t_idx, *, cfg: LlavaConfig, dtype: str):
  """Token embeddings ``[B, T, D]`` with the image features spliced in."""
  dec = Decoder(cfg.text, jnp.dtype(dtype))
  x_BTD = dec.apply(params["text"], ids_BT, method=Decoder.embed)
  feats_XD = image_features(params, pixel_NCHW, pack_X, cfg=cfg, dtype=dtype)
  return mm.splice(x_BTD, feats_XD, b_idx, t_idx)


def layout(cfg: LlavaConfig, pixel_values, image_sizes=None):
  """Host side: pixels as ``[tiles, C, H, W]``, the NeXT pack index, and tokens per image."""
  pix = np.asarray(pixel_values)
  c, s = cfg.vision.num_channels, cfg.vision.image_size
  if not cfg.is_next:
    if pix.ndim != 4 or pix.shape[1:] != (c, s, s):
      raise ValueError(f"pixel_values must have shape [N, {c}, {s}, {s}], got shape {pix.shape}")
    return pix, np.zeros((0,), np.int32), [cfg.tokens_per_tile] * pix.shape[0]
  if image_sizes is None:
    raise ValueError("LLaVA-NeXT needs image_sizes ([N, 2] original (h, w) of each image)")
  sizes = np.asarray(image_sizes).reshape(-1, 2)
  if pix.ndim != 5 or pix.shape[0] != len(sizes) or pix.shape[2:] != (c, s, s):
    raise ValueError(
      f"pixel_values must have shape [{len(sizes)}, max_patches, {c}, {s}, {s}], got shape {pix.shape}"
    )
  counts = [anyres.num_patches(hw, cfg.grid_pinpoints, s) for hw in sizes.tolist()]
  if max(counts) > pix.shape[1]:
    raise ValueError(
      f"pixel_values shape {pix.shape} has fewer patches than image_sizes need ({max(counts)})"
    )
  tiles = np.concatenate([p[:n] for p, n in zip(pix, counts)])
  packs = anyres.pack_index(sizes, cfg.grid_pinpoints, s, cfg.side)
  return tiles, np.concatenate(packs).astype(np.int32), [len(p) for p in packs]


# First match wins. The CLIP tower appears as `vision_tower.vision_model.` (hub checkpoints) or
# `vision_tower.` (transformers 5 saving a model built from a config).
RENAMES = (
  ("model.language_model.", "language_model.model."),
  ("lm_head.", "language_model.lm_head."),
  ("vision_tower.vision_model.", "vision_tower.vision_model."),
  ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
  ("model.vision_tower.", "vision_tower.vision_model."),
  ("vision_tower.", "vision_tower.vision_model."),
  ("model.multi_modal_projector.", "multi_modal_projector."),
  ("model.image_newline", "image_newline"),
)


def projector_table(cfg) -> dict[str, convert.Entry]:
  """The ``multi_modal_projector.`` keys of a config with LLaVA's projector fields."""
  table = {}
  d, e = cfg.text.hidden_size, cfg.vision.hidden_size * len(cfg.feature_layers)
  for name, (d_in, d_out) in (("linear_1", (e, d)), ("linear_2", (d, d))):
    key = f"multi_modal_projector.{name}."
    table[key + "weight"] = (("projector", "params", name, "w"), (d_out, d_in), lambda x: x.T)
    if cfg.projector_bias:
      table[key + "bias"] = (("projector", "params", name, "b"), (d_out,), lambda x: x)
  return table


def key_table(cfg: LlavaConfig) -> dict[str, convert.Entry]:
  table = text_table(cfg.text, "language_model.model.", "language_model.lm_head.weight")
  table.update(
    convert.nest(clip.key_table(cfg.vision, "vision_tower.vision_model."), ("vision", "params"))
  )
  table.update(projector_table(cfg))
  if cfg.is_next:
    table["image_newline"] = (("image_newline",), (cfg.text.hidden_size,), lambda x: x)
  return table


class LlavaFamily(Multimodal):
  """LLaVA-1.5 and LLaVA-NeXT (`jmmkv.models.family`)."""

  name = "LLaVA-1.5 / LLaVA-NeXT"
  architectures = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
  config_type = LlavaConfig
  renames = RENAMES

  parse_config = staticmethod(config_from_hf)
  key_table = staticmethod(key_table)

  def media_counts(self, model, media: inputs.Media):
    if media.pixel_values is None and media.pixel_values_videos is None:
      return [], []
    if media.pixel_values_videos is not None:
      raise self.no_videos(model)
    return layout(model.config, media.pixel_values, media.image_sizes)[2], []

  def image_features(
    self, model, pixel_values, image_sizes=None, image_grid_thw=None, batch_num_images=None
  ):
    pix, pack, counts = layout(model.config, pixel_values, image_sizes)
    flat = image_features(model.params, pix, pack, cfg=model.config, dtype=model.dtype_name)
    return np.split(np.asarray(flat, np.float32), np.cumsum(counts)[:-1])

  def embed(self, model, ids_BT, media: inputs.Media, counts):
    img_counts = counts[0]
    b, t = mm.placeholder_index(ids_BT, model.config.image_token_id, sum(img_counts))
    if not img_counts:
      return embed_text(model.params, ids_BT, cfg=model.text_config, dtype=model.dtype_name)
    pix, pack, _ = layout(model.config, media.pixel_values, media.image_sizes)
    return embed(model.params, ids_BT, pix, pack, b, t, cfg=model.config, dtype=model.dtype_name)


FAMILY = LlavaFamily()
