"""CLIP ViT vision tower (the LLaVA-1.5 / LLaVA-NeXT image encoder) in Flax linen.

Matches HF ``CLIPVisionModel(..., output_hidden_states=True).hidden_states``: element 0 is the
embeddings after the pre-LayerNorm, element i the output of encoder layer i. Images are ``B``
(the tower's batch); tokens ``T = 1 + P`` (class token + patches); ``I, J`` index the pixel
row/column inside one patch. Softmax and LayerNorm statistics are computed in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmmkv.models.convert import Entry
from jmmkv.models.layers import ACTIVATIONS, Einsum
from jmmkv.typing import Array, DType


def square(value, name: str) -> int:
  """An int, or a square ``[s, s]`` pair, as an int."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"vision {name} must be square, got {value}")
    value = value[0]
  return int(value)


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
  """A CLIP ViT vision tower. Defaults are HF ``CLIPVisionConfig``'s (ViT-B/32)."""

  hidden_size: int = 768  # D
  intermediate_size: int = 3072  # F
  num_layers: int = 12
  num_heads: int = 12  # N
  patch_size: int = 32
  image_size: int = 224
  num_channels: int = 3  # C
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
        f"unsupported CLIP hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}"
      )
    if not 0 < self.patch_size <= self.image_size:
      raise ValueError(f"patch_size={self.patch_size} must be in (0, image_size={self.image_size}]")

  @property
  def head_dim(self) -> int:  # H
    return self.hidden_size // self.num_heads

  @property
  def grid(self) -> int:
    """Patches per side (the stride-``patch_size`` conv drops any remainder pixels)."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:  # P
    return self.grid**2

  @classmethod
  def from_hf(cls, d: dict) -> ClipVisionConfig:
    """From an HF ``vision_config`` dict; missing keys take HF ``CLIPVisionConfig`` defaults."""
    model_type = d.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
      raise ValueError(f"vision model_type {model_type!r} is not a CLIP vision tower")
    return cls(
      hidden_size=int(d.get("hidden_size", 768)),
      intermediate_size=int(d.get("intermediate_size", 3072)),
      num_layers=int(d.get("num_hidden_layers", 12)),
      num_heads=int(d.get("num_attention_heads", 12)),
      patch_size=square(d.get("patch_size", 32), "patch_size"),
      image_size=square(d.get("image_size", 224), "image_size"),
      num_channels=int(d.get("num_channels", 3)),
      layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
      hidden_act=str(d.get("hidden_act", "quick_gelu")),
    )


def layers_for(cfg: ClipVisionConfig, feature_layers: int | Sequence[int]) -> int:
  """Encoder layers to run so that ``hidden_states[i]`` exists for every HF index ``i``
  (LLaVA's ``vision_feature_layer``, e.g. -2 -> ``num_layers - 1``)."""
  idx = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
  n = cfg.num_layers + 1
  if not idx or any(not -n <= i < n for i in idx):
    raise ValueError(f"vision feature layers {feature_layers} out of range for {n} hidden states")
  return max(i % n for i in idx)


class LayerNorm(nn.Module):
  """torch LayerNorm: statistics, scale and shift in float32, one cast back to ``x.dtype``."""

  eps: float
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), self.dtype)
    bias = self.param("bias", nn.initializers.zeros, (d,), self.dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class EncoderLayer(nn.Module):
  """Pre-norm bidirectional MHA + MLP, each with a residual."""

  cfg: ClipVisionConfig
  dtype: DType = jnp.float32

  def setup(self):
    c, dt = self.cfg, self.dtype
    d, n, h, f = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size
    self.norm1 = LayerNorm(c.layer_norm_eps, dt)
    self.q_proj = Einsum((d, n, h), (n, h), dt)
    self.k_proj = Einsum((d, n, h), (n, h), dt)
    self.v_proj = Einsum((d, n, h), (n, h), dt)
    self.out_proj = Einsum((n, h, d), (d,), dt)
    self.norm2 = LayerNorm(c.layer_norm_eps, dt)
    self.fc1 = Einsum((d, f), (f,), dt)
    self.fc2 = Einsum((f, d), (d,), dt)

  def __call__(self, x_BTD: Array) -> Array:
    h_BTD = self.norm1(x_BTD)
    q_BTNH = self.q_proj("BTD,DNH->BTNH", h_BTD)
    k_BSNH = self.k_proj("BSD,DNH->BSNH", h_BTD)
    v_BSNH = self.v_proj("BSD,DNH->BSNH", h_BTD)
    scores_BNTS = jnp.einsum(
      "BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32
    ) * (self.cfg.head_dim**-0.5)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(self.dtype)
    o_BTNH = jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS, v_BSNH)
    x_BTD = x_BTD + self.out_proj("BTNH,NHD->BTD", o_BTNH)
    h_BTF = ACTIVATIONS[self.cfg.hidden_act](self.fc1("BTD,DF->BTF", self.norm2(x_BTD)))
    return x_BTD + self.fc2("BTF,FD->BTD", h_BTF)


