"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, dense): the Qwen3-VL vision tower (learned
positions resampled to each grid, DeepStack mergers), a Qwen3 decoder (q/k norm) with interleaved
M-RoPE, and DeepStack: the mergers' features of early vision blocks are added to the outputs of
the first decoder layers at the visual tokens (`jmmkv.models.llama.Embedded`).

Videos: the processor writes a timestamp (``<t seconds>``) before each frame's vision span, so
every frame is its own M-RoPE group (`jmmkv.models.mrope`). Videos in prompts need transformers'
video processor (torchvision); without it, give the processor's arrays (``input_ids``,
``pixel_values_videos``, ``video_grid_thw``) to ``model.prepare``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jmmkv import inputs
from jmmkv.models import convert, mm, qwen2_vl, qwen_vision
from jmmkv.models.configs import decoder_config_from_hf
from jmmkv.models.family import embed_text, text_table
from jmmkv.models.llama import Decoder, Embedded
from jmmkv.models.qwen_vision import QwenVisionConfig


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(qwen2_vl.QwenVLConfig):
  variant: str = "qwen3_vl"
  architecture: str = "Qwen3VLForConditionalGeneration"


def config_from_hf(cfg: dict, architecture: str) -> Qwen3VLConfig:
  text = dict(cfg.get("text_config") or {})
  if "num_experts" in text:
    raise ValueError("Qwen3-VL MoE (Qwen3VLMoeForConditionalGeneration) is not supported")
  params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
  params.setdefault("mrope_section", [24, 20, 20])
  # hub configs keep rope_theta beside rope_scaling; transformers' default is 5e5
  params.setdefault("rope_theta", text.get("rope_theta", 500000.0))
  text["rope_parameters"] = params
  text.setdefault("head_dim", 128)  # Qwen3VLTextConfig's default, not hidden / heads
  dec = decoder_config_from_hf(text, "Qwen3ForCausalLM")
  bias = bool(text.get("attention_bias", False))
  dec = dataclasses.replace(dec, qk_norm=True, mrope_interleaved=True, qkv_bias=bias, o_bias=bias)
  return Qwen3VLConfig(
    text=dec,
    vision=QwenVisionConfig.from_hf(
      {"depth": 27, "patch_size": 16, **(cfg.get("vision_config") or {})}, "qwen3_vl"
    ),
    image_token_id=int(cfg.get("image_token_id", 151655)),
    video_token_id=int(cfg.get("video_token_id", 151656)),
    vision_start_token_id=int(cfg.get("vision_start_token_id", 151652)),
    vision_end_token_id=int(cfg.get("vision_end_token_id", 151653)),
    architecture=architecture,
  )


@functools.partial(jax.jit, static_argnames=("image_grid", "video_grid", "cfg", "dtype"))
def embed(
  params,
  ids_BT,
  image_PX,
  video_PX,
  b_idx,
  t_idx,
  *,
  image_grid,
  video_grid,
  cfg: Qwen3VLConfig,
  dtype: str,
) -> Embedded:
  """Token embeddings with image then video features spliced in (``b_idx, t_idx``: image
  placeholders, then video placeholders), and the DeepStack additions ``[L', B, T, D]``."""
  x_BTD = Decoder(cfg.text, jnp.dtype(dtype)).apply(params["text"], ids_BT, method=Decoder.embed)
  main, deep = [], []
  for pix, grid in ((image_PX, image_grid), (video_PX, video_grid)):
    if grid:
      feats, deepstack = qwen2_vl.vision_features(params, pix, grid=grid, cfg=cfg, dtype=dtype)
      main.append(feats)
      deep.append(deepstack)
  x_BTD = mm.splice(x_BTD, jnp.concatenate(main), b_idx, t_idx)
  added = [
    mm.splice(jnp.zeros_like(x_BTD), jnp.concatenate(per_kind), b_idx, t_idx)
    for per_kind in zip(*deep)
  ]
  return Embedded(x_BTD, jnp.stack(added))


def key_table(cfg: Qwen3VLConfig) -> dict[str, convert.Entry]:
  table = text_table(cfg.text, "model.", "lm_head.weight")
  table.update(convert.nest(qwen_vision.key_table(cfg.vision, "visual."), ("vision", "params")))
  return table


class Qwen3VLFamily(qwen2_vl.QwenVLFamily):
  """Qwen3-VL (`jmmkv.models.family`): Qwen2-VL's media handling, DeepStack embeddings."""

  name = "Qwen3-VL"
  tie_default = False  # the top-level flag alone decides, as in transformers
  architectures = ("Qwen3VLForConditionalGeneration",)
  config_type = Qwen3VLConfig

  parse_config = staticmethod(config_from_hf)
  key_table = staticmethod(key_table)

  def embed(self, model, ids_BT, media: inputs.Media, counts):
    img_counts, vid_counts = counts
    c = model.config
    ib, it = mm.placeholder_index(ids_BT, c.image_token_id, sum(img_counts))
    vb, vt = mm.placeholder_index(ids_BT, c.video_token_id, sum(vid_counts), "video")
    if not img_counts and not vid_counts:
      return embed_text(model.params, ids_BT, cfg=c.text, dtype=model.dtype_name)
    igrid = qwen2_vl.grid_of(media.image_grid_thw) if img_counts else ()
    vgrid = qwen2_vl.grid_of(media.video_grid_thw) if vid_counts else ()
    ipix = media.pixel_values if img_counts else np.zeros((0, 1), np.float32)
    vpix = media.pixel_values_videos if vid_counts else np.zeros((0, 1), np.float32)
    return embed(
      model.params,
      ids_BT,
      np.asarray(ipix),
      np.asarray(vpix),
      np.concatenate([ib, vb]),
      np.concatenate([it, vt]),
      image_grid=igrid,
      video_grid=vgrid,
      cfg=c,
      dtype=model.dtype_name,
    )

  def images_only_processor(self, architecture: str) -> str | None:
    return "Qwen3VLProcessor"

  def video_arrays(self, model, frames: list, fps: float) -> dict:
    raise ValueError(
      "Qwen3-VL videos given as frames need transformers' video processor (torchvision, which "
      "is not installed): pass the processor's input_ids, pixel_values_videos and video_grid_thw"
    )


FAMILY = Qwen3VLFamily()
