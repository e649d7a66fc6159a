"""StreamingLLM: attention sinks + the most recent tokens (Xiao et al., ICLR 2024).

Based on "Efficient Streaming Language Models with Attention Sinks" (arXiv 2309.17453). Applied
once to the prompt cache: keep the first ``sinks`` positions and the latest ``n - sinks``. No
scores. Hyperparameters: ``sinks`` = 4 (the paper's and KVCache-Factory's default).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jmmkv.cache.policies.base import PromptKV, Scorer, check_fields


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Scorer):
  sinks: int = 4

  name = "streaming"

  def __post_init__(self):
    check_fields(self)
    if self.sinks < 0:
      raise ValueError(f"sinks must be an integer >= 0, got {self.sinks}")

  def scores(self, layer: PromptKV, kept_B):
    """Sinks first (earliest first), then the latest tokens."""
    shape = layer.k.shape[:4]
    pos_T = jnp.arange(shape[-1])
    sink_T = pos_T < self.sinks
    return jnp.broadcast_to(jnp.where(sink_T, 0, pos_T), shape), jnp.broadcast_to(sink_T, shape)
