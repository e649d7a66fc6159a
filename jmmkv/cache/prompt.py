"""The prompt K/V a policy compresses and the prefix it returns (no policy code: `select` and
`generate` use these without importing the policy package)."""

from __future__ import annotations

from typing import NamedTuple

from jmmkv.cache.stats import Stats
from jmmkv.typing import Array


class PromptKV(NamedTuple):
  k: Array  # [L, B, K, T, H] prompt keys after RoPE (padded rows: slots >= length)
  v: Array  # [L, B, K, T, H]
  valid_BT: Array  # [B, T] bool, false on padding
  modality_BT: Array  # [B, T] int32 modality id per token
  lengths_B: Array  # [B] int32
  stats: Stats = {}  # prefill statistics {name: [L, ...]} the policy asked for


class Prefix(NamedTuple):
  k: Array  # [L, B, K, C, H] kept keys in ascending position order
  v: Array  # [L, B, K, C, H]
  positions: Array  # [L, B, K, C] original positions, -1 where empty
  modality: Array  # [L, B, K, C]
