"""InternVL 2.5 / 3 in transformers' native format (``InternVLForConditionalGeneration``):
InternViT tower -> pixel shuffle -> LayerNorm + 2-layer projector -> features spliced at the
image-context tokens of a Qwen2 (or Llama) decoder.

The processor cuts each image into tiles (plus a thumbnail) and sends them as one flat
``pixel_values`` ``[tiles, C, S, S]``; every tile becomes ``(S / patch * ratio)^2`` tokens between
``<img>`` and ``</img>``. Which tiles belong to which image is not in its output, so each tile
counts as one image in a batch's ``media_index``. Videos (frames as images, through the video
processor) need torchvision and are not supported here.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmmkv.models import clip, convert, mm
from jmmkv.models.configs import DecoderConfig, decoder_config_from_hf
from jmmkv.models.family import FixedTokens, text_table
from jmmkv.models.layers import Einsum, RMSNorm, activation
from jmmkv.models.llama import Decoder
from jmmkv.typing import Array, DType

TEXT_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclasses.dataclass(frozen=True)
class InternVisionConfig(clip.ClipVisionConfig):
  """An InternViT tower (HF ``InternVLVisionConfig``; defaults are its)."""

  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  patch_size: int = 14
  image_size: int = 448
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  attention_bias: bool = False
  qk_norm: bool = False
  rms_norm: bool = False  # norm_type "rms_norm" (else "layer_norm")
  final_norm: bool = False  # a LayerNorm after the last layer (use_mean_pooling=False)

  @classmethod
  def from_hf(cls, d: dict) -> InternVisionConfig:
    model_type = d.get("model_type", "internvl_vision")
    if model_type != "internvl_vision":
      raise ValueError(f"vision model_type {model_type!r} is not an InternViT tower")
    if d.get("norm_type", "layer_norm") not in ("layer_norm", "rms_norm"):
      raise ValueError(
        f"InternViT norm_type must be layer_norm or rms_norm, got {d['norm_type']!r}"
      )
    if not d.get("use_absolute_position_embeddings", True):
      raise ValueError("InternViT towers without absolute position embeddings are not supported")
    return cls(
      hidden_size=int(d.get("hidden_size", 1024)),
      intermediate_size=int(d.get("intermediate_size", 4096)),
      num_layers=int(d.get("num_hidden_layers", 24)),
      num_heads=int(d.get("num_attention_heads", 16)),
      patch_size=clip.square(d.get("patch_size", 14), "patch_size"),
      image_size=clip.square(d.get("image_size", 448), "image_size"),
      num_channels=int(d.get("num_channels", 3)),
      layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
      hidden_act=str(d.get("hidden_act", "gelu")),
      attention_bias=bool(d.get("attention_bias", False)),
      qk_norm=bool(d.get("use_qk_norm", False)),
      rms_norm=d.get("norm_type", "layer_norm") == "rms_norm",
      final_norm=not d.get("use_mean_pooling", True),
    )


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
  text: DecoderConfig
  vision: InternVisionConfig
  image_token_id: int
  downsample_ratio: float = 0.5
  projector_act: str = "gelu"
  architecture: str = "InternVLForConditionalGeneration"

  def __post_init__(self):
    activation(self.projector_act)
    merge = round(1 / self.downsample_ratio)
    if merge * self.downsample_ratio != 1 or self.vision.grid % merge:
      raise ValueError(
        f"downsample_ratio={self.downsample_ratio} must be 1/n with n dividing the "
        f"{self.vision.grid} patches of a tile side"
      )

  @property
  def merge(self) -> int:  # patches per side merged into one token by the pixel shuffle
    return round(1 / self.downsample_ratio)

  @property
  def tokens_per_tile(self) -> int:
    return (self.vision.grid // self.merge) ** 2


def config_from_hf(cfg: dict, architecture: str) -> InternVLConfig:
  text = cfg.get("text_config") or {}
  text_type = text.get("model_type", "qwen2")
  if text_type not in TEXT_ARCHITECTURES:
    raise ValueError(
      f"InternVL text model_type {text_type!r} is not supported; supported: "
      f"{', '.join(TEXT_ARCHITECTURES)}"
    )
  if cfg.get("vision_feature_select_strategy", "default") != "default":
    raise ValueError(
      "InternVL needs vision_feature_select_strategy='default' (the class token is dropped "
      "before the pixel shuffle)"
    )
  if cfg.get("vision_feature_layer", -1) != -1:
    raise ValueError(
      f"vision_feature_layer={cfg['vision_feature_layer']} is not supported; InternVL uses -1"
    )
  return InternVLConfig(
    text=decoder_config_from_hf(text, TEXT_ARCHITECTURES[text_type]),
    vision=InternVisionConfig.from_hf(cfg.get("vision_config") or {}),
    image_token_id=int(cfg.get("image_token_id", 151667)),
    downsample_ratio=float(cfg.get("downsample_ratio", 0.5)),
    projector_act=cfg.get("projector_hidden_act", "gelu"),
    architecture=architecture,
  )


# ---- the tower ---------------------------------------------------------------------------------


def _norm(c: InternVisionConfig, dt, name: str):
  return (
    RMSNorm(c.layer_norm_eps, dt, name=name)
    if c.rms_norm
    else clip.LayerNorm(c.layer_norm_eps, dt, name=name)
  )


class InternVitLayer(nn.Module):
  """Pre-norm bidirectional MHA (q/k RMS-normed over all heads if configured) and MLP, each
  scaled by a learned per-channel factor (``lambda_1``, ``lambda_2``) before its residual."""

  cfg: InternVisionConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    c, dt = self.cfg, self.dtype
    d, n, h, f = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size
    bias = (n, h) if c.attention_bias else None
    h_BTD = _norm(c, dt, "norm1")(x_BTD)
    q_BTNH = Einsum((d, n, h), bias, dt, name="q_proj")("BTD,DNH->BTNH", h_BTD)
    k_BSNH = Einsum((d, n, h), bias, dt, name="k_proj")("BSD,DNH->BSNH", h_BTD)
    v_BSNH = Einsum((d, n, h), bias, dt, name="v_proj")("BSD,DNH->BSNH", h_BTD)
    if c.qk_norm:  # over the whole projection, all heads together
      b, t = q_BTNH.shape[:2]
      q_BTNH = RMSNorm(1e-6, dt, name="q_norm")(q_BTNH.reshape(b, t, d)).reshape(b, t, n, h)
      k_BSNH = RMSNorm(1e-6, dt, name="k_norm")(k_BSNH.reshape(b, t, d)).reshape(b, t, n, h)
    scores_BNTS = jnp.einsum(
      "BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32
    ) * (h**-0.5)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(dt)
    o_BTNH = jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS, v_BSNH)
    attn_BTD = Einsum((n, h, d), (d,), dt, name="out_proj")("BTNH,NHD->BTD", o_BTNH)
    lam1 = self.param("lambda_1", nn.initializers.ones, (d,), dt)
    lam2 = self.param("lambda_2", nn.initializers.ones, (d,), dt)
    x_BTD = x_BTD + lam1 * attn_BTD
    h_BTD = _norm(c, dt, "norm2")(x_BTD)
    h_BTF = activation(c.hidden_act)(Einsum((d, f), (f,), dt, name="fc1")("BTD,DF->BTF", h_BTD))
    return x_BTD + lam2 * Einsum((f, d), (d,), dt, name="fc2")("BTF,FD->BTD", h_BTF)


class InternVitTower(nn.Module):
  """Patch embedding (conv with bias), class token, learned positions, layers, and the final
  LayerNorm if configured: HF ``last_hidden_state`` ``[B, 1 + P, D]``."""

  cfg: InternVisionConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    c, dt = self.cfg, self.dtype
    d, p = c.hidden_size, c.patch_size
    patches_BPCIJ = clip.patches(pixel_values, c, "InternViT", dt)
    x_BPD = Einsum((c.num_channels, p, p, d), (d,), dt, name="patch_embedding")(
      "BPCIJ,CIJD->BPD", patches_BPCIJ
    )
    init = nn.initializers.normal(0.02)
    cls_D = self.param("cls_token", init, (d,), dt)
    pos_TD = self.param("position_embedding", init, (1 + c.num_patches, d), dt)
    cls_B1D = jnp.broadcast_to(cls_D, (x_BPD.shape[0], 1, d))
    x_BTD = jnp.concatenate([cls_B1D, x_BPD], axis=1) + pos_TD
    for i in range(c.num_layers):
      x_BTD = InternVitLayer(c, dt, name=f"layers_{i}")(x_BTD)
    if c.final_norm:
      x_BTD = clip.LayerNorm(c.layer_norm_eps, dt, name="final_norm")(x_BTD)
    return x_BTD


class Projector(nn.Module):
  """LayerNorm -> linear_1 -> act -> linear_2 over the pixel-shuffled features."""

  cfg: InternVLConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_NPE: Array) -> Array:
    e, d, dt = x_NPE.shape[-1], self.cfg.text.hidden_size, self.dtype
    h_NPE = clip.LayerNorm(1e-5, dt, name="norm")(x_NPE)
    h_NPD = Einsum((e, d), (d,), dt, name="linear_1")("NPE,ED->NPD", h_NPE)
    h_NPD = activation(self.cfg.projector_act)(h_NPD)
    return Einsum((d, d), (d,), dt, name="linear_2")("NPD,DE->NPE", h_NPD)


def pixel_shuffle(x_NXYE: Array, merge: int) -> Array:
  """transformers' InternVL pixel shuffle: ``[N, s, s, E]`` -> ``[N, s/m, s/m, E m^2]``, each
  token the concatenation of an ``m x m`` block (in its own channel order)."""
  n, s, _, e = x_NXYE.shape
  x = x_NXYE.reshape(n, s, s // merge, e * merge).transpose(0, 2, 1, 3)
  return x.reshape(n, s // merge, s // merge, e * merge * merge).transpose(0, 2, 1, 3)


def tile_features(params, pixel_NCSS: Array, cfg: InternVLConfig, dtype) -> Array:
  """Projected features ``[N, tokens_per_tile, D]`` of N tiles."""
  hidden_NTE = InternVitTower(cfg.vision, dtype).apply(params["vision"], pixel_NCSS.astype(dtype))
  g = cfg.vision.grid
  grid_NXYE = hidden_NTE[:, 1:].reshape(-1, g, g, hidden_NTE.shape[-1])
  shuffled = pixel_shuffle(grid_NXYE, cfg.merge)
  x_NPE = shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1])
  return Projector(cfg, dtype).apply(params["projector"], x_NPE)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def image_features(params, pixel_NCSS, *, cfg: InternVLConfig, dtype: str) -> Array:
  """All tiles' tokens in order, ``[N * tokens_per_tile, D]``."""
  feats = tile_features(params, pixel_NCSS, cfg, jnp.dtype(dtype))
  return feats.reshape(-1, feats.shape[-1])


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def embed(params, ids_BT, pixel_NCSS, b_idx, t_idx, *, cfg: InternVLConfig, dtype: str):
  """Token embeddings ``[B, T, D]`` with the tiles' tokens spliced in."""
  x_BTD = Decoder(cfg.text, jnp.dtype(dtype)).apply(params["text"], ids_BT, method=Decoder.embed)
  feats_XD = image_features(params, pixel_NCSS, cfg=cfg, dtype=dtype)
  return mm.splice(x_BTD, feats_XD, b_idx, t_idx)