class ClipVisionTower(nn.Module):
  """Patch embedding (a stride-``patch_size`` conv without bias), class token, learned
  positions, pre-LayerNorm, encoder layers. ``post_norm`` is in the params (every checkpoint
  tensor maps somewhere) but only `pooled` uses it: LLaVA takes features from hidden states."""

  cfg: ClipVisionConfig
  dtype: DType = jnp.float32

  def setup(self):
    c, dt = self.cfg, self.dtype
    d, p = c.hidden_size, c.patch_size
    init = nn.initializers.normal(0.02)
    self.class_embedding = self.param("class_embedding", init, (d,), dt)
    self.patch_embedding = Einsum((c.num_channels, p, p, d), None, dt)
    self.position_embedding = self.param("position_embedding", init, (1 + c.num_patches, d), dt)
    self.pre_norm = LayerNorm(c.layer_norm_eps, dt)
    self.layers = [EncoderLayer(c, dt, name=f"layers_{i}") for i in range(c.num_layers)]
    self.post_norm = LayerNorm(c.layer_norm_eps, dt)

  def embed(self, pixel_values: Array) -> Array:
    """``[B, C, image_size, image_size]`` pixels -> pre-normed embeddings ``[B, T, D]``."""
    c = self.cfg
    x_BPD = self.patch_embedding("BPCIJ,CIJD->BPD", patches(pixel_values, c, "CLIP", self.dtype))
    cls_B1D = jnp.broadcast_to(self.class_embedding, (x_BPD.shape[0], 1, c.hidden_size))
    x_BTD = jnp.concatenate([cls_B1D, x_BPD], axis=1) + self.position_embedding
    return self.pre_norm(x_BTD)

  def __call__(self, pixel_values: Array, num_layers: int | None = None) -> list[Array]:
    """Hidden states: ``num_layers + 1`` arrays ``[B, 1 + P, D]`` (all layers by default).

    ``num_layers`` must be static; it runs only the first ``num_layers`` encoder layers.
    """
    hidden = hidden_states(self.layers, self.embed(pixel_values), num_layers)
    if self.is_initializing():  # create the post_norm params too
      self.post_norm(hidden[-1][:, 0])
    return hidden

  def pooled(self, pixel_values: Array) -> Array:
    """HF ``pooler_output``: post-LayerNorm of the last layer's class token, ``[B, D]``."""
    return self.post_norm(self(pixel_values)[-1][:, 0])


def patches(pixel_values: Array, cfg: ClipVisionConfig, tower: str, dtype) -> Array:
  """``[B, C, S, S]`` pixels as ``[B, P, C, patch, patch]`` patches in row-major order (a
  stride-``patch_size`` conv's view; remainder pixels are dropped as the conv drops them)."""
  b, ch, hgt, wid = pixel_values.shape
  if (ch, hgt, wid) != (cfg.num_channels, cfg.image_size, cfg.image_size):
    raise ValueError(
      f"pixel_values of shape {pixel_values.shape}; the {tower} tower expects "
      f"[B, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]"
    )
  g, p = cfg.grid, cfg.patch_size
  x = pixel_values[:, :, : g * p, : g * p].astype(dtype)
  return x.reshape(b, ch, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch, p, p)


def hidden_states(layers, x_BTD: Array, num_layers: int | None) -> list[Array]:
  """The input and the outputs of the first ``num_layers`` (static; all by default) of
  ``layers``."""
  n = len(layers) if num_layers is None else num_layers
  if not 0 <= n <= len(layers):
    raise ValueError(f"num_layers={num_layers} not in [0, {len(layers)}]")
  hidden = [x_BTD]
  for layer in layers[:n]:
    hidden.append(layer(hidden[-1]))
  return hidden


