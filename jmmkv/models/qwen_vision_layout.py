"""Host-side index arrays of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers (numpy only).

Everything here depends only on ``grid_thw`` (a static tuple of ``(t, h, w)`` per image or video,
in patches) and config scalars, so it is computed once per grid on the host and enters the traced
computation as constants. Patch order is the processor's: per image, frame-major, then 2x2
(``merge x merge``) merge blocks in row-major order, then the patches inside a block.
"""

from __future__ import annotations

import dataclasses

import numpy as np

Grid = tuple[tuple[int, int, int], ...]


def as_grid(grid_thw) -> Grid:
  """``grid_thw`` (nested sequence or ``[N, 3]`` array) as a hashable tuple of int triples."""
  grid = tuple(tuple(int(v) for v in g) for g in np.asarray(grid_thw).reshape(-1, 3).tolist())
  if not grid:
    raise ValueError("grid_thw is empty: at least one image or video is needed")
  return grid


def check_grid(grid: Grid, merge: int) -> None:
  for t, h, w in grid:
    if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
      raise ValueError(
        f"grid (t={t}, h={h}, w={w}): t, h, w must be positive and h, w multiples of "
        f"spatial_merge_size={merge}"
      )


def num_patches(grid: Grid) -> int:
  return sum(t * h * w for t, h, w in grid)


def rotary_positions(grid: Grid, merge: int) -> np.ndarray:
  """``[P, 2]`` int (row, column) of every patch in its frame, in processor order."""
  out = []
  for t, h, w in grid:
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
  return np.concatenate(out, axis=0).astype(np.int32)


def position_taps(grid: Grid, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
  """Qwen3-VL: each patch's learned position, a ``side x side`` table resampled bilinearly
  (``align_corners=True``) to its frame's ``h x w`` grid, as four taps: (table rows ``[P, 4]``,
  float32 weights ``[P, 4]``), patches in processor order (as HF
  ``get_vision_interpolation_indices_and_weights``)."""
  rows, cols = rotary_positions(grid, merge).T
  sizes = np.concatenate([np.tile([[h, w]], (t * h * w, 1)) for t, h, w in grid])

  def axis(index, size):
    src = (
      index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    )
    floor = np.floor(src)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0, None)
    return taps, weights.astype(np.float32)

  h_taps, h_w = axis(rows, sizes[:, 0])
  w_taps, w_w = axis(cols, sizes[:, 1])
  taps = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
  return taps.astype(np.int32), (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)


def frame_cu_seqlens(grid: Grid) -> np.ndarray:
  """HF ``cu_seqlens``: boundaries of the attention segments, one segment per frame."""
  lengths = [h * w for t, h, w in grid for _ in range(t)]
  return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def window_index(grid: Grid, merge: int, window_size: int, patch_size: int):
  """Qwen2.5-VL windows: (``window_index`` ``[P / merge**2]``, ``cu_window_seqlens``).

  ``window_index[i]`` is the merged-patch (merge block) placed at position ``i`` when the blocks
  are regrouped window by window (each frame cut into ``v x v`` blocks windows, ``v = window_size
  // merge // patch_size``, partial windows at the bottom/right edges); ``cu_window_seqlens`` are
  the window boundaries in patches, in that order. Same values as HF ``get_vision_window_index``.
  """
  v = window_size // merge // patch_size
  if v < 1:
    raise ValueError(
      f"window_size={window_size} is smaller than merge * patch = {merge * patch_size}"
    )
  index, cu, offset = [], [0], 0
  for t, h, w in grid:
    gh, gw = h // merge, w // merge
    nh, nw = -(-gh // v), -(-gw // v)
    blocks = np.full((t, nh * v, nw * v), -1, dtype=np.int64)
    blocks[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
    blocks = blocks.reshape(t, nh, v, nw, v).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, v * v)
    lengths = (blocks >= 0).sum(-1)
    index.append(blocks[blocks >= 0] + offset)
    cu.extend((cu[-1] + np.cumsum(lengths) * merge * merge).tolist())
    offset += t * gh * gw
  return np.concatenate(index), np.asarray(cu, dtype=np.int32)


def segment_ids(cu_seqlens: np.ndarray) -> np.ndarray:
  """``[P]`` int32 segment number of every row, from segment boundaries."""
  return np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class VisionLayout:
  """All grid-dependent indices of one tower forward, in the tower's compute order.

  ``order_P`` maps compute position -> processor patch index (``None``: identity, Qwen2-VL);
  ``restore_T`` puts the merged tokens back in processor order (``None``: identity).
  """

  positions_P2: np.ndarray
  frames_P: np.ndarray  # full-attention segment (one per frame)
  windows_P: np.ndarray | None  # window segment (Qwen2.5-VL)
  order_P: np.ndarray | None
  restore_T: np.ndarray | None


def layout(
  grid: Grid, merge: int, window_size: int | None = None, patch_size: int = 14
) -> VisionLayout:
  """Layout for Qwen2-VL (``window_size=None``) or Qwen2.5-VL (window attention)."""
  check_grid(grid, merge)
  positions = rotary_positions(grid, merge)
  frames = segment_ids(frame_cu_seqlens(grid))
  if window_size is None:
    return VisionLayout(positions, frames, None, None, None)
  index, cu_windows = window_index(grid, merge, window_size, patch_size)
  unit = merge * merge
  order = (index[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
  return VisionLayout(
    positions[order], frames[order], segment_ids(cu_windows), order, np.argsort(index)
  )
