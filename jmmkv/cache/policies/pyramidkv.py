"""PyramidKV: SnapKV selection with per-layer budgets that shrink with depth (an arithmetic ramp).

Based on "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(Cai et al., arXiv 2406.02069), as KVCache-Factory's ``PyramidKVCluster`` computes the counts.
Per row, with C the average per-layer count (window included), w = min(window, T), L layers:
  min = (C - w) / beta;  max = 2 (C - w) - min;  if max >= T - w: max = T - w, min = 2 (C - w) - max
  count_l = max - l (max - min) / (L - 1) + w      (layer 0 keeps the most)
rounded by largest remainder so that sum_l count_l = L * C exactly. Every layer keeps C (the
code's fallback to SnapKV) when T < 2 (C - w) (as ``PyramidKVCluster`` does), when C <= w, or with
one layer. Defaults: window 32, kernel 5, avg, beta 20.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jmmkv.cache import select
from jmmkv.cache.policies.base import Prefix, PromptKV, uniform_capacity
from jmmkv.cache.policies.snapkv import SnapKV
from jmmkv.typing import Array


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
  beta: float = 20.0

  name = "pyramidkv"

  def __post_init__(self):
    super().__post_init__()
    if self.beta <= 1:
      raise ValueError(f"beta must be > 1, got {self.beta}")

  def capacity(self, budget, prompt_len: int) -> int:
    uniform_capacity(budget, prompt_len, self.name)  # validates the budget
    return prompt_len  # per-layer counts vary by row: allocate the bucket

  def layer_counts(self, budget, lengths_B: Array, num_layers: int) -> Array:
    """Kept tokens per layer and row ``[L, B]``."""
    c = budget.kept_B(lengths_B).astype(jnp.float32)
    t = lengths_B.astype(jnp.float32)
    w = jnp.minimum(float(self.window), t)
    lo = (c - w) / self.beta
    hi = 2 * (c - w) - lo
    clip = hi >= t - w
    hi, lo = jnp.where(clip, t - w, hi), jnp.where(clip, 2 * (c - w) - (t - w), lo)
    step = (hi - lo) / max(num_layers - 1, 1)
    ramp = hi[None] - jnp.arange(num_layers)[:, None] * step[None] + w[None]  # [L, B]
    fallback = (t < 2 * (c - w)) | (c <= w) | (num_layers == 1)
    real = jnp.where(fallback[None], c[None], ramp)
    return select.largest_remainder(real, num_layers * budget.kept_B(lengths_B))

  def compress(self, prompt: PromptKV, budget, capacity: int) -> Prefix:
    score, level = self.scores(prompt)
    l, b, kh = score.shape[:3]
    n_LBK = jnp.broadcast_to(self.layer_counts(budget, prompt.lengths_B, l)[:, :, None], (l, b, kh))
    idx = select.top_positions(score, level, prompt.valid_BT, n_LBK, capacity)
    return select.gather(prompt, idx)
