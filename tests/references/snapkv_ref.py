"""Dense NumPy reference for SnapKV (ALGORITHMS.md 3.4), plus helpers the other simple refs share.

Inputs are one unpadded prompt row (batch 1): ``attn`` a list over layers of causal softmax
probabilities [N, T, T] (query rows, key columns), ``keys`` a list over layers of [K, T, H].
Everything is float64. Never imports jmmkv.

Budget: ``ratio`` => n = min(T, max(1, ceil(ratio * T))); ``tokens`` => n = min(tokens, T). n is the
number kept per layer and KV head, the observation window included (kvpress's convention).

SnapKV, per layer, with w = min(window, T):
1. Window sums over the prefix: s[h, i] = sum_{j in [T-w, T)} A[h, j, i] for i < T - w (a sum, not
   kvpress's mean: the same ranking).
2. Pool each query head's prefix scores with a 1-D pool of odd ``kernel`` k (even k is rejected),
   stride 1, padding k//2, over the prefix only (the window is not part of the pooled sequence):
   "avg" pads with zeros and always divides by k (torch avg_pool1d, count_include_pad=True); "max"
   ignores the padding (torch max_pool1d).
3. GQA: the per-KV-head score is the mean of the pooled scores of its G = N/K query heads (KV head j
   owns query heads j*G .. j*G+G-1). For "max" the order (pool, then mean) matters.
4. Selection per KV head: the window positions [T-w, T) have priority level 1, the prefix level 0.
   Candidates are ordered by (level desc, score desc, position asc) and the first n are kept. Window
   positions have no pooled score: each scores its own position (latest first), so when n < w the
   LAST n positions are kept (kvpress is tie-dependent there). If n >= T everything is kept.
Output: "kept" [L][K] ascending int arrays, "counts" [L, K]; with ``values`` also "k", "v"
[L][K, C_l, H] (C_l the largest count of the layer, ascending positions, zero padded).
"""

from __future__ import annotations

import math

import numpy as np


def budget_n(T: int, ratio: float | None = None, tokens: int | None = None) -> int:
  """Tokens kept per layer and KV head for a prompt of T tokens."""
  if (ratio is None) == (tokens is None):
    raise ValueError("give exactly one of ratio / tokens")
  if ratio is not None:
    return min(T, max(1, math.ceil(ratio * T)))
  return min(int(tokens), T)


def select(level_S: np.ndarray, score_S: np.ndarray, n: int) -> np.ndarray:
  """Ascending positions of the first n under (level desc, score desc, position asc)."""
  pos_S = np.arange(len(score_S))
  order = np.lexsort((pos_S, -np.asarray(score_S, np.float64), -np.asarray(level_S)))
  return np.sort(order[:n])


def gqa_mean(x_NS: np.ndarray, kv_heads: int) -> np.ndarray:
  """[K, S]: mean over each KV head's query heads (j*G .. j*G+G-1)."""
  n, s = x_NS.shape
  return x_NS.reshape(kv_heads, n // kv_heads, s).mean(1)


def pool1d(x_NS: np.ndarray, kernel: int, pooling: str) -> np.ndarray:
  """Stride-1 pooling along the last axis with padding kernel//2 (avg: zeros, /k; max: -inf)."""
  if kernel < 1 or kernel % 2 == 0:
    raise ValueError(f"pooling kernel must be odd and >= 1, got {kernel}")
  if pooling not in ("avg", "max"):
    raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
  pad = kernel // 2
  fill = 0.0 if pooling == "avg" else -np.inf
  xp = np.pad(x_NS, ((0, 0), (pad, pad)), constant_values=fill)
  out = np.empty_like(x_NS, dtype=np.float64)
  for i in range(x_NS.shape[1]):
    win = xp[:, i : i + kernel]
    out[:, i] = win.sum(1) / kernel if pooling == "avg" else win.max(1)
  return out


def window_scores(
  attn_NTT: np.ndarray, kv_heads: int, window: int, kernel: int, pooling: str
) -> tuple[np.ndarray, np.ndarray]:
  """One layer's SnapKV (level [T], score [K, T]); the window has level 1 and score = position."""
  attn_NTT = np.asarray(attn_NTT, np.float64)
  T = attn_NTT.shape[-1]
  w = min(window, T)
  prefix = T - w
  s_NS = attn_NTT[:, T - w :, :prefix].sum(1)  # [N, T-w]
  pooled_KS = gqa_mean(pool1d(s_NS, kernel, pooling), kv_heads)
  score_KT = np.broadcast_to(np.arange(T, dtype=np.float64), (kv_heads, T)).copy()
  score_KT[:, :prefix] = pooled_KS
  level_T = (np.arange(T) >= prefix).astype(np.int64)
  return level_T, score_KT


def gather(kept: list, values: list, keys: list) -> tuple[list, list]:
  """Kept keys / values per layer [K, C_l, H], ascending, zero-padded to the layer's max count."""
  ks, vs = [], []
  for kept_K, k_KTH, v_KTH in zip(kept, keys, values):
    c = max(len(p) for p in kept_K)
    k_out = np.zeros((len(kept_K), c, k_KTH.shape[-1]))
    v_out = np.zeros((len(kept_K), c, v_KTH.shape[-1]))
    for j, p in enumerate(kept_K):
      k_out[j, : len(p)] = k_KTH[j, p]
      v_out[j, : len(p)] = v_KTH[j, p]
    ks.append(k_out)
    vs.append(v_out)
  return ks, vs


def finish(kept: list, keys: list, values: list | None, **extra) -> dict:
  """The output dict: kept, counts, (k, v when values are given) and any extra entries."""
  out = {"kept": kept, "counts": np.array([[len(p) for p in layer] for layer in kept]), **extra}
  if values is not None:
    out["k"], out["v"] = gather(kept, [np.asarray(v, np.float64) for v in values], keys)
  return out


def select_layer(level_T, score_KT, n: int) -> list:
  return [select(level_T, score_KT[j], n) for j in range(score_KT.shape[0])]


def snapkv(
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
) -> dict:
  """SnapKV kept positions per layer and KV head (module docstring). ``modality`` is unused."""
  del modality
  T = attn[0].shape[-1]
  n = budget_n(T, ratio, tokens)
  kept = []
  for attn_NTT, k_KTH in zip(attn, keys):
    level_T, score_KT = window_scores(attn_NTT, k_KTH.shape[0], window, kernel, pooling)
    kept.append(select_layer(level_T, score_KT, n))
  return finish(kept, [np.asarray(k, np.float64) for k in keys], values)
