"""PyramidKV: per-layer budgets that shrink with depth (an arithmetic ramp) over any scorer.

Based on "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(Cai et al., arXiv 2406.02069), as KVCache-Factory's ``PyramidKVCluster`` computes the counts.
Per row, with C the average per-layer count (window included), w = min(window, T), L layers:
  min = (C - w) / beta;  max = 2 (C - w) - min;  if max >= T - w: max = T - w, min = 2 (C - w) - max
  count_l = max - l (max - min) / (L - 1) + w      (layer 0 keeps the most)
rounded by largest remainder so that sum_l count_l = L * C exactly. Every layer keeps C (the
code's fallback to SnapKV) when T < 2 (C - w) (as ``PyramidKVCluster`` does), when C <= w, or with
one layer. ``window`` is the scorer's (0 for a scorer without one). Wraps any `Scorer` (default
SnapKV: window 32, kernel 5, avg; ``get("pyramidkv", scorer="h2o")``). Default beta 20.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jmmkv.cache import select
from jmmkv.cache.policies.base import (
  Context,
  HostPrompt,
  Plan,
  PromptKV,
  Scorer,
  check_fields,
  keep_best,
)
from jmmkv.cache.policies.snapkv import SnapKV
from jmmkv.cache.policies.wrapper import Wrapper
from jmmkv.typing import Array


@dataclasses.dataclass(frozen=True)
class PyramidKV(Wrapper):
  scorer: Scorer = SnapKV()
  beta: float = 20.0

  name = "pyramidkv"

  def __post_init__(self):
    check_fields(self)
    if self.beta <= 1:
      raise ValueError(f"beta must be > 1, got {self.beta}")
    self.check_scorer()

  @property
  def window(self) -> int:
    return getattr(self.scorer, "window", 0)

  def layer_counts(self, kept_B: Array, lengths_B: Array, num_layers: int) -> Array:
    """Kept tokens per layer and row ``[L, B]`` (``kept_B``: the average per-layer count)."""
    c = kept_B.astype(jnp.float32)
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
    return select.largest_remainder(real, num_layers * kept_B)

  def plan(self, host: HostPrompt) -> Plan:
    counts = np.asarray(self.layer_counts(host.kept_B, host.lengths_B, host.num_layers))
    total = int(host.num_kv_heads * counts.sum())
    return Plan(int(counts.max(initial=1)), total)

  def start(self, ctx: Context):
    return self.layer_counts(ctx.kept_B, ctx.lengths_B, ctx.num_layers)  # [L, B]

  def compress_layer(self, layer: PromptKV, index: int, ctx: Context, capacity: int, counts_LB):
    score, level = self.scorer.scores(layer, ctx.kept_B)
    return keep_best(layer, score, level, counts_LB[index][None, :, None], capacity), counts_LB
