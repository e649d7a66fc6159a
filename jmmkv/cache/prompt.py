"""The prompt K/V a policy compresses and the prefix it returns (no policy code: `select` and
`generate` use these without importing the policy package)."""

from __future__ import annotations

from typing import NamedTuple

from jmmkv.cache.stats import Stats
from jmmkv.typing import Array


class Heads(NamedTuple):
  """A layer whose slots differ by KV head: a conversation's next turn, whose cache kept other
  tokens of the earlier turns in each head (`jmmkv.turns`). Per (row, KV head), the valid slots
  come first, in ascending sequence position."""

  valid: Array  # [B, K, T] bool
  modality: Array  # [B, K, T] int32
  positions: Array  # [B, K, T] int32 sequence position of each slot, -1 where invalid


class PromptKV(NamedTuple):
  k: Array  # [L, B, K, T, H] prompt keys after RoPE (padded rows: slots >= length)
  v: Array  # [L, B, K, T, H]
  valid_BT: Array  # [B, T] bool, false on padding (with `heads`: true where any head is valid)
  modality_BT: Array  # [B, T] int32 modality id per token (with `heads`: unused)
  lengths_B: Array  # [B] int32 (with `heads`: every token of the conversation so far)
  stats: Stats = {}  # prefill statistics {name: [L, ...]} the policy asked for
  heads: Heads | None = None  # per-KV-head slots; None: slot t is token t in every head

  @property
  def valid_1BKT(self) -> Array:
    """Validity per KV head, ``[1, B, K, T]`` (``[1, B, 1, T]`` when all heads agree)."""
    return self.valid_BT[None, :, None, :] if self.heads is None else self.heads.valid[None]

  @property
  def modality_1BKT(self) -> Array:
    """Modality per KV head, ``[1, B, K, T]`` (``[1, B, 1, T]`` when all heads agree)."""
    return self.modality_BT[None, :, None, :] if self.heads is None else self.heads.modality[None]


class Prefix(NamedTuple):
  k: Array  # [L, B, K, C, H] kept keys in ascending position order
  v: Array  # [L, B, K, C, H]
  positions: Array  # [L, B, K, C] original positions, -1 where empty
  modality: Array  # [L, B, K, C]
