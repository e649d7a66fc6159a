"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers (patch embed, ViT blocks with 2-D RoPE, patch
merger; Qwen3-VL adds learned positions resampled to each grid and DeepStack mergers).

Equal to HF ``model.model.visual(pixel_values, grid_thw=...).pooler_output`` (and, for Qwen3-VL,
its ``deepstack_features``). ``grid_thw`` is a
static tuple of ``(t, h, w)`` patch grids; the indices it implies (rotary ids, per-frame attention
segments, Qwen2.5-VL windows and their permutation) come from `qwen_vision_layout` on the host.

Attention here is dense over all P patches with a boolean same-segment mask (segments never see
each other; memory O(N P^2)): fine for a few images, to be replaced by a segment-blockwise kernel.
Dimension key (see `jmmkv.typing`): P patches in compute order, S the same patches as keys,
X flattened pixels of one patch (C * tp * p * p), T merged tokens (P / merge**2), E merged width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jmmkv.models import qwen_vision_layout as vl
from jmmkv.models.convert import Entry
from jmmkv.models.layers import activation, Einsum, RMSNorm
from jmmkv.typing import Array, DType

VARIANTS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
  """A Qwen2-VL (LayerNorm, fc1/fc2 MLP) or Qwen2.5-VL (RMSNorm, SwiGLU, windows) vision tower."""

  variant: str
  depth: int
  embed_dim: int  # D: Qwen2-VL `embed_dim`, Qwen2.5-VL `hidden_size`
  num_heads: int  # N
  intermediate_size: int  # F: Qwen2-VL `embed_dim * mlp_ratio`
  out_hidden_size: int  # Qwen2-VL `hidden_size`, Qwen2.5-VL `out_hidden_size` (the text width)
  hidden_act: str
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  window_size: int | None = None  # Qwen2.5-VL only (pixels)
  fullatt_block_indexes: tuple[int, ...] = ()  # Qwen2.5-VL blocks without windows
  norm_eps: float = 1e-6  # hard-coded in HF
  rope_theta: float = 10000.0
  num_position_embeddings: int = 0  # Qwen3-VL: a learned square grid of positions
  deepstack_indexes: tuple[int, ...] = ()  # Qwen3-VL blocks whose output feeds a DeepStack merger

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown variant {self.variant!r}; known: {', '.join(VARIANTS)}")
    activation(self.hidden_act)  # raises on an unknown name
    if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
      raise ValueError(f"embed_dim={self.embed_dim} / num_heads={self.num_heads} must be 4k")
    if self.variant == "qwen2_5_vl" and not self.window_size:
      raise ValueError("qwen2_5_vl needs a window_size")
    if self.variant == "qwen3_vl":
      side = round(self.num_position_embeddings**0.5)
      if side < 2 or side * side != self.num_position_embeddings:
        raise ValueError(
          f"num_position_embeddings={self.num_position_embeddings} must be a square of side >= 2"
        )
      if any(not 0 <= i < self.depth for i in self.deepstack_indexes):
        raise ValueError(
          f"deepstack_visual_indexes {self.deepstack_indexes} outside the {self.depth} blocks"
        )

  @property
  def head_dim(self) -> int:  # H
    return self.embed_dim // self.num_heads

  @property
  def patch_pixels(self) -> int:  # X
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merged_dim(self) -> int:  # E
    return self.embed_dim * self.spatial_merge_size**2

  @classmethod
  def from_hf(cls, d: dict[str, Any], variant: str) -> QwenVisionConfig:
    """From an HF ``vision_config`` dict; missing keys take transformers' defaults."""

    def size(key, default):
      x = d.get(key, default)
      if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
          raise ValueError(f"non-square vision {key}={x} is not supported")
        x = x[0]
      return int(x)

    theta = float((d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    common = dict(
      variant=variant,
      depth=int(d.get("depth", 32)),
      num_heads=int(d.get("num_heads", 16)),
      patch_size=size("patch_size", 14),
      temporal_patch_size=size("temporal_patch_size", 2),
      spatial_merge_size=int(d.get("spatial_merge_size", 2)),
      in_channels=int(d.get("in_channels", d.get("in_chans", 3))),
      rope_theta=theta,
    )
    if variant == "qwen2_vl":
      embed = int(d.get("embed_dim", 1280))
      return cls(
        **common,
        embed_dim=embed,
        intermediate_size=int(embed * d.get("mlp_ratio", 4)),
        out_hidden_size=int(d.get("hidden_size", 3584)),
        hidden_act=d.get("hidden_act", "quick_gelu"),
      )
    if variant == "qwen2_5_vl":
      return cls(
        **common,
        embed_dim=int(d.get("hidden_size", 3584)),
        intermediate_size=int(d.get("intermediate_size", 3420)),
        out_hidden_size=int(d.get("out_hidden_size", 3584)),
        hidden_act=d.get("hidden_act", "silu"),
        window_size=int(d.get("window_size", 112)),
        fullatt_block_indexes=tuple(
          int(i) for i in d.get("fullatt_block_indexes", (7, 15, 23, 31))
        ),
      )
    if variant == "qwen3_vl":
      return cls(
        **common,
        embed_dim=int(d.get("hidden_size", 1152)),
        intermediate_size=int(d.get("intermediate_size", 4304)),
        out_hidden_size=int(d.get("out_hidden_size", 3584)),
        hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
        num_position_embeddings=int(d.get("num_position_embeddings", 2304)),
        deepstack_indexes=tuple(int(i) for i in d.get("deepstack_visual_indexes", (8, 16, 24))),
      )
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def cfg_layout(cfg: QwenVisionConfig, grid_thw) -> vl.VisionLayout:
  """The host-side `VisionLayout` of ``grid_thw`` for this tower."""
  window = cfg.window_size if cfg.variant == "qwen2_5_vl" else None
  return vl.layout(vl.as_grid(grid_thw), cfg.spatial_merge_size, window, cfg.patch_size)


def cos_sin(positions_P2: np.ndarray, head_dim: int, theta: float) -> tuple[Array, Array]:
  """Axial 2-D rotary angles, cos/sin ``[P, H]`` in float32: [row freqs, col freqs] twice."""
  quarter = np.arange(0, head_dim // 2, 2, dtype=np.float32) / np.float32(head_dim // 2)
  inv_freq = (1.0 / np.float32(theta) ** quarter).astype(np.float32)
  freqs_P2h = jnp.asarray(positions_P2, jnp.float32)[..., None] * inv_freq
  freqs_Ph = freqs_P2h.reshape(positions_P2.shape[0], -1)
  emb_PH = jnp.concatenate([freqs_Ph, freqs_Ph], axis=-1)
  return jnp.cos(emb_PH), jnp.sin(emb_PH)


def _rotate(x_PNH: Array, cos_PH: Array, sin_PH: Array) -> Array:
  """Rotate-half RoPE computed in float32, cast back to x's dtype."""
  x = x_PNH.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos_PH[:, None] + rotated * sin_PH[:, None]).astype(x_PNH.dtype)


def _norm(cfg: QwenVisionConfig, dtype: DType, name: str) -> nn.Module:
  if cfg.variant != "qwen2_5_vl":
    return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype, param_dtype=dtype, name=name)
  return RMSNorm(cfg.norm_eps, dtype, name=name)


class VisionBlock(nn.Module):
  """Pre-norm bidirectional attention (restricted by ``mask_PS``) + MLP."""

  cfg: QwenVisionConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_PD: Array, cos_PH: Array, sin_PH: Array, mask_PS: Array) -> Array:
    c, dt = self.cfg, self.dtype
    d, n, h, f = c.embed_dim, c.num_heads, c.head_dim, c.intermediate_size
    h_PD = _norm(c, dt, "norm1")(x_PD)
    qkv_P3NH = Einsum((d, 3, n, h), (3, n, h), dt, name="qkv")("PD,DJNH->PJNH", h_PD)  # J: q/k/v
    q_PNH, k_SNH, v_SNH = (qkv_P3NH[:, j] for j in range(3))
    q_PNH, k_SNH = _rotate(q_PNH, cos_PH, sin_PH), _rotate(k_SNH, cos_PH, sin_PH)
    s_NPS = jnp.einsum("PNH,SNH->NPS", q_PNH, k_SNH, preferred_element_type=jnp.float32)
    s_NPS = jnp.where(mask_PS[None], s_NPS * h**-0.5, jnp.finfo(jnp.float32).min)
    p_NPS = jax.nn.softmax(s_NPS, axis=-1).astype(dt)
    o_PNH = jnp.einsum("NPS,SNH->PNH", p_NPS, v_SNH)
    x_PD = x_PD + Einsum((n, h, d), (d,), dt, name="proj")("PNH,NHD->PD", o_PNH)

    h_PD = _norm(c, dt, "norm2")(x_PD)
    act = activation(c.hidden_act)
    if c.variant != "qwen2_5_vl":
      a_PF = act(Einsum((d, f), (f,), dt, name="fc1")("PD,DF->PF", h_PD))
      return x_PD + Einsum((f, d), (d,), dt, name="fc2")("PF,FD->PD", a_PF)
    gate_PF = act(Einsum((d, f), (f,), dt, name="gate_proj")("PD,DF->PF", h_PD))
    up_PF = Einsum((d, f), (f,), dt, name="up_proj")("PD,DF->PF", h_PD)
    return x_PD + Einsum((f, d), (d,), dt, name="down_proj")("PF,FD->PD", gate_PF * up_PF)


