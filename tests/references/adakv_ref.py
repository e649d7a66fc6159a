"""Dense NumPy reference for AdaKV over SnapKV scores (ALGORITHMS.md 3.6), kvpress 0.5.5 semantics.

Per layer (n as in snapkv_ref.budget_n; K KV heads; T prompt tokens):
1. Per-KV-head SnapKV level and score exactly as snapkv_ref.window_scores (window positions level
   1 and score = position, prefix scores pooled per query head then GQA-averaged).
2. n_safe = max(1, int(n * alpha_safeguard)) (Python float product, truncated). Each head's own
   first n_safe positions under (level desc, score desc, position asc) are "forced".
3. The layer keeps K * n (head, position) pairs in total: all pairs ordered by (forced desc, level
   desc, score desc, position asc, head asc), first K * n. Per-head counts vary (each >= n_safe
   whenever n_safe <= n); a head keeps its pairs in ascending position order.
If n >= T everything is kept. Unlike AdaKV's own code (ALGORITHMS.md 3.6 step 4) the safeguard is a
forced set inside one joint top-K*n, not a rounding of (1 - alpha) n_h + alpha b; this is kvpress's
AdaKVPress. With SnapKV inside, the forced pairs are the latest window positions whenever
n_safe <= w.
Output: "kept" [L][K], "counts" [L, K], "n_safe"; with ``values`` also "k", "v" [L][K, C_l, H]
(C_l = the layer's largest head count, zero padded).
"""

from __future__ import annotations

import numpy as np

from references.snapkv_ref import budget_n, finish, select, window_scores


def joint_select(level_T, score_KT, n: int, n_safe: int) -> list:
  """Ascending kept positions per head: forced per-head top n_safe, then a joint top K*n."""
  K, T = score_KT.shape
  forced_KT = np.zeros((K, T), np.int64)
  for j in range(K):
    forced_KT[j, select(level_T, score_KT[j], n_safe)] = 1
  head_KT, pos_KT = np.meshgrid(np.arange(K), np.arange(T), indexing="ij")
  level_KT = np.broadcast_to(level_T, (K, T))
  order = np.lexsort(tuple(a.ravel() for a in (head_KT, pos_KT, -score_KT, -level_KT, -forced_KT)))[
    : K * n
  ]
  heads, positions = head_KT.ravel()[order], pos_KT.ravel()[order]
  return [np.sort(positions[heads == j]) for j in range(K)]


def adakv(
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
  alpha_safeguard: float = 0.2,
) -> dict:
  """AdaKV(SnapKV) kept positions per layer and KV head (ragged counts)."""
  del modality
  T = attn[0].shape[-1]
  n = budget_n(T, ratio, tokens)
  n_safe = max(1, int(n * alpha_safeguard))
  kept = []
  for attn_NTT, k_KTH in zip(attn, keys):
    level_T, score_KT = window_scores(attn_NTT, k_KTH.shape[0], window, kernel, pooling)
    kept.append(joint_select(level_T, score_KT, n, n_safe))
  return finish(kept, [np.asarray(k, np.float64) for k in keys], values, n_safe=n_safe)
