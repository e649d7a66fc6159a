"""Host side: token rows (+ vision inputs) -> a `Batch`; right-padding into prompt-length buckets."""

from __future__ import annotations

import dataclasses

import numpy as np

from jmmkv.typing import PAD, TEXT

DEFAULT_MIN_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class Media:
  """Vision inputs of a whole batch, in the order their placeholders appear (row by row), as the
  HF processor returns them. Unused fields are None."""

  pixel_values: np.ndarray | None = (
    None  # LLaVA [N, C, H, W]; NeXT, OneVision [N, tiles, C, H, W]; Qwen [P, X]
  )
  image_sizes: np.ndarray | None = None  # NeXT, OneVision [N, 2] original (h, w)
  image_grid_thw: np.ndarray | None = None  # Qwen [N, 3]
  pixel_values_videos: np.ndarray | None = None  # Qwen [P, X]; OneVision [V, F, C, H, W]
  video_grid_thw: np.ndarray | None = None  # Qwen [V, 3]
  second_per_grid_ts: np.ndarray | None = None  # Qwen2.5-VL [V]
  batch_num_images: np.ndarray | None = None  # LLaVA-OneVision: images of each prompt [B']


@dataclasses.dataclass(frozen=True)
class Batch:
  """Prompts of a batch, unpadded: per row the token ids, the modality id of each token (1 text,
  2 image, 3 video) and the index within the row of the image / video it belongs to (-1: text)."""

  input_ids: tuple[np.ndarray, ...]
  modality: tuple[np.ndarray, ...]
  media_index: tuple[np.ndarray, ...] | None = None
  media: Media = Media()

  def __post_init__(self):
    if not self.input_ids:
      raise ValueError("a batch needs at least one prompt")
    if self.media_index is None:
      object.__setattr__(
        self, "media_index", tuple(np.full(r.shape, -1, np.int32) for r in self.input_ids)
      )
    for i, (ids, mod, idx) in enumerate(
      zip(self.input_ids, self.modality, self.media_index, strict=True)
    ):
      if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(
          f"prompt {i} must be a non-empty 1-D token sequence, got shape {ids.shape}"
        )
      if mod.shape != ids.shape or idx.shape != ids.shape:
        raise ValueError(
          f"prompt {i}: modality {mod.shape} / media_index {idx.shape} != ids {ids.shape}"
        )

  @property
  def lengths(self) -> np.ndarray:  # [B]
    return np.array([len(r) for r in self.input_ids], np.int32)


@dataclasses.dataclass(frozen=True)
class Padded:
  """A batch right-padded to a bucket length T (padding: id ``pad_id``, modality 0, invalid)."""

  ids_BT: np.ndarray  # int32
  modality_BT: np.ndarray  # int32
  valid_BT: np.ndarray  # bool
  lengths_B: np.ndarray  # int32
  media: Media = Media()


def _check_row(i: int, row: np.ndarray) -> np.ndarray:
  """Row ``i`` as int32, if it is a 1-D sequence of integer ids (an empty one: `Batch` says)."""
  if row.ndim != 1:
    raise ValueError(
      f"input_ids row {i} must be a 1-D sequence of token ids, got shape {row.shape}: give one "
      "list of ids per prompt, e.g. input_ids=[[1, 5, 9], [1, 7]]"
    )
  if row.size and not np.issubdtype(row.dtype, np.integer):
    raise ValueError(f"input_ids must be integers, got {row.dtype} in row {i}")
  return row.astype(np.int32)


def token_rows(input_ids, attention_mask=None, vocab_size: int | None = None) -> list[np.ndarray]:
  """Unpadded int32 id rows from lists of different lengths, or a padded array + mask (a 1-D
  array is one row). Rows must be 1-D and integer."""
  if getattr(input_ids, "ndim", None) == 1:  # numpy or jax
    input_ids = np.asarray(input_ids)[None]
  if attention_mask is not None:
    ids_BT, mask_BT = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
    if ids_BT.shape != mask_BT.shape:
      raise ValueError(f"attention_mask shape {mask_BT.shape} != input_ids shape {ids_BT.shape}")
    if ids_BT.ndim != 2:
      raise ValueError(f"input_ids with an attention_mask must be [B, T], got shape {ids_BT.shape}")
    rows = [ids[m] for ids, m in zip(ids_BT, mask_BT)]
  else:
    rows = [np.asarray(r) for r in input_ids]
  rows = [_check_row(i, r) for i, r in enumerate(rows)]
  if vocab_size is not None:
    for i, r in enumerate(rows):
      if r.size and (r.min() < 0 or r.max() >= vocab_size):
        raise ValueError(
          f"prompt {i} has token ids outside [0, {vocab_size}): min {r.min()}, max {r.max()}"
        )
  return rows


def from_token_ids(input_ids, attention_mask=None, vocab_size: int | None = None) -> Batch:
  """A text-only batch from id rows (lists of different lengths, or a padded array + mask)."""
  rows = token_rows(input_ids, attention_mask, vocab_size)
  return Batch(tuple(rows), tuple(np.full(r.shape, TEXT, np.int32) for r in rows))


def prepend(batch: Batch, rows) -> Batch:
  """``batch`` with text tokens ``rows[b]`` (possibly none) before row b's tokens."""
  if len(rows) != len(batch.input_ids):
    raise ValueError(f"{len(rows)} prefixes for {len(batch.input_ids)} rows")
  join = lambda x, y: np.concatenate([np.asarray(y, x.dtype).reshape(-1), x])
  return Batch(
    tuple(join(x, r) for x, r in zip(batch.input_ids, rows)),
    tuple(join(x, [TEXT] * len(r)) for x, r in zip(batch.modality, rows)),
    tuple(join(x, [-1] * len(r)) for x, r in zip(batch.media_index, rows)),
    batch.media,
  )


def bucket_length(n: int, min_bucket: int = DEFAULT_MIN_BUCKET) -> int:
  """Smallest power of two >= max(n, min_bucket): calls in one bucket share compiled code."""
  return max(min_bucket, 1 << (int(n) - 1).bit_length())


def pad(batch: Batch, length: int | None = None, pad_id: int = 0) -> Padded:
  """Right-pads every row to ``length`` (default: the bucket of the longest row)."""
  lengths = batch.lengths
  t = bucket_length(lengths.max()) if length is None else length
  if lengths.max() > t:
    raise ValueError(f"prompt of {lengths.max()} tokens does not fit the length {t}")
  b = len(lengths)
  ids = np.full((b, t), pad_id, np.int32)
  modality = np.full((b, t), PAD, np.int32)
  for i, (r, m) in enumerate(zip(batch.input_ids, batch.modality)):
    ids[i, : len(r)], modality[i, : len(r)] = r, m
  valid = np.arange(t)[None, :] < lengths[:, None]
  return Padded(ids, modality, valid, lengths, batch.media)
