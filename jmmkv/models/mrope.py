"""M-RoPE position ids on the host (numpy) for Qwen2-VL, Qwen2.5-VL and Qwen3-VL, as
transformers v5.

Ports ``Qwen2VLModel.get_rope_index`` / ``Qwen2_5_VLModel.get_rope_index`` /
``Qwen3VLModel.get_rope_index`` (and their helper ``get_vision_position_ids``) of transformers
5.x. Qwen3-VL puts timestamp text between a video's frames, so each frame (``t = 1``) is its own
group. Token types follow HF's ``mm_token_type_ids``
(0 text, 1 image, 2 video), not jmmkv's modality ids (0 pad, 1 text, 2 image, 3 video).

Prompt (``rope_index``): each row's attended tokens are split into runs of equal type. A text run
of length n gets ``p, p+1, ..., p+n-1`` on all three axes and moves ``p`` by n. A vision run
takes the next grid ``(t, h, w)`` of its kind (images and videos each consume their grids in
order across the whole batch) and gets, for the merged grid ``(t, h/m, w/m)`` in t-h-w order,
``(p + floor(i_t * interval), p + i_h, p + i_w)``; ``p`` then moves by ``max(h, w) / m`` (not by
the temporal extent, so text after a long video can reuse positions the video's t axis used).
``interval`` is 1, except for Qwen2.5-VL videos: ``tokens_per_second * second_per_grid_ts[k]``
(images are never scaled). Padding (mask 0) gets 0. ``deltas[b] = max(positions of row b) + 1 -
(attended tokens of row b)``.

Text only: HF's ``get_rope_index`` with all-text types (and any grids, here none) gives
``arange`` over attended tokens and deltas 0, which equals ``text_positions(mask)``. The model
forward with ``position_ids=None`` calls ``get_rope_index`` only when ids, ``mm_token_type_ids``
and a grid are all given and (no cached deltas or an empty cache); with no grid at all it falls
back to ``arange(T) + cache_len`` on all three axes, ignoring the attention mask
(``text_positions(None, ...)``). ``generate()`` instead uses the mask's ``cumsum - 1`` (padding 0)
and deltas 0 (``text_positions(mask)``).

Decoding (two HF paths that can disagree):
- ``generate()`` computes the prompt positions once (``[4, B, T]``: mask-cumsum text positions,
  then the three M-RoPE rows) and extends them by ``last column + 1`` per new token, on every
  axis (``generate_positions``). With left padding the last column is each row's last real token.
- The model forward with a cache and ``position_ids=None`` uses ``cache_position + rope_deltas``
  on all three axes (``decode_positions``). Without padding ``cache_position`` is the cache length;
  with an attention mask HF means ``cumsum(mask) - 1`` (attended tokens so far), though in v5.23
  that branch fails with a shape error when the mask is longer than the new tokens.
The two agree when a row's last prompt token holds that row's largest position; they differ
when the prompt ends within the temporal extent of a video (e.g. ``<video> <vision_end>``).
"""

from __future__ import annotations

import numpy as np

VARIANTS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_NAMES = {1: "image", 2: "video"}