class PatchMerger(nn.Module):
  """Norm, then each merge**2 consecutive patches -> one token: Linear -> GELU -> Linear.
  ``postshuffle`` (Qwen3-VL's DeepStack mergers): the norm comes after the merge, over ``E``."""

  cfg: QwenVisionConfig
  dtype: DType = jnp.float32
  postshuffle: bool = False

  @nn.compact
  def __call__(self, x_PD: Array) -> Array:
    c, dt, e = self.cfg, self.dtype, self.cfg.merged_dim
    if self.postshuffle:
      x_TE = _norm(c, dt, "ln_q")(x_PD.reshape(-1, e))
    else:
      x_TE = _norm(c, dt, "ln_q")(x_PD).reshape(-1, e)
    a_TF = jax.nn.gelu(Einsum((e, e), (e,), dt, name="fc1")("TE,EF->TF", x_TE), approximate=False)
    return Einsum((e, c.out_hidden_size), (c.out_hidden_size,), dt, name="fc2")("TF,FD->TD", a_TF)


class QwenVisionTower(nn.Module):
  """Qwen2-VL / Qwen2.5-VL vision transformer (params: patch_embed, blocks_{i}, merger)."""

  cfg: QwenVisionConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, pixel_values_PX: Array, grid_thw):
    """Flat patches ``[sum(t*h*w), C*tp*p*p]`` (processor order) -> tokens ``[P / merge**2,
    out_hidden_size]`` in processor order. ``grid_thw`` must be static (a tuple of triples).
    Qwen3-VL returns (tokens, DeepStack tokens: one ``[P / merge**2, out_hidden_size]`` per
    `deepstack_indexes` entry)."""
    c, dt = self.cfg, self.dtype
    lay = cfg_layout(c, grid_thw)
    p = vl.num_patches(vl.as_grid(grid_thw))
    if pixel_values_PX.shape != (p, c.patch_pixels):
      raise ValueError(
        f"pixel_values has shape {pixel_values_PX.shape}, expected ({p}, {c.patch_pixels}) "
        f"for grid_thw={grid_thw}"
      )
    qwen3 = c.variant == "qwen3_vl"
    bias = (c.embed_dim,) if qwen3 else None
    embed = Einsum((c.patch_pixels, c.embed_dim), bias, dt, name="patch_embed")
    x_PD = embed("PX,XD->PD", pixel_values_PX.astype(dt))
    if qwen3:  # learned positions, resampled bilinearly to each frame's grid
      init = nn.initializers.normal(0.02)
      table_RD = self.param("pos_embed", init, (c.num_position_embeddings, c.embed_dim), dt)
      side = round(c.num_position_embeddings**0.5)
      taps_P4, w_P4 = vl.position_taps(vl.as_grid(grid_thw), c.spatial_merge_size, side)
      pos_PD = jnp.einsum("PK,PKD->PD", jnp.asarray(w_P4), table_RD[taps_P4].astype(jnp.float32))
      x_PD = x_PD + pos_PD.astype(x_PD.dtype)
    if lay.order_P is not None:
      x_PD = x_PD[lay.order_P]
    cos_PH, sin_PH = cos_sin(lay.positions_P2, c.head_dim, c.rope_theta)
    frames_P = jnp.asarray(lay.frames_P)
    full_PS = frames_P[:, None] == frames_P[None, :]
    window_PS = full_PS
    if lay.windows_P is not None:
      windows_P = jnp.asarray(lay.windows_P)
      window_PS = windows_P[:, None] == windows_P[None, :]
    deep = []
    for i in range(c.depth):
      mask_PS = (
        full_PS if (c.variant != "qwen2_5_vl" or i in c.fullatt_block_indexes) else window_PS
      )
      x_PD = VisionBlock(c, dt, name=f"blocks_{i}")(x_PD, cos_PH, sin_PH, mask_PS)
      if i in c.deepstack_indexes:
        j = c.deepstack_indexes.index(i)
        deep.append(PatchMerger(c, dt, postshuffle=True, name=f"deepstack_{j}")(x_PD))
    out_TD = PatchMerger(c, dt, name="merger")(x_PD)
    if lay.restore_T is not None:
      out_TD = out_TD[lay.restore_T]
    return (out_TD, deep) if qwen3 else out_TD


