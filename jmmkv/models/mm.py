"""Shared multimodal pieces: splicing vision features into token embeddings, modality metadata."""

from __future__ import annotations

import numpy as np

from jmmkv.typing import IMAGE, TEXT, VIDEO, Array


def splice(x_BTD: Array, feats_XD: Array, b_idx_X, t_idx_X) -> Array:
  """Writes feature row i at token (b_idx[i], t_idx[i]) (placeholder tokens, in row-major order)."""
  return x_BTD.at[b_idx_X, t_idx_X].set(feats_XD.astype(x_BTD.dtype))


def placeholder_index(ids_BT: np.ndarray, token_id: int, num_features: int, what: str = "image"):
  """(b, t) of every ``token_id`` in row-major order; checks there is one per feature row."""
  b_idx, t_idx = np.nonzero(np.asarray(ids_BT) == token_id)
  check_count(len(b_idx), num_features, what)
  return b_idx.astype(np.int32), t_idx.astype(np.int32)


def check_count(num_tokens: int, num_features: int, what: str = "image"):
  """Raises unless there is one placeholder token per feature row."""
  if num_tokens != num_features:
    raise ValueError(
      f"{num_tokens} {what} tokens in input_ids but {num_features} {what} features: "
      f"the number of {what} tokens must equal the number of {what} features"
    )


def modality_rows(
  rows, image_token_id: int | None, video_token_id: int | None, image_lens=(), video_lens=()
):
  """Per row: modality ids (1 text, 2 image, 3 video) and the index, within the row, of the image
  (or video) each token belongs to (-1 for text). ``*_lens``: tokens of each image / video in
  order of appearance over the whole batch (adjacent images are told apart by these counts)."""
  modality, media = [], []
  queues = {IMAGE: list(image_lens), VIDEO: list(video_lens)}
  for ids in rows:
    mod = np.full(ids.shape, TEXT, np.int32)
    if image_token_id is not None:
      mod[ids == image_token_id] = IMAGE
    if video_token_id is not None:
      mod[ids == video_token_id] = VIDEO
    idx = np.full(ids.shape, -1, np.int32)
    for kind in (IMAGE, VIDEO):
      where = np.flatnonzero(mod == kind)
      item, pos = 0, 0
      while pos < len(where):
        if not queues[kind]:
          raise ValueError(f"more {'image' if kind == IMAGE else 'video'} tokens than features")
        n = queues[kind].pop(0)
        idx[where[pos : pos + n]] = item
        item, pos = item + 1, pos + n
    modality.append(mod)
    media.append(idx)
  return tuple(modality), tuple(media)
