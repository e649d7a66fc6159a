"""Dense NumPy reference for MEDA (ALGORITHMS.md 1.1, 1.2, 1.5, 1.6): paper and code variants.

Inputs are one unpadded prompt row (batch 1): ``attn`` a list over layers of causal softmax
probabilities [N, T, T]; ``keys`` / ``values`` lists over layers of [K, T, H] (keys after RoPE);
``queries`` a list over layers of [N, T, H] post-RoPE queries and the softmax ``scaling`` (only the
paper entropy needs them); ``modality`` [T] (1 text, 2 image, 3 video; visual = 2 or 3). All
float64, entropies in nats with 0 log 0 = 0. Never imports jmmkv. Compression happens once, after
prefill, when the entropies of all layers are known.

1. Entropy E_l per layer.
   variant="paper" (eqs. 4-6, head-averaged, NON-causal): scores s = (q . k) * scaling, query head q
   against its KV head q // G (G = N/K). Text rows over visual keys only: A_TV^q = softmax over the
   visual columns of s[q][text rows]; A_TV = mean over ALL N query heads of A_TV^q (average the
   probabilities first); H_TV = mean over text rows of the row entropy of A_TV. Likewise H_VT
   (visual rows over text keys). E_l = H_TV + H_VT. A direction with no rows or no keys (a row
   without text or without visual tokens) contributes 0.
   variant="code" (released code): E_l = mean over the N query heads of the mean over the T query
   rows of the entropy of the causal attention row attn[q, t, :] (entropy per head, then mean).
2. Layer fractions. rho = n / T with n the jmmkv per-layer budget: n = min(T, max(1,
   ceil(ratio T))) or min(tokens, T); with neither, ratio = 0.1 (paper, MileBench) or 0.2 (code,
   hh 0.1 + recent 0.1). p_l = softmax_l(E) * L (mean 1); lo = min(alpha_min, rho).
     renormalise=False (paper formula, code clamp):  alpha_l = clip(rho p_l, lo, 1)
     renormalise=True:  alpha_l = clip(c p_l, lo, 1) with the scalar c >= 0 chosen so that
       mean_l alpha_l = rho exactly ("water-filling"; unique alpha since g(c) = sum_l clip(c p_l,
       lo, 1) is continuous and non-decreasing, and lo <= rho <= 1). Any exact solver works; here
       the 2L breakpoints lo/p_l, 1/p_l are sorted and g is interpolated linearly between them.
   Exact no-op: if n >= T every alpha_l = 1 (everything kept, nothing merged), whatever E is.
3. Layer budgets S_l (tokens per KV head of layer l): x_l = alpha_l T; total = floor(sum_l x_l +
   1/2); largest remainder: S_l = floor(x_l), then +1 to the (total - sum floor) layers with the
   largest x_l - floor(x_l) (ties: lower layer first); finally S_l = max(S_l, 1) (this may raise
   the total above ``total`` when alpha_min T < 1; S_l <= T always holds).
4. Split (Sec. 4.4): M_l = min(S_l, floor(S_l b1 / (b1 + b2) + 1/2)) recent, N_l = S_l - M_l
   important, with ``split`` = (b1, b2) = (3, 1) for the paper, (1, 1) for the code.
5. Selection per layer and KV head: exactly LOOK-M's (lookm_ref.text_prior_select) with (M_l,
   N_l): H2O column sums over all prompt queries (GQA mean of the G query heads), recent window
   [T - M_l, T) forced, every text token before it kept (level above all visual tokens), then the
   top N_l - |text before the window| visual tokens by score, (level desc, score desc, position
   asc). Kept per head = M_l + max(N_l, |text before the window|): text overruns S_l, the same in
   every head of the layer. ``keep_all_text=False``: the same order, but exactly S_l = M_l + N_l
   are kept (lookm_ref's literal eq. 8 reading), so S_l holds.
6. Merge: every evicted token merged into its key-cosine nearest kept token. variant="paper":
   A-Merge of all evicted tokens (merge_ref.merge, rule "average"); variant="code": the released
   code's merge_ref.merge_code_compat(rule "average", misaligned=True): similarity filter and the
   src/index misalignment. merge=False evicts only (the paper's "without merging" ablation).
Text-only fallback (no image/video token in the row): the paper entropies are all 0 (both
directions empty), so alpha_l = clip(rho, lo, 1) = rho, uniform; the code entropy is defined for
any row and stays dynamic. Selection has no text priority (H2O with the (M_l, N_l) split), merging
is unchanged. A visual-only row likewise gets E = 0 (paper) and has no text to prioritise.
Not reproduced from the released code (deliberately): scoring with the first decoded token's
attention row and budgets from T+1, int() truncation of hh/recent, the recent window raised to
text_len + 100 (an artefact of its hard-coded 576-token image spans), and low-precision ties.

Output: "entropies" [L], "layer_fractions" [L] (alpha), "layer_budgets" [L] (S), "recent" [L] (M),
"important" [L] (N), "n", "rho", "kept" [L][K], "counts" [L, K], "k", "v" [L][K, C_l, H], "target"
[L][K], "overrun" [L, K] (counts - S_l).
"""

from __future__ import annotations

import math

import numpy as np

from references import lookm_ref