def _runs(types_T: np.ndarray) -> list[tuple[int, int, int]]:
  """(type, start, end) of each run of equal values."""
  cuts = np.flatnonzero(np.diff(types_T)) + 1
  starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(types_T)]])
  return [(int(types_T[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _grids(grid_thw, name: str) -> np.ndarray:
  grid = np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw, np.int64)
  if grid.ndim != 2 or grid.shape[1] != 3:
    raise ValueError(f"{name} must have shape [N, 3], got {grid.shape}")
  return grid


def _time_interval(tokens_per_second, seconds):
  """Temporal spacing with torch's dtype rules: an ndarray element acts as a tensor element
  (float32 math unless float64), a Python number as a Python scalar (float result -> float32)."""
  if isinstance(seconds, np.generic):
    if seconds.dtype == np.float64:
      return np.float64(tokens_per_second) * seconds
    if np.issubdtype(seconds.dtype, np.integer) and isinstance(
      tokens_per_second, (int, np.integer)
    ):
      return np.int64(tokens_per_second) * np.int64(seconds)
    return np.float32(tokens_per_second) * np.float32(seconds)
  value = tokens_per_second * seconds
  return np.int64(value) if isinstance(value, (int, np.integer)) else np.float32(value)


def vision_positions(start: int, grid_thw, spatial_merge_size: int, time_interval=1) -> np.ndarray:
  """Positions ``[3, t*h*w/m**2]`` (t, h, w axes) of one image/video group starting at ``start``."""
  t, h, w = (int(g) for g in grid_thw)
  h, w = h // spatial_merge_size, w // spatial_merge_size
  interval = np.asarray(time_interval)
  if np.issubdtype(interval.dtype, np.integer):
    temporal = np.arange(t, dtype=np.int64) * interval
  else:  # float multiply then truncate, like torch's `(arange * interval).long()`
    temporal = (np.arange(t).astype(interval.dtype) * interval).astype(np.int64)
  t_THW, h_THW, w_THW = np.meshgrid(
    temporal + start, np.arange(h) + start, np.arange(w) + start, indexing="ij"
  )
  return np.stack([t_THW, h_THW, w_THW]).reshape(3, -1).astype(np.int64)


def rope_index(
  input_ids_BT,
  mm_token_type_ids_BT,
  image_grid_thw=None,
  video_grid_thw=None,
  attention_mask_BT=None,
  *,
  spatial_merge_size: int,
  variant: str = "qwen2_vl",
  second_per_grid_ts=None,
  tokens_per_second: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE ids of a prompt batch, equal to HF v5 ``model.model.get_rope_index``.

  Args: ids and ``mm_token_type_ids`` (0 text, 1 image, 2 video) ``[B, T]``; grids ``[N, 3]``
  (t, h, w in patches) in order of appearance over the batch; ``attention_mask_BT`` (nonzero =
  attended; padding may sit anywhere); Qwen2.5-VL only: ``second_per_grid_ts`` (one per video,
  default 1 each) and ``tokens_per_second`` (``config.vision_config.tokens_per_second``).
  Returns ``(position_ids [3, B, T] int64, deltas [B, 1] int64)``; padding positions are 0.
  Raises ValueError on shape mismatches, a token-group / grid count mismatch (HF would raise
  StopIteration for missing grids and silently ignore extra ones), a group whose length is not
  ``t*h*w/m**2``, or a row with no attended token.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  if int(spatial_merge_size) < 1:
    raise ValueError(f"spatial_merge_size must be >= 1, got {spatial_merge_size}")
  ids_BT, types_BT = np.asarray(input_ids_BT), np.asarray(mm_token_type_ids_BT)
  if ids_BT.ndim != 2 or types_BT.shape != ids_BT.shape:
    raise ValueError(
      f"input_ids must be [B, T] and mm_token_type_ids the same shape, got {ids_BT.shape} and "
      f"{types_BT.shape}"
    )
  if attention_mask_BT is None:
    mask_BT = np.ones(ids_BT.shape, bool)
  else:
    mask_BT = np.asarray(attention_mask_BT).astype(bool)
    if mask_BT.shape != ids_BT.shape:
      raise ValueError(f"attention_mask shape {mask_BT.shape} != input_ids shape {ids_BT.shape}")
  bad = np.setdiff1d(np.unique(types_BT[mask_BT]), [0, 1, 2])
  if bad.size:
    raise ValueError(f"mm_token_type_ids must be 0 (text), 1 (image) or 2 (video), got {bad}")
  if not mask_BT.any(axis=1).all():
    raise ValueError(f"rows {np.flatnonzero(~mask_BT.any(axis=1))} have no attended token")
  grids = {1: _grids(image_grid_thw, "image_grid_thw"), 2: _grids(video_grid_thw, "video_grid_thw")}
  if variant == "qwen3_vl":  # timestamps separate a video's frames: each frame is a group
    grids[2] = np.repeat(grids[2], grids[2][:, 0], axis=0)
    grids[2][:, 0] = 1

  runs_B = [_runs(types_BT[b][mask_BT[b]]) for b in range(ids_BT.shape[0])]
  for kind, grid in grids.items():
    groups = sum(kind == k for runs in runs_B for k, _, _ in runs)
    if groups != len(grid):
      raise ValueError(
        f"found {groups} {_NAMES[kind]} token groups but {len(grid)} {_NAMES[kind]}_grid_thw rows"
      )
  seconds = [1] * len(grids[2])  # HF's default: an int 1 per video
  if second_per_grid_ts is not None and variant == "qwen2_5_vl":
    arr = second_per_grid_ts if isinstance(second_per_grid_ts, np.ndarray) else None
    seconds = list(arr.reshape(-1) if arr is not None else second_per_grid_ts)
    if len(seconds) != len(grids[2]):
      raise ValueError(
        f"second_per_grid_ts has {len(seconds)} values for {len(grids[2])} video_grid_thw rows"
      )
  if variant == "qwen2_5_vl" and len(grids[2]) and tokens_per_second is None:
    raise ValueError("qwen2_5_vl videos need tokens_per_second (vision_config.tokens_per_second)")

  position_ids = np.zeros((3, *ids_BT.shape), np.int64)
  deltas = np.zeros((ids_BT.shape[0], 1), np.int64)
  used = {1: 0, 2: 0}
  for b, runs in enumerate(runs_B):
    pos, pieces = 0, []
    for kind, start, end in runs:
      if kind == 0:
        pieces.append(np.broadcast_to(np.arange(pos, pos + end - start), (3, end - start)))
        pos += end - start
        continue
      grid = grids[kind][used[kind]]
      interval = 1
      if variant == "qwen2_5_vl" and kind == 2:
        interval = _time_interval(tokens_per_second, seconds[used[kind]])
      used[kind] += 1
      piece = vision_positions(pos, grid, spatial_merge_size, interval)
      if piece.shape[1] != end - start:
        raise ValueError(
          f"row {b}: {_NAMES[kind]} group at attended index {start} has {end - start} tokens but grid "
          f"{grid.tolist()} gives {piece.shape[1]} (t*h*w/{spatial_merge_size}**2)"
        )
      pieces.append(piece)
      pos += max(int(grid[1]), int(grid[2])) // spatial_merge_size
    row_3T = np.concatenate(pieces, axis=1)
    position_ids[:, b, mask_BT[b]] = row_3T
    deltas[b, 0] = row_3T.max() + 1 - row_3T.shape[1]
  return position_ids, deltas


def text_positions(
  attention_mask_BT=None, *, batch: int | None = None, seq_len: int | None = None, past_len=0
) -> tuple[np.ndarray, np.ndarray]:
  """Text-only positions ``([3, B, T] int64, deltas zeros [B, 1] int64)``.

  With a mask: ``cumsum(mask) - 1``, padding 0 (HF ``generate()``'s prefill, which then sets
  ``rope_deltas`` to zeros; equal to ``rope_index`` on all-text types). Without one:
  ``arange(T) + past_len`` (the HF forward with ``position_ids=None`` and no grid, which ignores
  the mask); ``batch`` and ``seq_len`` are required then.
  """
  if attention_mask_BT is not None:
    mask_BT = np.asarray(attention_mask_BT).astype(bool)
    if mask_BT.ndim != 2:
      raise ValueError(f"attention_mask must be [B, T], got {mask_BT.shape}")
    pos_BT = np.where(mask_BT, np.cumsum(mask_BT, axis=1, dtype=np.int64) - 1, 0)
  else:
    if batch is None or seq_len is None:
      raise ValueError("text_positions needs attention_mask_BT or both batch and seq_len")
    pos_BT = np.broadcast_to(np.arange(seq_len, dtype=np.int64) + past_len, (batch, seq_len))
  deltas = np.zeros((pos_BT.shape[0], 1), np.int64)
  return np.broadcast_to(pos_BT, (3, *pos_BT.shape)).copy(), deltas


def decode_positions(deltas_B1, num_tokens, num_new: int = 1) -> np.ndarray:
  """HF forward path: new tokens at ``num_tokens + k + delta``, ``[3, B, num_new]`` int64.

  ``num_tokens`` (scalar or ``[B]``) counts the row's tokens before the first new one, padding
  excluded (HF: the cache length when unpadded, ``cumsum(mask) - 1`` with a mask).
  """
  deltas_B1 = np.asarray(deltas_B1, np.int64)
  if deltas_B1.ndim != 2 or deltas_B1.shape[1] != 1:
    raise ValueError(f"deltas must be [B, 1], got {deltas_B1.shape}")
  n_B1 = np.broadcast_to(np.asarray(num_tokens, np.int64).reshape(-1, 1), deltas_B1.shape)
  pos_BM = n_B1 + np.arange(num_new, dtype=np.int64)[None] + deltas_B1
  return np.broadcast_to(pos_BM, (3, *pos_BM.shape)).copy()


def generate_positions(position_ids_3BT, attention_mask_BT=None, step=0, num_new=1) -> np.ndarray:
  """HF ``generate()`` path: ``[3, B, num_new]`` int64, each axis continuing from the row's last
  prompt token: ``last + 1 + step + k`` (``step`` = tokens generated before these).

  HF takes the last column, which is the last attended token for left padding (the only padding
  HF generation supports); with a mask this takes each row's last attended token instead, so it
  also serves right padding.
  """
  pos_3BT = np.asarray(position_ids_3BT, np.int64)
  if pos_3BT.ndim != 3 or pos_3BT.shape[0] != 3:
    raise ValueError(f"position_ids must be [3, B, T], got {pos_3BT.shape}")
  if attention_mask_BT is None:
    last_3B = pos_3BT[:, :, -1]
  else:
    mask_BT = np.asarray(attention_mask_BT).astype(bool)
    if mask_BT.shape != pos_3BT.shape[1:]:
      raise ValueError(f"attention_mask shape {mask_BT.shape} != positions {pos_3BT.shape[1:]}")
    last_B = pos_3BT.shape[2] - 1 - np.argmax(mask_BT[:, ::-1], axis=1)
    last_3B = pos_3BT[:, np.arange(pos_3BT.shape[1]), last_B]
  return last_3B[:, :, None] + 1 + step + np.arange(num_new, dtype=np.int64)
