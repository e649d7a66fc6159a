"""LLaVA-NeXT "anyres" layout on the host: patch counts and the packing of tile features.

Everything depends only on image sizes, so it is computed with numpy as an index map: entry i of
`pack_index` is the row of the flat tile-feature array ``[sum_patches * P, D]`` that becomes packed
token i, or -1 where the learned ``image_newline`` goes. One gather then does the packing on device.
"""

from __future__ import annotations

import numpy as np


def best_resolution(size_hw: tuple[int, int], pinpoints) -> tuple[int, int]:
  """The pinpoint (h, w) that keeps the most of the image and wastes the least (as HF)."""
  h, w = size_hw
  best, best_eff, best_waste = None, 0, float("inf")
  for ph, pw in pinpoints:
    scale = min(pw / w, ph / h)
    eff = min(int(w * scale) * int(h * scale), w * h)
    waste = pw * ph - eff
    if eff > best_eff or (eff == best_eff and waste < best_waste):
      best, best_eff, best_waste = (ph, pw), eff, waste
  return best


def tile_grid(size_hw, pinpoints, tile: int) -> tuple[int, int]:
  """Number of tiles (rows, cols) an image of ``size_hw`` is cut into."""
  ph, pw = best_resolution(size_hw, pinpoints)
  return -(-ph // tile), -(-pw // tile)


def num_patches(size_hw, pinpoints, tile: int) -> int:
  """Tiles plus the base (downscaled whole) image."""
  gh, gw = tile_grid(size_hw, pinpoints, tile)
  return gh * gw + 1


def unpad(idx_HW: np.ndarray, size_hw) -> np.ndarray:
  """Crops the rows/columns that padding added when the image was resized into the grid."""
  oh, ow = (int(x) for x in size_hw)
  ch, cw = idx_HW.shape
  if ow / oh > cw / ch:
    new_h = int(round(oh * (cw / ow), 7))
    pad = (ch - new_h) // 2
    return idx_HW[pad : ch - pad, :]
  new_w = int(round(ow * (ch / oh), 7))
  pad = (cw - new_w) // 2
  return idx_HW[:, pad : cw - pad]


def pack_index(image_sizes, pinpoints, tile: int, side: int) -> list[np.ndarray]:
  """Per image, the packed-token -> flat-feature index (-1 = newline).

  Args:
    image_sizes: ``[N, 2]`` original (h, w) of each image.
    pinpoints: the model's ``image_grid_pinpoints``.
    tile: the vision tower's input size; side: patches per tile side (P = side**2 features a tile).
  """
  out, offset, p = [], 0, side * side
  for size_hw in np.asarray(image_sizes).tolist():
    n = num_patches(size_hw, pinpoints, tile)
    base = offset * p + np.arange(p)
    if n > 1:
      gh, gw = tile_grid(size_hw, pinpoints, tile)
      grid = ((offset + 1) * p + np.arange((n - 1) * p)).reshape(gh, gw, side, side)
      grid = unpad(grid.transpose(0, 2, 1, 3).reshape(gh * side, gw * side), size_hw)
      grid = np.concatenate([grid, np.full((grid.shape[0], 1), -1)], axis=1)
      out.append(np.concatenate([base, grid.reshape(-1)]))
    else:
      out.append(np.concatenate([base, [-1]]))
    offset += n
  return out


def bilinear_taps(n_in: int, n_out: int):
  """Along one axis, PyTorch's bilinear resize (``align_corners=False``, no antialias): for each
  output index the two source indices and their weights, ``(i0, i1, w0, w1)``, each ``[n_out]``
  (float32 arithmetic, as torch's CPU kernel)."""
  scale = np.float32(n_in) / np.float32(n_out)
  dst = np.arange(n_out, dtype=np.float32)
  src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  i0 = src.astype(np.int64)  # truncation; src >= 0
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, np.minimum(i0 + 1, n_in - 1), (np.float32(1) - w1).astype(np.float32), w1


def resize_taps(idx_HW: np.ndarray, out_h: int, out_w: int):
  """A grid of flat-feature indices resized bilinearly to ``[out_h, out_w]``, as four weighted
  taps per output cell: (indices ``[out_h * out_w, 4]``, weights ``[out_h * out_w, 4]``)."""
  y0, y1, wy0, wy1 = bilinear_taps(idx_HW.shape[0], out_h)
  x0, x1, wx0, wx1 = bilinear_taps(idx_HW.shape[1], out_w)
  ys, xs = (y0, y0, y1, y1), (x0, x1, x0, x1)
  wys, wxs = (wy0, wy0, wy1, wy1), (wx0, wx1, wx0, wx1)
  idx = np.stack([idx_HW[y[:, None], x[None, :]] for y, x in zip(ys, xs)], axis=-1)
  w = np.stack([wy[:, None] * wx[None, :] for wy, wx in zip(wys, wxs)], axis=-1)
  return idx.reshape(-1, 4), w.reshape(-1, 4).astype(np.float32)
