"""Full: keep the whole prompt cache (the baseline every policy is measured against)."""

from __future__ import annotations

import dataclasses

from jmmkv.cache.policies.base import Base, Context, HostPrompt, Kept, Plan, PromptKV


@dataclasses.dataclass(frozen=True)
class Full(Base):
  """No compression: the prefix holds every prompt token. Any budget is ignored (kept fraction 1).

  Capacity C equals the padded prompt length T; padding slots are empty (position -1).
  """

  name = "full"
  needs_budget = False

  def plan(self, host: HostPrompt) -> Plan:
    return Plan(host.bucket)

  def compress_layer(self, layer: PromptKV, index: int, ctx: Context, capacity: int, carry):
    return Kept(None), carry
