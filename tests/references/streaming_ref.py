"""Dense NumPy reference for StreamingLLM (ALGORITHMS.md 3.3), applied once at prefill.

Per layer and KV head (all identical; no attention is used): positions < ``sinks`` have priority
level 1 and score 0; every other position scores its own index (more recent = higher). Ordered by
(level desc, score desc, position asc), the first n are kept: the first min(n, sinks) positions
(ties among the sinks go to the lower position) plus the most recent n - min(n, sinks). Budget n
as in snapkv_ref.budget_n (ratio => ceil, tokens => min(tokens, T)).
Output: "kept" [L][K], "counts" [L, K]; with ``values`` also "k", "v" [L][K, n, H].
"""

from __future__ import annotations

import numpy as np

from references.snapkv_ref import budget_n, finish, select


def streaming(
  attn: list,
  keys: list,
  values: list | None = None,
  modality=None,
  *,
  ratio: float | None = None,
  tokens: int | None = None,
  sinks: int = 4,
) -> dict:
  """Sinks + recent window. ``attn`` only gives T (it may be None when ``keys`` are given)."""
  del modality
  T = keys[0].shape[1]
  n = budget_n(T, ratio, tokens)
  pos_T = np.arange(T)
  sink_T = pos_T < sinks
  kept_T = select(sink_T.astype(np.int64), np.where(sink_T, 0.0, pos_T), n)
  kept = [[kept_T.copy() for _ in range(k.shape[0])] for k in keys]
  return finish(kept, [np.asarray(k, np.float64) for k in keys], values)