def _entropy(p, axis=-1):
  p = np.asarray(p, np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def cross_modal_entropy(
  q_NTH, k_KTH, scaling: float, modality, first_query: int = 0
) -> tuple[float, float]:
  """(H_TV, H_VT): mean row entropies of head-averaged, non-causal restricted softmaxes; the
  rows are the queries from ``first_query`` on (a conversation's next turn), the keys all."""
  is_text, is_vis = lookm_ref.modality_masks(modality)
  q_NTH, k_KTH = np.asarray(q_NTH, np.float64), np.asarray(k_KTH, np.float64)
  G = q_NTH.shape[0] // k_KTH.shape[0]
  s_NTT = np.einsum("nqh,nkh->nqk", q_NTH, np.repeat(k_KTH, G, axis=0)) * scaling
  out = []
  asked = np.arange(len(is_text)) >= first_query
  for rows, cols in ((is_text & asked, is_vis), (is_vis & asked, is_text)):
    if not rows.any() or not cols.any():
      out.append(0.0)
      continue
    p = _softmax(s_NTT[:, rows][:, :, cols]).mean(0)  # [n_rows, n_cols], averaged over heads
    out.append(float(_entropy(p).mean()))
  return out[0], out[1]


def row_entropy(attn_NTT) -> float:
  """Released-code entropy: mean over heads of the mean causal row entropy."""
  return float(_entropy(attn_NTT).mean())


def water_fill(p_L, rho: float, lo: float) -> np.ndarray:
  """alpha_l = clip(c p_l, lo, 1) with mean alpha = rho (lo <= rho <= 1, p_l > 0)."""
  p_L = np.asarray(p_L, np.float64)
  L = len(p_L)
  g = lambda c: np.clip(c * p_L, lo, 1.0).sum()
  b = np.unique(np.concatenate([lo / p_L, 1.0 / p_L]))
  gb = np.array([g(c) for c in b])
  k = int(np.searchsorted(gb, L * rho))  # first breakpoint with g >= L rho
  if k == 0:
    return np.full(L, lo)
  if k == len(b):
    return np.ones(L)
  c = b[k - 1] + (L * rho - gb[k - 1]) * (b[k] - b[k - 1]) / (gb[k] - gb[k - 1])
  return np.clip(c * p_L, lo, 1.0)


def layer_fractions(E_L, rho: float, alpha_min: float = 0.01, renormalise: bool = False):
  """alpha [L] from the layer entropies (module docstring, step 2)."""
  E_L = np.asarray(E_L, np.float64)
  if rho >= 1.0:
    return np.ones(len(E_L))
  p_L = _softmax(E_L) * len(E_L)
  lo = min(alpha_min, rho)
  if renormalise:
    return water_fill(p_L, rho, lo)
  return np.clip(rho * p_L, lo, 1.0)


def largest_remainder(x_L) -> np.ndarray:
  """Integers summing to floor(sum x + 1/2): floors, +1 by largest remainder (ties: lower layer)."""
  x_L = np.asarray(x_L, np.float64)
  base = np.floor(x_L)
  extra = int(math.floor(x_L.sum() + 0.5) - base.sum())
  order = np.lexsort((np.arange(len(x_L)), -(x_L - base)))
  out = base.astype(np.int64)
  out[order[:extra]] += 1
  return out


def layer_budgets(alpha_L, T: int) -> np.ndarray:
  """S [L]: largest-remainder rounding of alpha_l T, at least 1 per layer."""
  return np.maximum(largest_remainder(np.asarray(alpha_L, np.float64) * T), 1)


def meda(
  attn: list,
  keys: list,
  values: list,
  modality,
  *,
  queries: list | None = None,
  scaling: float | None = None,
  variant: str = "paper",
  ratio: float | None = None,
  tokens: int | None = None,
  split: tuple[int, int] | None = None,
  alpha_min: float = 0.01,
  renormalise: bool = False,
  merge: bool = True,
  keep_all_text: bool = True,
  first_query: int = 0,
) -> dict:
  """MEDA layer budgets, kept positions and merged K/V (module docstring); the paper entropy's
  rows are the queries from ``first_query`` on (``attn`` holds the rows that score)."""
  if variant not in ("paper", "code"):
    raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
  L, T = len(attn), attn[0].shape[-1]
  if ratio is None and tokens is None:
    ratio = 0.1 if variant == "paper" else 0.2
  n = lookm_ref.budget_n(T, ratio, tokens)
  rho = n / T
  b1, b2 = split if split is not None else ((3, 1) if variant == "paper" else (1, 1))
  if variant == "paper":
    if queries is None or scaling is None:
      raise ValueError("the paper entropy needs queries and scaling")
    E_L = np.array(
      [
        sum(cross_modal_entropy(q, k, scaling, modality, first_query))
        for q, k in zip(queries, keys)
      ]
    )
  else:
    E_L = np.array([row_entropy(a) for a in attn])
  alpha_L = layer_fractions(E_L, rho, alpha_min, renormalise)
  S_L = layer_budgets(alpha_L, T)
  M_L, N_L = np.array([lookm_ref.split(int(s), b1, b2) for s in S_L], np.int64).T
  rule = "average" if merge else None
  kept, merged = [], []
  for l in range(L):
    k_KTH, v_KTH = np.asarray(keys[l], np.float64), np.asarray(values[l], np.float64)
    score_KT = lookm_ref.colsum_scores(attn[l], k_KTH.shape[0])
    kept_K = lookm_ref.text_prior_select(
      score_KT, modality, int(M_L[l]), int(N_L[l]), keep_all_text=keep_all_text
    )
    kept.append(kept_K)
    merged.append(lookm_ref.merge_layer(k_KTH, v_KTH, kept_K, rule, variant == "code"))
  return lookm_ref.finish(
    kept,
    merged,
    S_L,
    entropies=E_L,
    layer_fractions=alpha_L,
    recent=M_L,
    important=N_L,
    n=n,
    rho=rho,
  )
