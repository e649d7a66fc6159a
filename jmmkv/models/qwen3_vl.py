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

from jmmkv.models import convert, mm, qwen2_vl, qwen_vision
from jmmkv.models.configs import decoder_config_from_hf
from jmmkv.models.family import text_table
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
  img_b,
  img_t,
  vid_b,
  vid_t,
  *,
  image_grid,
  video_grid,
  cfg: Qwen3VLConfig,
  dtype: str,
) -> Embedded:
  """Token embeddings with image then video features spliced in (`qwen2_vl.embed`'s arguments),
  and the DeepStack additions ``[L', B, T, D]``; without media, the embeddings alone."""
  x_BTD = Decoder(cfg.text, jnp.dtype(dtype)).apply(params["text"], ids_BT, method=Decoder.embed)
  main, deep, b_idx, t_idx = [], [], [], []
  for pix, grid, b, t in (
    (image_PX, image_grid, img_b, img_t),
    (video_PX, video_grid, vid_b, vid_t),
  ):
    if grid:
      feats, deepstack = qwen2_vl.vision_features(params, pix, grid=grid, cfg=cfg, dtype=dtype)
      main.append(feats)
      deep.append(deepstack)
      b_idx.append(b)
      t_idx.append(t)
  if not main:
    return x_BTD
  b_idx, t_idx = jnp.concatenate(b_idx), jnp.concatenate(t_idx)
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
  architectures = ("Qwen3VLForConditionalGeneration",)
  config_type = Qwen3VLConfig
  tie_default = False  # the top-level flag alone decides, as in transformers

  parse_config = staticmethod(config_from_hf)
  key_table = staticmethod(key_table)
  embed_fn = staticmethod(embed)  # returns an `Embedded` (DeepStack)

  def images_only_processor(self, architecture: str) -> str | None:
    return "Qwen3VLProcessor"

  def video_arrays(self, model, frames: list, fps: float) -> dict:
    raise ValueError(
      "Qwen3-VL videos given as frames need transformers' video processor (torchvision, which "
      "is not installed): pass the processor's input_ids, pixel_values_videos and video_grid_thw"
    )


FAMILY = Qwen3VLFamily()
