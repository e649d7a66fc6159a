"""Dense NumPy reference for H2O (ALGORITHMS.md 3.2), run once at prefill.

Per layer: score[j, i] = mean over KV head j's query heads of sum_{q < T} A[h, q, i], the column
sums of the causal prompt attention over ALL T queries (no normalisation by the number of queries
that see i; kvpress's ObservedAttentionPress divides by T - i, we do not). The last
r = floor(n * recent_fraction) positions (Python float product, then math.floor) have priority level
1 (the recent window); candidates are ordered by (level desc, score desc, position asc) and the
first n are kept. Budget n as in snapkv_ref.budget_n. If n >= T everything is kept.
Output: "kept" [L][K], "counts" [L, K], "recent" (r); with ``values`` also "k", "v".
"""

from __future__ import annotations

import math

import numpy as np

from references.snapkv_ref import budget_n, finish, gqa_mean, select_layer


def h2o(
  attn: list,
  keys: list,
  values: list | None = None,
  modality=None,
  *,
  ratio: float | None = None,
  tokens: int | None = None,
  recent_fraction: float = 0.5,
) -> dict:
  """Heavy hitters (column sums) + recent window, per layer and KV head."""
  del modality
  T = attn[0].shape[-1]
  n = budget_n(T, ratio, tokens)
  r = math.floor(n * recent_fraction)
  level_T = (np.arange(T) >= T - r).astype(np.int64)
  kept = []
  for attn_NTT, k_KTH in zip(attn, keys):
    colsum_NT = np.asarray(attn_NTT, np.float64).sum(1)  # sum over query rows
    kept.append(select_layer(level_T, gqa_mean(colsum_NT, k_KTH.shape[0]), n))
  return finish(kept, [np.asarray(k, np.float64) for k in keys], values, recent=r)
