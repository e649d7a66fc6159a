"""Dense NumPy reference for LOOK-M (ALGORITHMS.md 3.1, with the conventions of 1.6 and 4).

Inputs are one unpadded prompt row (batch 1): ``attn`` a list over layers of causal softmax
probabilities [N, T, T] (query rows, key columns), ``keys`` / ``values`` lists over layers of
[K, T, H] (keys after RoPE), ``modality`` [T] (1 text, 2 image, 3 video). Everything is float64.
Never imports jmmkv. Compression happens once, after prefill, with the same budget in every layer.

Budget. n = min(T, max(1, ceil(ratio * T))) for ``ratio``, n = min(tokens, T) for ``tokens`` (the
jmmkv Budget); with neither, ratio = alpha1 + alpha2 (LOOK-M's 0.1 + 0.1 = 0.2). n is split into
the recent window M and the important share N by the proportion alpha1 : alpha2 (arguments
``recent_ratio`` = alpha1, ``important_ratio`` = alpha2; only their proportion matters once a
budget is given; the default 0.1 : 0.1 is 1:1):
  M = min(n, floor(n * alpha1 / (alpha1 + alpha2) + 1/2))   (round half UP; float64, evaluated
  N = n - M                                                    left to right exactly as written)
so a jmmkv Budget(ratio=r) gives n = ceil(r T) split 1:1 (M = ceil(n / 2), N = floor(n / 2)).

Scores (per layer, eqs. 4-5): the H2O column sums over ALL prompt queries, per query head,
s[q, t] = sum_i attn[q, i, t]; the per-KV-head score is the mean over its G = N/K query heads
(KV head j owns query heads j*G .. j*G+G-1).

Selection, per layer and KV head (eqs. 6-8; text priority as a priority level, never a constant):
  recent   = [T - M, T)                                  level 2 (forced)
  text_c   = text positions in [0, T - M)                level 1 (all kept: text prior)
  vis_c    = image / video positions in [0, T - M)       level 0, ranked by score
Candidates are ordered by (level desc, score desc, position asc) and the first
  C = M + max(N, |text_c|)
are kept: every text token is kept even when |text_c| > N (the budget is overrun by
|text_c| - N; "counts" then exceeds n, and the overrun is also returned). Otherwise the top
N - |text_c| visual candidates fill the important share. C is the same in every head of a layer;
heads differ only in which visual tokens they keep.
``keep_all_text=False`` reads eq. 8 literally instead (I = Top_N of the text-boosted scores): the
same order, but only C = M + N are kept, so the budget holds and, when |text_c| > N, the N
best-scored text tokens are the important share (no visual token is kept before the window).
Text-only fallback: when the row has NO image/video token (or ``text_prior=False``) there is no
text priority: all of [0, T - M) is level 0 and C = M + N = n. This is H2O's selection with the
same split, followed by the same merge, i.e. LOOK-M's non-text-prior variants (the released code's
`pivot_merge` / `avg_merge`, without their 4 sink tokens). n >= T keeps everything (no merge).

Merge (eqs. 9-12): every evicted token (the candidates not kept) is merged into its key-cosine
nearest kept token of the same head (recent and text tokens are merge targets too) with
``merge`` = "pivot" (P-Merge, the paper default), "average" (A-Merge), "weighted" (W-Merge), or
None (plain eviction). The released code's merges (ALGORITHMS.md 1.2 step 3g and 3.1 "Code"):
"average-code" (the A-Merge classes: similarity filter and src/index misalignment) and
"weighted-code" (TextWeightedMerge_LayerWise: the same filter, aligned), i.e.
merge_ref.merge_code_compat with rule "average" / "weighted". Exact rules and ties: merge_ref.

Output: "kept" [L][K] ascending int arrays, "counts" [L, K], "k", "v" [L][K, C_l, H] (merged
kept keys / values in ascending position order), "n", "recent" (M), "important" (N),
"layer_budgets" [L] (n in every layer), "overrun" [L, K] (counts - n, >= 0), "target" [L][K] (the
kept position each evicted token was merged into, -1 if dropped).
"""

from __future__ import annotations

import math

import numpy as np

from references import merge_ref

TEXT, IMAGE, VIDEO = 1, 2, 3
CODE_MERGES = ("average-code", "weighted-code")  # the released code's filtered merges


def budget_n(T: int, ratio: float | None = None, tokens: int | None = None) -> int:
  """Tokens kept per layer and KV head for a prompt of T tokens (the jmmkv Budget)."""
  if (ratio is None) == (tokens is None):
    raise ValueError("give exactly one of ratio / tokens")
  if ratio is not None:
    return min(T, max(1, math.ceil(ratio * T)))
  return min(int(tokens), T)