def init_params(cfg: ClipVisionConfig, rng: Array, dtype: DType = jnp.float32):
  """Random params in the layout `key_table` loads into: ``{"params": ...}``."""
  pix = jnp.zeros((1, cfg.num_channels, cfg.image_size, cfg.image_size), dtype)
  return ClipVisionTower(cfg, dtype).init(rng, pix)


def key_table(cfg: ClipVisionConfig, prefix: str) -> dict[str, Entry]:
  """HF tensor name -> (param path under the tower's params, HF shape, transform).

  ``prefix`` is what precedes ``embeddings.class_embedding``: ``"vision_tower.vision_model."``
  in llava-hf hub checkpoints, ``"vision_tower."`` in a transformers-v5 ``save_pretrained`` of a
  model built from a config (see `find_prefix`).
  """
  d, ch, p = cfg.hidden_size, cfg.num_channels, cfg.patch_size
  same = lambda x: x
  table: dict[str, Entry] = {
    f"{prefix}embeddings.class_embedding": (("class_embedding",), (d,), same),
    f"{prefix}embeddings.patch_embedding.weight": (
      ("patch_embedding", "w"),
      (d, ch, p, p),
      lambda x: x.transpose(1, 2, 3, 0),
    ),
    f"{prefix}embeddings.position_embedding.weight": (
      ("position_embedding",),
      (1 + cfg.num_patches, d),
      same,
    ),
  }
  for hf, ours in (("pre_layrnorm", "pre_norm"), ("post_layernorm", "post_norm")):
    table[f"{prefix}{hf}.weight"] = ((ours, "scale"), (d,), same)
    table[f"{prefix}{hf}.bias"] = ((ours, "bias"), (d,), same)
  table.update(layer_key_table(cfg, prefix))
  return table


def layer_key_table(cfg: ClipVisionConfig, prefix: str) -> dict[str, Entry]:
  """The encoder layers' part of `key_table` (CLIP's and SigLIP's names are the same)."""
  d, f, n, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
  same = lambda x: x
  t = lambda x: x.T
  table: dict[str, Entry] = {}
  for i in range(cfg.num_layers):
    hf, ours = f"{prefix}encoder.layers.{i}.", f"layers_{i}"
    for norm, our_norm in (("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
      table[hf + f"{norm}.weight"] = ((ours, our_norm, "scale"), (d,), same)
      table[hf + f"{norm}.bias"] = ((ours, our_norm, "bias"), (d,), same)
    for name in ("q_proj", "k_proj", "v_proj"):
      table[hf + f"self_attn.{name}.weight"] = (
        (ours, name, "w"),
        (d, d),
        lambda x: x.T.reshape(d, n, h),
      )
      table[hf + f"self_attn.{name}.bias"] = ((ours, name, "b"), (d,), lambda x: x.reshape(n, h))
    table[hf + "self_attn.out_proj.weight"] = (
      (ours, "out_proj", "w"),
      (d, d),
      lambda x: x.T.reshape(n, h, d),
    )
    table[hf + "self_attn.out_proj.bias"] = ((ours, "out_proj", "b"), (d,), same)
    table[hf + "mlp.fc1.weight"] = ((ours, "fc1", "w"), (f, d), t)
    table[hf + "mlp.fc1.bias"] = ((ours, "fc1", "b"), (f,), same)
    table[hf + "mlp.fc2.weight"] = ((ours, "fc2", "w"), (d, f), t)
    table[hf + "mlp.fc2.bias"] = ((ours, "fc2", "b"), (d,), same)
  return table


def find_prefix(keys: Iterable[str]) -> str:
  """The vision tower's key prefix in a checkpoint's tensor names (see `key_table`)."""
  suffix = "embeddings.class_embedding"
  found = sorted(k[: -len(suffix)] for k in keys if k.endswith(suffix))
  if len(found) != 1:
    raise ValueError(f"expected one CLIP '*{suffix}' tensor in the checkpoint, found {found}")
  return found[0]


def ignore_outside(prefix: str) -> Callable[[str], bool]:
  """An ``ignore`` for `convert.load_params`: every key outside the tower, and the
  ``embeddings.position_ids`` buffer (not saved by current transformers; older saves had it)."""
  return lambda key: not key.startswith(prefix) or key == f"{prefix}embeddings.position_ids"
