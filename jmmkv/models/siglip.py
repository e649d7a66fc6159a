"""SigLIP ViT vision tower (LLaVA-OneVision's and Gemma 3's image encoder) in Flax linen.

Matches HF ``SiglipVisionModel(..., output_hidden_states=True)``: ``hidden_states[0]`` is the
patch embeddings plus learned positions (no class token, no pre-LayerNorm), element i the
output of encoder layer i, and ``last_hidden_state`` the post-LayerNorm of the last. The encoder
layers are CLIP's (`jmmkv.models.clip.EncoderLayer`). Towers with the attention-pooling head
(``vision_use_head``) are refused: the multimodal models use the patch features.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jmmkv.models import clip
from jmmkv.models.convert import Entry
from jmmkv.models.layers import Einsum
from jmmkv.typing import Array, DType


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(clip.ClipVisionConfig):
  """A SigLIP vision tower. Defaults are HF ``SiglipVisionConfig``'s (base, patch 16, 224)."""

  patch_size: int = 16
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"

  @classmethod
  def from_hf(cls, d: dict) -> SiglipVisionConfig:
    """From an HF ``vision_config`` dict; missing keys take HF ``SiglipVisionConfig`` defaults."""
    model_type = d.get("model_type", "siglip_vision_model")
    if model_type != "siglip_vision_model":
      raise ValueError(f"vision model_type {model_type!r} is not a SigLIP vision tower")
    if d.get("vision_use_head", True):
      raise ValueError(
        "SigLIP towers with the attention-pooling head (vision_use_head=true) are not supported"
      )
    return cls(
      hidden_size=int(d.get("hidden_size", 768)),
      intermediate_size=int(d.get("intermediate_size", 3072)),
      num_layers=int(d.get("num_hidden_layers", 12)),
      num_heads=int(d.get("num_attention_heads", 12)),
      patch_size=clip.square(d.get("patch_size", 16), "patch_size"),
      image_size=clip.square(d.get("image_size", 224), "image_size"),
      num_channels=int(d.get("num_channels", 3)),
      layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
      hidden_act=str(d.get("hidden_act", "gelu_pytorch_tanh")),
    )


class SiglipVisionTower(nn.Module):
  """Patch embedding (a stride-``patch_size`` conv with bias), learned positions, encoder
  layers; `last_hidden` adds the post-LayerNorm."""

  cfg: SiglipVisionConfig
  dtype: DType = jnp.float32

  def setup(self):
    c, dt = self.cfg, self.dtype
    d, p = c.hidden_size, c.patch_size
    self.patch_embedding = Einsum((c.num_channels, p, p, d), (d,), dt)
    init = nn.initializers.normal(0.02)
    self.position_embedding = self.param("position_embedding", init, (c.num_patches, d), dt)
    self.layers = [clip.EncoderLayer(c, dt, name=f"layers_{i}") for i in range(c.num_layers)]
    self.post_norm = clip.LayerNorm(c.layer_norm_eps, dt)

  def embed(self, pixel_values: Array) -> Array:
    """``[B, C, image_size, image_size]`` pixels -> embeddings ``[B, P, D]``."""
    patches_BPCIJ = clip.patches(pixel_values, self.cfg, "SigLIP", self.dtype)
    return self.patch_embedding("BPCIJ,CIJD->BPD", patches_BPCIJ) + self.position_embedding

  def __call__(self, pixel_values: Array, num_layers: int | None = None) -> list[Array]:
    """Hidden states: ``num_layers + 1`` arrays ``[B, P, D]`` (all layers by default;
    ``num_layers`` static)."""
    hidden = clip.hidden_states(self.layers, self.embed(pixel_values), num_layers)
    if self.is_initializing():  # create the post_norm params too
      self.post_norm(hidden[-1])
    return hidden

  def last_hidden(self, pixel_values: Array) -> Array:
    """HF ``last_hidden_state``: the post-LayerNorm of the last layer, ``[B, P, D]``."""
    return self.post_norm(self(pixel_values)[-1])


def init_params(cfg: SiglipVisionConfig, rng: Array, dtype: DType = jnp.float32):
  """Random params in the layout `key_table` loads into: ``{"params": ...}``."""
  pix = jnp.zeros((1, cfg.num_channels, cfg.image_size, cfg.image_size), dtype)
  return SiglipVisionTower(cfg, dtype).init(rng, pix)


def key_table(cfg: SiglipVisionConfig, prefix: str) -> dict[str, Entry]:
  """HF tensor name -> (param path under the tower's params, HF shape, transform); ``prefix``
  is what precedes ``embeddings.patch_embedding.weight``."""
  d, ch, p = cfg.hidden_size, cfg.num_channels, cfg.patch_size
  same = lambda x: x
  table: dict[str, Entry] = {
    f"{prefix}embeddings.patch_embedding.weight": (
      ("patch_embedding", "w"),
      (d, ch, p, p),
      lambda x: x.transpose(1, 2, 3, 0),
    ),
    f"{prefix}embeddings.patch_embedding.bias": (("patch_embedding", "b"), (d,), same),
    f"{prefix}embeddings.position_embedding.weight": (
      ("position_embedding",),
      (cfg.num_patches, d),
      same,
    ),
    f"{prefix}post_layernorm.weight": (("post_norm", "scale"), (d,), same),
    f"{prefix}post_layernorm.bias": (("post_norm", "bias"), (d,), same),
  }
  table.update(clip.layer_key_table(cfg, prefix))
  return table