def split(n: int, recent: float, important: float) -> tuple[int, int]:
  """(M, N): recent window and important share of n, M rounded half up."""
  M = min(n, math.floor(n * recent / (recent + important) + 0.5))
  return M, n - M


def colsum_scores(attn_NTT: np.ndarray, kv_heads: int) -> np.ndarray:
  """[K, T]: column sums over all queries, averaged over each KV head's query heads."""
  s_NT = np.asarray(attn_NTT, np.float64).sum(1)
  n, t = s_NT.shape
  return s_NT.reshape(kv_heads, n // kv_heads, t).mean(1)


def modality_masks(modality) -> tuple[np.ndarray, np.ndarray]:
  """(is_text [T], is_visual [T]); any other id is an error (a row has no padding here)."""
  m = np.asarray(modality)
  if not np.isin(m, (TEXT, IMAGE, VIDEO)).all():
    raise ValueError(f"modality ids must be 1, 2 or 3, got {np.unique(m)}")
  return m == TEXT, (m == IMAGE) | (m == VIDEO)


def text_prior_select(
  score_KT, modality, M: int, N: int, text_prior: bool = True, keep_all_text: bool = True
) -> list:
  """Kept positions per KV head (module docstring: levels recent > text > visual by score)."""
  is_text, is_vis = modality_masks(modality)
  T = len(is_text)
  pos = np.arange(T)
  recent = pos >= T - M
  prior = text_prior and bool(is_vis.any())
  level = np.where(recent, 2, np.where(prior & is_text, 1, 0))
  C = M + (max(N, int((is_text & ~recent).sum())) if prior and keep_all_text else N)
  out = []
  for s_T in np.asarray(score_KT, np.float64):
    order = np.lexsort((pos, -s_T, -level))
    out.append(np.sort(order[:C]))
  return out


def merge_layer(k_KTH, v_KTH, kept: list, merge: str | None, code_compat: bool) -> dict:
  """Merged (or plainly gathered, merge=None) kept K/V of one layer, via merge_ref."""
  if merge is None:  # eviction only: merge nothing
    T = k_KTH.shape[1]
    return merge_ref.merge(k_KTH, v_KTH, kept, [np.zeros(0, np.int64)] * len(kept)) | {
      "target": [np.full(T - len(p), -1, np.int64) for p in kept]
    }
  fn = merge_ref.merge_code_compat if code_compat else merge_ref.merge
  return fn(k_KTH, v_KTH, kept, None, merge)


def finish(kept, merged, n_L, **extra) -> dict:
  counts = np.array([[len(p) for p in layer] for layer in kept], np.int64)
  return {
    "kept": kept,
    "counts": counts,
    "k": [m["k"] for m in merged],
    "v": [m["v"] for m in merged],
    "target": [m["target"] for m in merged],
    "layer_budgets": np.asarray(n_L, np.int64),
    "overrun": counts - np.asarray(n_L, np.int64)[:, None],
    **extra,
  }


def lookm(
  attn: list,
  keys: list,
  values: list,
  modality,
  *,
  ratio: float | None = None,
  tokens: int | None = None,
  recent_ratio: float = 0.1,
  important_ratio: float = 0.1,
  merge: str | None = "pivot",
  text_prior: bool = True,
  keep_all_text: bool = True,
) -> dict:
  """LOOK-M kept positions and merged K/V per layer and KV head (module docstring)."""
  if merge is not None and merge not in merge_ref.RULES + CODE_MERGES:
    raise ValueError(f"merge must be one of {merge_ref.RULES + CODE_MERGES} or None, got {merge!r}")
  code_compat = merge in CODE_MERGES
  if code_compat:
    merge = merge.removesuffix("-code")
  T = attn[0].shape[-1]
  if ratio is None and tokens is None:
    ratio = recent_ratio + important_ratio
  n = budget_n(T, ratio, tokens)
  M, N = split(n, recent_ratio, important_ratio)
  kept, merged = [], []
  for attn_NTT, k_KTH, v_KTH in zip(attn, keys, values):
    k_KTH, v_KTH = np.asarray(k_KTH, np.float64), np.asarray(v_KTH, np.float64)
    score_KT = colsum_scores(attn_NTT, k_KTH.shape[0])
    kept_K = text_prior_select(score_KT, modality, M, N, text_prior, keep_all_text)
    kept.append(kept_K)
    merged.append(merge_layer(k_KTH, v_KTH, kept_K, merge, code_compat))
  return finish(kept, merged, [n] * len(attn), n=n, recent=M, important=N)
