"""Full: keep the whole prompt cache (the baseline every policy is measured against)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jmmkv.cache.budget import Budget
from jmmkv.cache.policies.base import Prefix, PromptKV
from jmmkv.cache.stats import NONE


@dataclasses.dataclass(frozen=True)
class Full:
  """No compression: the prefix holds every prompt token. Any budget is ignored (kept fraction 1).

  Capacity C equals the padded prompt length T; padding slots are empty (position -1).
  """

  name = "full"
  stats = NONE

  def capacity(self, budget: Budget | None, prompt_len: int) -> int:
    del budget
    return prompt_len

  def compress(self, prompt: PromptKV, budget: Budget | None, capacity: int) -> Prefix:
    del budget, capacity
    l, b, kh, t, _ = prompt.k.shape
    positions_BT = jnp.where(prompt.valid_BT, jnp.arange(t)[None, :], -1)
    modality_BT = jnp.where(prompt.valid_BT, prompt.modality_BT, 0)
    expand = lambda x_BT: jnp.broadcast_to(x_BT[None, :, None, :], (l, b, kh, t))
    return Prefix(prompt.k, prompt.v, expand(positions_BT), expand(modality_BT))
