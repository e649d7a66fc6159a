"""Host side: token rows -> a `Batch`, and right-padding into static prompt-length buckets."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jmmkv.typing import PAD, TEXT

DEFAULT_MIN_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class Batch:
  """Prompts of a batch, unpadded: one int32 id row and one modality-id row per prompt."""

  input_ids: tuple[np.ndarray, ...]
  modality: tuple[np.ndarray, ...]

  def __post_init__(self):
    if not self.input_ids:
      raise ValueError("a batch needs at least one prompt")
    for i, (ids, mod) in enumerate(zip(self.input_ids, self.modality, strict=True)):
      if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(
          f"prompt {i} must be a non-empty 1-D token sequence, got shape {ids.shape}"
        )
      if mod.shape != ids.shape:
        raise ValueError(f"prompt {i}: modality shape {mod.shape} != ids shape {ids.shape}")

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


def from_token_ids(
  input_ids: Sequence[Sequence[int]] | np.ndarray,
  attention_mask: np.ndarray | None = None,
  vocab_size: int | None = None,
) -> Batch:
  """A text-only batch from id rows (lists of different lengths, or a padded array + mask)."""
  if isinstance(input_ids, np.ndarray) and input_ids.ndim == 1:
    input_ids = input_ids[None]
  if attention_mask is not None:
    ids_BT, mask_BT = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
    if ids_BT.shape != mask_BT.shape:
      raise ValueError(f"attention_mask shape {mask_BT.shape} != input_ids shape {ids_BT.shape}")
    rows = [ids[m] for ids, m in zip(ids_BT, mask_BT)]
  else:
    rows = [np.asarray(r) for r in input_ids]
  rows = [np.asarray(r, np.int32).reshape(-1) for r in rows]
  if vocab_size is not None:
    for i, r in enumerate(rows):
      if r.size and (r.min() < 0 or r.max() >= vocab_size):
        raise ValueError(
          f"prompt {i} has token ids outside [0, {vocab_size}): min {r.min()}, max {r.max()}"
        )
  return Batch(tuple(rows), tuple(np.full(r.shape, TEXT, np.int32) for r in rows))


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
  return Padded(ids, modality, valid, lengths)