# ---- checkpoint keys ---------------------------------------------------------------------------

RENAMES = (
  ("model.language_model.", "language_model.model."),
  ("lm_head.", "language_model.lm_head."),
  ("model.vision_tower.", "vision_tower."),
  ("model.multi_modal_projector.", "multi_modal_projector."),
)


def vision_key_table(c: InternVisionConfig, prefix: str) -> dict[str, convert.Entry]:
  d, f, n, h, p, ch = (
    c.hidden_size,
    c.intermediate_size,
    c.num_heads,
    c.head_dim,
    c.patch_size,
    c.num_channels,
  )
  same, t = (lambda x: x), (lambda x: x.T)
  table: dict[str, convert.Entry] = {
    f"{prefix}embeddings.cls_token": (("cls_token",), (1, 1, d), lambda x: x.reshape(d)),
    f"{prefix}embeddings.position_embeddings": (
      ("position_embedding",),
      (1, 1 + c.num_patches, d),
      lambda x: x.reshape(-1, d),
    ),
    f"{prefix}embeddings.patch_embeddings.projection.weight": (
      ("patch_embedding", "w"),
      (d, ch, p, p),
      lambda x: x.transpose(1, 2, 3, 0),
    ),
    f"{prefix}embeddings.patch_embeddings.projection.bias": (("patch_embedding", "b"), (d,), same),
  }
  norms = (("layernorm_before", "norm1"), ("layernorm_after", "norm2"))
  for i in range(c.num_layers):
    hf, ours = f"{prefix}encoder.layer.{i}.", f"layers_{i}"
    for norm, our in norms:
      table[hf + f"{norm}.weight"] = ((ours, our, "scale"), (d,), same)
      if not c.rms_norm:
        table[hf + f"{norm}.bias"] = ((ours, our, "bias"), (d,), same)
    for name in ("q_proj", "k_proj", "v_proj"):
      table[hf + f"attention.{name}.weight"] = (
        (ours, name, "w"),
        (d, d),
        lambda x: x.T.reshape(d, n, h),
      )
      if c.attention_bias:
        table[hf + f"attention.{name}.bias"] = ((ours, name, "b"), (d,), lambda x: x.reshape(n, h))
    if c.qk_norm:
      for name in ("q_norm", "k_norm"):
        table[hf + f"attention.{name}.weight"] = ((ours, name, "scale"), (d,), same)
    table[hf + "attention.projection_layer.weight"] = (
      (ours, "out_proj", "w"),
      (d, d),
      lambda x: x.T.reshape(n, h, d),
    )
    table[hf + "attention.projection_layer.bias"] = ((ours, "out_proj", "b"), (d,), same)
    table[hf + "lambda_1"] = ((ours, "lambda_1"), (d,), same)
    table[hf + "lambda_2"] = ((ours, "lambda_2"), (d,), same)
    table[hf + "mlp.fc1.weight"] = ((ours, "fc1", "w"), (f, d), t)
    table[hf + "mlp.fc1.bias"] = ((ours, "fc1", "b"), (f,), same)
    table[hf + "mlp.fc2.weight"] = ((ours, "fc2", "w"), (d, f), t)
    table[hf + "mlp.fc2.bias"] = ((ours, "fc2", "b"), (d,), same)
  if c.final_norm:
    table[f"{prefix}layernorm.weight"] = (("final_norm", "scale"), (d,), same)
    table[f"{prefix}layernorm.bias"] = (("final_norm", "bias"), (d,), same)
  return table


