"""H2O: heavy hitters (accumulated attention) + a recent window, applied once at prefill.

Based on "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs" (Zhang et al.,
NeurIPS 2023, arXiv 2306.14048), as the multimodal code bases run it (one shot at prefill).
Score of token i = sum over all prompt queries of its causal attention, per query head, then the
GQA mean (or max) per KV head. The last ``floor(n * recent_fraction)`` tokens are kept first.
Hyperparameters: ``recent_fraction`` = 0.5 (heavy 10% + recent 10% at a 20% budget), ``gqa``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jmmkv.cache import select
from jmmkv.cache.policies.base import PromptKV, Scorer, check_fields
from jmmkv.cache.stats import spec
from jmmkv.cache.statistics import ColumnSums


@dataclasses.dataclass(frozen=True)
class H2O(Scorer):
  recent_fraction: float = 0.5
  gqa: str = "mean"

  name = "h2o"
  stats = spec(ColumnSums())

  def __post_init__(self):
    check_fields(self)
    if not 0.0 <= self.recent_fraction <= 1.0:
      raise ValueError(f"recent_fraction must be in [0, 1], got {self.recent_fraction}")
    if self.gqa not in ("mean", "max"):
      raise ValueError(f"gqa must be 'mean' or 'max', got {self.gqa!r}")

  def scores(self, layer: PromptKV, kept_B):
    """Column sums (GQA-reduced); level 1 on the last ``floor(n * recent_fraction)`` tokens."""
    score = select.reduce_heads(layer.stats[ColumnSums.name], layer.k.shape[2], self.gqa)
    recent_B = jnp.floor(kept_B * self.recent_fraction).astype(jnp.int32)
    level = select.recent_slots(layer.valid_1BKT, recent_B)
    return score, jnp.broadcast_to(level, score.shape)
