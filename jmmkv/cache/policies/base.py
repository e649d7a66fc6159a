"""What every policy sees (the prompt K/V after prefill) and returns (a static-capacity prefix).

A policy is a frozen, hashable dataclass (static under jit) with a ``stats`` attribute (the
`StatsSpec` of prefill statistics it scores with) and two pure methods:
``capacity(budget, prompt_len) -> C`` on the host, and ``compress(prompt, budget, C) -> Prefix``
under jit.
"""

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
  stats: Stats = Stats()  # prefill statistics [L, ...] the policy asked for (None otherwise)


class Prefix(NamedTuple):
  k: Array  # [L, B, K, C, H] kept keys in ascending position order
  v: Array  # [L, B, K, C, H]
  positions: Array  # [L, B, K, C] original positions, -1 where empty
  modality: Array  # [L, B, K, C]
