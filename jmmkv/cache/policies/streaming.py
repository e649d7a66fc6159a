"""StreamingLLM: attention sinks + the most recent tokens (Xiao et al., ICLR 2024).

Based on "Efficient Streaming Language Models with Attention Sinks" (arXiv 2309.17453). Applied
once to the prompt cache: keep the first ``sinks`` positions and the latest ``n - sinks``. No
scores. Hyperparameters: ``sinks`` = 4 (the paper's and KVCache-Factory's default).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jmmkv.cache import select
from jmmkv.cache.policies.base import Prefix, PromptKV, check_fields, kept_counts, uniform_capacity
from jmmkv.cache.stats import NONE


@dataclasses.dataclass(frozen=True)
class StreamingLLM:
  sinks: int = 4

  name = "streaming"
  stats = NONE

  def __post_init__(self):
    check_fields(self)
    if self.sinks < 0:
      raise ValueError(f"sinks must be an integer >= 0, got {self.sinks}")

  def capacity(self, budget, prompt_len: int) -> int:
    return uniform_capacity(budget, prompt_len, self.name)

  def compress(self, prompt: PromptKV, budget, capacity: int) -> Prefix:
    t = prompt.k.shape[3]
    shape = prompt.k.shape[:4]
    pos_T = jnp.arange(t)
    sink_T = pos_T < self.sinks
    score = jnp.broadcast_to(
      jnp.where(sink_T, 0, pos_T), shape
    )  # sinks: earliest first; rest: latest
    level = jnp.broadcast_to(sink_T, shape)
    idx = select.top_positions(score, level, prompt.valid_BT, kept_counts(budget, prompt), capacity)
    return select.gather(prompt, idx)