def key_table(cfg: QwenVisionConfig, prefix: str = "visual.") -> dict[str, Entry]:
  """HF key -> (param path under the tower root, HF shape, transform to our layout).

  transformers v5 saves ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VL...`` vision weights
  under ``visual.`` (the original checkpoint naming), not ``model.visual.``.
  """
  c = cfg
  d, n, h, f = c.embed_dim, c.num_heads, c.head_dim, c.intermediate_size
  e, o = c.merged_dim, c.out_hidden_size
  same, t = (lambda x: x), (lambda x: x.T)
  patch_shape = (d, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
  qwen3 = c.variant == "qwen3_vl"
  table: dict[str, Entry] = {
    f"{prefix}patch_embed.proj.weight": (
      ("patch_embed", "w"),
      patch_shape,
      lambda x: x.reshape(d, -1).T,
    ),
  }
  mergers = [("merger", "merger", False)]
  mergers += [
    (f"deepstack_merger_list.{j}", f"deepstack_{j}", True) for j in range(len(c.deepstack_indexes))
  ]
  norms = []
  for hf, ours, post in mergers:
    fc1, fc2 = ("linear_fc1", "linear_fc2") if qwen3 else ("mlp.0", "mlp.2")
    table[f"{prefix}{hf}.{fc1}.weight"] = ((ours, "fc1", "w"), (e, e), t)
    table[f"{prefix}{hf}.{fc1}.bias"] = ((ours, "fc1", "b"), (e,), same)
    table[f"{prefix}{hf}.{fc2}.weight"] = ((ours, "fc2", "w"), (o, e), t)
    table[f"{prefix}{hf}.{fc2}.bias"] = ((ours, "fc2", "b"), (o,), same)
    norms.append((f"{hf}.norm" if qwen3 else f"{hf}.ln_q", (ours, "ln_q"), e if post else d))
  if qwen3:
    table[f"{prefix}patch_embed.proj.bias"] = (("patch_embed", "b"), (d,), same)
    table[f"{prefix}pos_embed.weight"] = (("pos_embed",), (c.num_position_embeddings, d), same)
  if c.variant == "qwen2_vl":
    mlp = [("fc1", "fc1", (f, d)), ("fc2", "fc2", (d, f))]
  elif qwen3:
    mlp = [("linear_fc1", "fc1", (f, d)), ("linear_fc2", "fc2", (d, f))]
  else:
    mlp = [
      (n, n, shape)
      for n, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f)))
    ]
  for i in range(c.depth):
    hf, ours = f"{prefix}blocks.{i}.", f"blocks_{i}"
    norms += [(f"blocks.{i}.norm1", (ours, "norm1"), d), (f"blocks.{i}.norm2", (ours, "norm2"), d)]
    table.update(
      {
        hf + "attn.qkv.weight": ((ours, "qkv", "w"), (3 * d, d), lambda x: x.T.reshape(d, 3, n, h)),
        hf + "attn.qkv.bias": ((ours, "qkv", "b"), (3 * d,), lambda x: x.reshape(3, n, h)),
        hf + "attn.proj.weight": ((ours, "proj", "w"), (d, d), lambda x: x.T.reshape(n, h, d)),
        hf + "attn.proj.bias": ((ours, "proj", "b"), (d,), same),
      }
    )
    for hf_name, name, shape in mlp:
      table[hf + f"mlp.{hf_name}.weight"] = ((ours, name, "w"), shape, t)
      table[hf + f"mlp.{hf_name}.bias"] = ((ours, name, "b"), (shape[0],), same)
  for hf, ours, width in norms:
    table[f"{prefix}{hf}.weight"] = ((*ours, "scale"), (width,), same)
    if c.variant != "qwen2_5_vl":
      table[f"{prefix}{hf}.bias"] = ((*ours, "bias"), (width,), same)
  return table