def key_table(cfg: InternVLConfig) -> dict[str, convert.Entry]:
  table = text_table(cfg.text, "language_model.model.", "language_model.lm_head.weight")
  table.update(convert.nest(vision_key_table(cfg.vision, "vision_tower."), ("vision", "params")))
  e = cfg.vision.hidden_size * cfg.merge**2
  d = cfg.text.hidden_size
  same, t = (lambda x: x), (lambda x: x.T)
  pre = "multi_modal_projector."
  table[pre + "layer_norm.weight"] = (("projector", "params", "norm", "scale"), (e,), same)
  table[pre + "layer_norm.bias"] = (("projector", "params", "norm", "bias"), (e,), same)
  for name, (d_in, d_out) in (("linear_1", (e, d)), ("linear_2", (d, d))):
    table[pre + f"{name}.weight"] = (("projector", "params", name, "w"), (d_out, d_in), t)
    table[pre + f"{name}.bias"] = (("projector", "params", name, "b"), (d_out,), same)
  return table


class InternVLFamily(FixedTokens):
  """InternVL 2.5 / 3, transformers' native format (`jmmkv.models.family`)."""

  name = "InternVL"
  architectures = ("InternVLForConditionalGeneration",)
  tie_default = True  # InternVLConfig's
  config_type = InternVLConfig
  renames = RENAMES

  parse_config = staticmethod(config_from_hf)
  key_table = staticmethod(key_table)

  picture = "tiles"
  features = staticmethod(image_features)
  splice = staticmethod(embed)

  def tokens_per_picture(self, cfg: InternVLConfig) -> int:
    return cfg.tokens_per_tile

  def no_videos(self, model) -> ValueError:
    return ValueError(
      "InternVL videos are frames given as images (its video processor needs torchvision): "
      "pass the frames as images"
    )

  def images_only_processor(self, architecture: str) -> str | None:
    return "InternVLProcessor"


FAMILY = InternVLFamily()
