"""Dense NumPy reference for PyramidKV (ALGORITHMS.md 3.5): SnapKV with per-layer kept counts.

Counts, in exact rational arithmetic (fractions.Fraction; float implementations agree except at
exact ties of the rounding), with C = n (the average per-layer count, the window included; n as in
snapkv_ref.budget_n), w = min(window, T), L layers:
  min_num = (C - w) / beta ;  max_num = 2 (C - w) - min_num
  if max_num >= T - w:  max_num = T - w ;  min_num = 2 (C - w) - max_num
  step = (max_num - min_num) / (L - 1) ;  cap_l = max_num - l * step   (layer 0 gets the most)
  counts_l = cap_l + w, rounded by largest remainder: floor every layer, then give the missing
  L*C - sum(floor) units one each to the layers with the largest fractional parts (ties: lower
  layer first), so sum_l counts_l = L * C exactly.
Fallbacks, in this order:
- n >= T: everything is kept (counts_l = T);
- L == 1, or C <= w, or T < 2 (C - w) (ALGORITHMS.md 3.5: "If Lp is less than about 2(C - w),
  the code falls back to plain SnapKV with capacity C"; KVCache-Factory's test is
  ``q_len < (max_capacity_prompt - window_size) * 2``), or min(min_num, max_num) < 0: uniform
  counts_l = C in every layer. (With C > w it goes negative only for beta < 1/2, where
  max_num < 0; kvpress asserts beta >= 1.)
``beta`` must be > 0. Each layer then keeps its counts_l per KV head exactly as snapkv_ref does
(window level 1 first, then the pooled prefix scores).
Output: "kept" [L][K], "counts" [L, K], "layer_budgets" [L]; with ``values`` also "k", "v".
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from references.snapkv_ref import budget_n, finish, select_layer, window_scores


def largest_remainder(x: list[Fraction]) -> list[int]:
  """Round rationals summing to an integer so the integers keep the sum (ties: lower index)."""
  floors = [math.floor(v) for v in x]
  missing = int(sum(x)) - sum(floors)
  assert sum(x) == int(sum(x)) and 0 <= missing <= len(x)
  order = sorted(range(len(x)), key=lambda i: (-(x[i] - floors[i]), i))
  for i in order[:missing]:
    floors[i] += 1
  return floors


def layer_budgets(T: int, n: int, layers: int, window: int, beta: float = 20) -> np.ndarray:
  """[L] per-layer kept counts (window included), summing to L * n (module docstring)."""
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if n >= T:
    return np.full(layers, T)
  w = min(window, T)
  c = Fraction(n)
  if layers == 1 or c <= w or T < 2 * (c - w):
    return np.full(layers, n)
  min_num = (c - w) / Fraction(beta)
  max_num = 2 * (c - w) - min_num
  if max_num >= T - w:
    max_num = Fraction(T - w)
    min_num = 2 * (c - w) - max_num
  if min(min_num, max_num) < 0:
    return np.full(layers, n)
  step = (max_num - min_num) / (layers - 1)
  return np.array(largest_remainder([max_num - l * step + w for l in range(layers)]))


def pyramidkv(
  attn: list,
  keys: list,
  values: list | None = None,
  modality=None,
  *,
  ratio: float | None = None,
  tokens: int | None = None,
  window: int = 32,
  kernel: int = 5,
  pooling: str = "avg",
  beta: float = 20,
) -> dict:
  """PyramidKV kept positions per layer and KV head, and the per-layer counts."""
  del modality
  T = attn[0].shape[-1]
  n = budget_n(T, ratio, tokens)
  budgets_L = layer_budgets(T, n, len(attn), window, beta)
  kept = []
  for attn_NTT, k_KTH, c in zip(attn, keys, budgets_L):
    level_T, score_KT = window_scores(attn_NTT, k_KTH.shape[0], window, kernel, pooling)
    kept.append(select_layer(level_T, score_KT, int(c)))
  keys64 = [np.asarray(k, np.float64) for k in keys]
  return finish(kept, keys64, values, layer_budgets=budgets_L)
