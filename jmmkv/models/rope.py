"""Rotary position embedding (rotate-half convention, as HF Llama/Qwen2).

Frequencies are computed on the host in float64 then cast to float32; cos/sin are built in float32
from integer positions, so RoPE of a token depends only on its original prompt position.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jmmkv.models.configs import RopeConfig
from jmmkv.typing import Array


def inv_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse frequencies ``[H // 2]`` for the ``default``, ``linear`` and ``llama3`` rope types."""
  # Computed in float32 like HF (int64 arange -> float), so frequencies match bit for bit.
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(rope.theta) ** exponent)).astype(np.float32)
  if rope.rope_type == "linear":
    inv_freq = inv_freq / np.float32(rope.factor)
  elif rope.rope_type == "llama3":
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
      rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def mrope_axes(mrope_section: tuple[int, ...], interleaved: bool = False) -> np.ndarray:
  """``[H / 2]``: which M-RoPE axis (0 t, 1 h, 2 w) each frequency reads. Qwen2-VL: contiguous
  groups of ``mrope_section`` sizes. Qwen3-VL (``interleaved``): t, h, w in turn over the first
  ``3 * section[1]`` / ``3 * section[2]`` frequencies, t for the rest."""
  if not interleaved:
    return np.repeat(np.arange(len(mrope_section)), mrope_section)
  axis = np.zeros(sum(mrope_section), np.int64)
  for dim in (1, 2):
    axis[dim : 3 * mrope_section[dim] : 3] = dim
  return axis


def cos_sin(
  positions: Array,
  inv_freq: np.ndarray,
  mrope_section: tuple[int, ...] | None = None,
  interleaved: bool = False,
):
  """cos, sin ``[B, T, H]`` in float32 for integer positions ``[B, T]`` or M-RoPE ids ``[3, B, T]``.

  With M-RoPE (Qwen2-VL, Qwen3-VL), frequency j uses the temporal, height or width position
  according to `mrope_axes`. ``[B, T]`` positions mean the same position on all three axes
  (text tokens, and every decoded token).
  """
  inv_freq = jnp.asarray(inv_freq)
  if positions.ndim == 3:
    if mrope_section is None or sum(mrope_section) != inv_freq.shape[0]:
      raise ValueError(
        f"[3, B, T] positions need mrope_section summing to {inv_freq.shape[0]}, "
        f"got {mrope_section}"
      )
    axis_h = mrope_axes(mrope_section, interleaved)  # which axis each frequency reads
    pos_hBT = positions.astype(jnp.float32)[axis_h]
    freqs_BTh = jnp.einsum("hBT,h->BTh", pos_hBT, inv_freq)
  else:
    freqs_BTh = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
  return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


def apply_rope(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
  """Rotates ``x`` ``[B, T, N, H]`` (any head count) by the given angles; keeps x's dtype."""
  half = x_BTNH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
  cos, sin = (
    cos_BTH[:, :, None, :].astype(x_BTNH.dtype),
    sin_BTH[:, :, None, :].astype(x_BTNH.dtype),
  )
  return x_BTNH * cos + rotated * sin
