"""Gemma 3 with images (``Gemma3ForConditionalGeneration``): SigLIP tower -> average pooling of
the patch grid -> Gemma RMSNorm -> one projection matrix -> features spliced at the image tokens
of a Gemma 3 decoder (`jmmkv.models.gemma3`: local sliding-window and global layers).

The processor expands each ``<start_of_image>`` into ``mm_tokens_per_image`` image tokens between
``<start_of_image>`` and ``<end_of_image>``; every image is one ``[C, S, S]`` picture. In the
prompt forward the image tokens of one contiguous run attend to each other both ways
(`DecoderConfig.bidirectional_images`, transformers' ``token_type_ids`` block mask); everything
else is causal. Gemma 3 takes no videos.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmmkv.models import convert, gemma3, llava, mm, siglip
from jmmkv.models.configs import DecoderConfig
from jmmkv.models.family import FixedTokens, text_table
from jmmkv.models.layers import Einsum, RMSNorm
from jmmkv.models.llama import Decoder
from jmmkv.typing import Array, DType

# transformers' Gemma3TextConfig defaults: the hub's config.json files leave most of them out
TEXT_DEFAULTS = dict(
  vocab_size=262_208,
  hidden_size=2304,
  intermediate_size=9216,
  num_hidden_layers=26,
  num_attention_heads=8,
  num_key_value_heads=4,
  head_dim=256,
  max_position_embeddings=131_072,
  rms_norm_eps=1e-6,
  pad_token_id=0,
  eos_token_id=1,
  bos_token_id=2,
  query_pre_attn_scalar=256,
  sliding_window=4096,
)


@dataclasses.dataclass(frozen=True)
class Gemma3MMConfig:
  text: DecoderConfig
  vision: siglip.SiglipVisionConfig
  mm_tokens_per_image: int = 256
  image_token_id: int = 262_144
  boi_token_id: int = 255_999
  eoi_token_id: int = 256_000
  architecture: str = "Gemma3ForConditionalGeneration"

  def __post_init__(self):
    side = math.isqrt(self.mm_tokens_per_image)
    if side * side != self.mm_tokens_per_image or self.vision.grid % side:
      raise ValueError(
        f"mm_tokens_per_image={self.mm_tokens_per_image} must be the square of a divisor of "
        f"the {self.vision.grid} patches of an image side"
      )

  @property
  def pool(self) -> int:  # patches per side averaged into one token
    return self.vision.grid // math.isqrt(self.mm_tokens_per_image)


def config_from_hf(cfg: dict, architecture: str) -> Gemma3MMConfig:
  text = TEXT_DEFAULTS | dict(cfg.get("text_config") or {})
  text_type = text.get("model_type", "gemma3_text")
  if text_type != "gemma3_text":
    raise ValueError(f"Gemma 3 text model_type must be gemma3_text, got {text_type!r}")
  dec = gemma3.config_from_hf(text, architecture)
  return Gemma3MMConfig(
    text=dataclasses.replace(dec, bidirectional_images=True),
    vision=siglip.SiglipVisionConfig.from_hf(cfg.get("vision_config") or {}),
    mm_tokens_per_image=int(cfg.get("mm_tokens_per_image", 256)),
    image_token_id=int(cfg.get("image_token_index", cfg.get("image_token_id", 262_144))),
    boi_token_id=int(cfg.get("boi_token_index", cfg.get("boi_token_id", 255_999))),
    eoi_token_id=int(cfg.get("eoi_token_index", cfg.get("eoi_token_id", 256_000))),
    architecture=architecture,
  )


# ---- the projector and the features --------------------------------------------------------


class Projector(nn.Module):
  """transformers' ``Gemma3MultiModalProjector``: the ``[g, g]`` patch grid average-pooled over
  ``pool x pool`` blocks, a (1 + w) RMSNorm in float32, then ``x @ mm_input_projection_weight``."""

  cfg: Gemma3MMConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_NPE: Array) -> Array:
    c, dt = self.cfg, self.dtype
    n, _, e = x_NPE.shape
    g, k = c.vision.grid, c.pool
    s = g // k
    blocks = x_NPE.astype(jnp.float32).reshape(n, s, k, s, k, e)
    pooled_NXE = blocks.mean(axis=(2, 4)).reshape(n, s * s, e).astype(dt)
    h_NXE = RMSNorm(c.vision.layer_norm_eps, dt, plus_one=True, name="norm")(pooled_NXE)
    d = c.text.hidden_size
    return Einsum((e, d), None, dt, name="projection")("NXE,ED->NXD", h_NXE)


def _features(params, pixel_NCSS: Array, cfg: Gemma3MMConfig, dtype) -> Array:
  """``[N, mm_tokens_per_image, D]``: the tower's ``last_hidden_state``, projected."""
  tower = siglip.SiglipVisionTower(cfg.vision, dtype)
  hidden_NPE = tower.apply(
    params["vision"], pixel_NCSS.astype(dtype), method=siglip.SiglipVisionTower.last_hidden
  )
  return Projector(cfg, dtype).apply(params["projector"], hidden_NPE)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def image_features(params, pixel_NCSS, *, cfg: Gemma3MMConfig, dtype: str) -> Array:
  """All images' tokens in order, ``[N * mm_tokens_per_image, D]``."""
  feats_NXD = _features(params, pixel_NCSS, cfg, jnp.dtype(dtype))
  return feats_NXD.reshape(-1, feats_NXD.shape[-1])


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def embed(params, ids_BT, pixel_NCSS, b_idx, t_idx, *, cfg: Gemma3MMConfig, dtype: str):
  """Token embeddings ``[B, T, D]`` (scaled by sqrt(D)) with the image tokens spliced in."""
  x_BTD = Decoder(cfg.text, jnp.dtype(dtype)).apply(params["text"], ids_BT, method=Decoder.embed)
  return mm.splice(x_BTD, image_features(params, pixel_NCSS, cfg=cfg, dtype=dtype), b_idx, t_idx)


# ---- checkpoint keys ---------------------------------------------------------------------------


def key_table(cfg: Gemma3MMConfig) -> dict[str, convert.Entry]:
  """Keys in the hub's spelling; `llava.RENAMES` maps transformers 5's onto it."""
  table = text_table(cfg.text, "language_model.model.", "language_model.lm_head.weight")
  table.update(
    convert.nest(siglip.key_table(cfg.vision, "vision_tower.vision_model."), ("vision", "params"))
  )
  e, d, same = cfg.vision.hidden_size, cfg.text.hidden_size, lambda x: x
  pre, ours = "multi_modal_projector.", ("projector", "params")
  table[pre + "mm_soft_emb_norm.weight"] = ((*ours, "norm", "scale"), (e,), same)
  table[pre + "mm_input_projection_weight"] = ((*ours, "projection", "w"), (e, d), same)
  return table


class Gemma3MMFamily(FixedTokens):
  """Gemma 3 with images (`jmmkv.models.family`)."""

  name = "Gemma 3"
  architectures = ("Gemma3ForConditionalGeneration",)
  tie_default = True  # Gemma3Config's
  config_type = Gemma3MMConfig
  renames = llava.RENAMES
  images_per_prompt = True  # the processor takes each prompt's images as one list

  parse_config = staticmethod(config_from_hf)
  key_table = staticmethod(key_table)

  features = staticmethod(image_features)
  splice = staticmethod(embed)

  def tokens_per_picture(self, cfg: Gemma3MMConfig) -> int:
    return cfg.mm_tokens_per_image


FAMILY = Gemma3MMFamily()
