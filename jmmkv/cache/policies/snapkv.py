"""SnapKV: observation-window attention, pooled, selects the prompt KV to keep (one shot).

Based on "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., NeurIPS 2024,
arXiv 2404.14469). For each row, the last ``w = min(window, T)`` prompt queries are the window:
score(i) = sum over window queries of their causal attention to prefix token i (i < T - w), pooled
along positions per query head (kernel ``kernel``, stride 1, padding kernel // 2; "avg" counts the
padding as zeros and divides by the kernel, "max" ignores it; the window is not part of the pooled
sequence), then the GQA mean per KV head. The window itself is always kept first.
Defaults: window 32, kernel 5, avg pooling (the SnapKV code's defaults).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmmkv.cache import select
from jmmkv.cache.policies.base import PromptKV, Scorer, check_fields
from jmmkv.cache.stats import StatsSpec, spec
from jmmkv.cache.statistics import WindowSums
from jmmkv.typing import Array


def pool(scores_LBNT: Array, prefix_1BNT: Array, kernel: int, how: str) -> Array:
  """1-D pooling along T over the prefix tokens only (see the module docstring); ``prefix``
  ``[1, B, N, T]`` or shared by the heads ``[1, B, 1, T]`` (`select.per_query_head`)."""
  if how == "avg":
    x = jnp.where(prefix_1BNT, scores_LBNT, 0.0)
    summed = jax.lax.reduce_window(
      x,
      0.0,
      jax.lax.add,
      (1, 1, 1, kernel),
      (1, 1, 1, 1),
      [(0, 0)] * 3 + [(kernel // 2, kernel // 2)],
    )
    return summed / kernel
  x = jnp.where(prefix_1BNT, scores_LBNT, -jnp.inf)
  return jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    (1, 1, 1, kernel),
    (1, 1, 1, 1),
    [(0, 0)] * 3 + [(kernel // 2, kernel // 2)],
  )


@dataclasses.dataclass(frozen=True)
class SnapKV(Scorer):
  window: int = 32
  kernel: int = 5
  pooling: str = "avg"
  gqa: str = "mean"

  name = "snapkv"

  def __post_init__(self):
    check_fields(self)
    if self.window < 1:
      raise ValueError(f"window must be a positive integer, got {self.window}")
    if self.kernel < 1 or self.kernel % 2 == 0:
      raise ValueError(f"kernel must be a positive odd integer, got {self.kernel}")
    if self.pooling not in ("avg", "max"):
      raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")
    if self.gqa not in ("mean", "max"):
      raise ValueError(f"gqa must be 'mean' or 'max', got {self.gqa!r}")

  @property
  def stats(self) -> StatsSpec:
    return spec(WindowSums(self.window))

  def scores(self, layer: PromptKV, kept_B=None) -> tuple[Array, Array]:
    """(score, level) ``[1, B, K, T]``: pooled window attention; level 1 on the window."""
    w_B = jnp.minimum(self.window, layer.lengths_B)
    in_window = select.recent_slots(layer.valid_1BKT, w_B)  # [1, B, K or 1, T]
    sums_1BNT = layer.stats[WindowSums.name]
    prefix_1BNT = select.per_query_head(layer.valid_1BKT & ~in_window, sums_1BNT.shape[2])
    pooled = pool(sums_1BNT, prefix_1BNT, self.kernel, self.pooling)
    score = select.reduce_heads(jnp.where(prefix_1BNT, pooled, 0.0), layer.k.shape[2], self.gqa)
    pos_T = jnp.arange(score.shape[-1])
    score = jnp.where(in_window, pos_T, score)  # within the window: latest first
    level = jnp.broadcast_to(in_window, score.shape)
    return score, level
