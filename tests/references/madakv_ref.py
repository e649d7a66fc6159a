"""NumPy reference for MadaKV (Li et al., ACL 2025): Modality Preference Adaptation (MPA) and
Hierarchical Compression Compensation (HCC), readings A, B and C (the budget-conserving
reading, jmmkv's default), and the two ablations.

Written from ALGORITHMS.md 2.2-2.3 (the paper's equations are known only from secondary notes).
This docstring is the executable spec jmmkv implements; every choice is stated. One unpadded
row, float64. Notation: T prompt length, L layers (l = 0 .. L-1), N query heads, Kh KV heads,
G = N / Kh. A "slot" is one kept token of one KV head; every budget below counts slots per KV
head, proxy window included.

1. Budget. n = min(T, max(1, ceil(ratio * T))) or n = min(tokens, T) (`jmmkv.Budget.kept`).
   If n == T, every head of every layer keeps all T tokens (an exact no-op for every reading and
   ablation); scores, demands and budgets are still reported (layer_budgets then all T).
2. Scores. p = min(proxy_window, T). Proxy (window) positions are T-p .. T-1; candidates are
   0 .. T-p-1. Query head q: psi_q(i) = sum_{j = T-p}^{T-1} A_q[j, i] over the given causal
   probabilities (inside the window only i <= j contributes), for all i; no pooling. KV head k:
   psi_k = MEAN of psi_q over its query heads q = k*G .. k*G+G-1.
   Pooling (option `kernel`, odd, default 1 = none, as the paper): with kernel > 1, before the
   GQA mean, psi_q over the candidates 0 .. T-p-1 only is average-pooled along positions as
   SnapKV does: pooled(i) = (1/kernel) * sum of psi_q(j) over candidates j with |j - i| <=
   kernel // 2 (positions outside the candidates count as zeros, the divisor stays kernel). The
   window positions keep their unpooled psi_q. Every later step (weights, demands, rankings)
   uses this psi.
3. Modalities. Visual = modality 2 (image) or 3 (video); text = any other id (1). Over the
   candidates only: n_v, n_t = counts; w_v, w_t = sums of psi_k over visual / text candidates.
4. Demand (per layer, KV head and modality m). Sort psi_k of the candidates of modality m
   descending; S(j) = sum of the j largest (S(0) = 0); w_m = S(n_m). k_m = #{j in 0 .. n_m-1 :
   S(j) < theta * w_m}, i.e. the smallest j with S(j) >= theta * w_m (0 when n_m = 0 or w_m = 0).
   Demand in slots: d = p + k_v + k_t (the window is always needed). Readings A and B: demands
   are per modality also when mpa=False (the ablation removes only MPA's split). Reading C with
   mpa=False ("HCC only"): the demand is modality-blind, d = p + k_a, where k_a is the same count
   over all candidates together (w_a = w_v + w_t); k_v and k_t are still reported.
5. Layer budgets phi^l (integers, per KV head). phi^0 = n; hcc=False: phi^l = n for every l.
   hcc=True, readings A and B (reading C: item 6C): X^l = sum over KV heads of x^{l,k}, with
   x = d (reading A: raw demand) or x = b (reading B: the head's kept slot count, item 6);
   compensation K^l = X^l - Kh * phi^l. With r = L-1-l (layers after l; update for l < L-1 only):
     per_head:    phi^{l+1} = phi^l - K^l / (Kh*r) = (Kh*(r+1)*phi^l - X^l) / (Kh*r)
     layer_total: phi^{l+1} = phi^l - K^l / r     = ((r+Kh)*phi^l - X^l) / r
   evaluated in exact integers with FLOOR division (toward -inf), then clamped to [1, T].
   per_head is the paper's update, 1-indexed layers there, in consistent units: it spreads the
   slots left after layer l evenly over the r later layers. layer_total is the update as
   printed, a layer total K^l subtracted from a per-head budget (Kh times stronger). Taking
   phi^l itself as a layer total (Kh*phi) reduces exactly to per_head, so it is not an option.
6. Slots b of head k in layer l. hcc=False (either reading): b = phi^l = n.
   Reading A: b = phi^l; HCC moves only the budgets of later layers. The total kept is
     Kh * sum_l phi^l, which is NOT L*Kh*n in general (the update subtracts demand, not spend).
   Reading B: b = clip(d, b_min, cap^l), the head's own demand, with
     cap^l = clip((L-l) * phi^l - b_min * (L-1-l), b_min, T) if pool_cap else T.
     cap^l is the per-head pool still left for layers l .. L-1 (phi^l spread evenly), less a
     floor of b_min for each later layer. The paper clips only to [b_min, T], which never binds
     from above, so the budget would be ignored; pool_cap=False gives that literal form. With
     per_head units, pool_cap and n >= b_min, floor division guarantees sum of counts <= L*Kh*n.
     The window survives in every layer only if b_min >= p.
6C. Reading C (budget-conserving, the default; hcc=True, n < T). Every quantity is an integer
   except the quotas q below. b_min is taken as min(b_min, T). R^l: the slots left for layers
   l .. L-1, R^0 = L*Kh*n; r = L-1-l.
   a. Layer slots: D^l = sum_k d^{l,k}; share^l = floor(R^l / (r+1)) (the equal spread of what is
      left: the HCC update phi^{l+1} = phi^l - K^l / (Kh*r), per head, in consistent units);
      hi^l = min(Kh*T, R^l - r*Kh*b_min) (later layers keep at least b_min per head);
      S^l = max(Kh*b_min, min(max(D^l, share^l), hi^l)). A layer whose heads demand more than
      its share keeps its demand and the later layers pay; one that demands less keeps its share.
      The last layer (r = 0) keeps max(Kh*b_min, min(R, Kh*T)): what remains.
   b. Heads: b^{l,k} = b_min + e_k, the extra E = S^l - Kh*b_min split in proportion to the
      weights u_k = max(d^{l,k} - b_min, 0), each e_k at most cap = T - b_min. Water-filling:
      start with every head free; repeat (at most Kh times): F = the free heads, E_F = E minus
      cap for every capped head, U_F = sum of u_k over F; quota q_k = E_F * u_k / U_F (E_F / |F|
      for every k in F when U_F == 0), evaluated in float32 as fl(fl(float32(E_F) *
      float32(u_k)) / float32(U_F)) (fl(float32(E_F) / float32(|F|)) when U_F == 0); every head
      of F with q_k > cap becomes capped (e_k = cap); stop when none did. Then for k in F:
      e_k = floor(q_k) + adjust, where leftover = E_F - sum_{F} floor(q_k) and the heads of F are
      ranked by the fractional part q_k - floor(q_k) descending, ties to the lower k (rank rho_k
      = 0 .. |F|-1): adjust = +1 if rho_k < leftover, -1 if rho_k >= |F| + leftover (only when
      leftover < 0, a float32 rounding case), else 0. So sum_k b^{l,k} = S^l, and when S^l equals
      D^l (and every d >= b_min) each head keeps exactly its demand.
   c. R^{l+1} = R^l - S^l. The total kept is L*Kh*n whenever n >= b_min and no layer hits
      Kh*T; rounding in share^l only moves slots to later layers.
   d. Reported: "layer_budgets"[l] = floor(R^l / (Kh*(r+1))) (phi^l per head), "caps"[l] = hi^l,
      "layer_slots"[l] = S^l, "remaining"[l] = R^l, "compensation"[l] = S^l - share^l (K^l in
      layer units).
7. Selection in a head with b slots (ties always: psi desc, then position asc).
   a. Window: keep the top min(b, p) window positions by psi (all p when b >= p).
   b. c = max(0, b - p) candidate slots.
   c. mpa=False: the top c candidates by psi, modality blind (reading C: this is "HCC only").
   d. mpa=True: (c_v, c_t) = (k_v, k_t) in readings B and C with hcc when b == d (the head keeps
      exactly its demand);
      otherwise the MPA split: f = w_v / (w_v + w_t) (f = 0 if w_v + w_t == 0),
      c_v = clip(floor(c * f + 1/2), max(0, c - n_t), min(c, n_v)), c_t = c - c_v, so a
      modality with fewer candidates than its share passes the surplus to the other. Keep the top
      c_v visual and top c_t text candidates by psi.
   A row with no visual (or no text) candidates needs no special case: all c go to the present
   modality, so the selection equals mpa=False with the same b (HCC still runs).
8. Float -> integer steps are only S(j) < theta * w_m, floor(c * f + 1/2) and the psi orderings;
   budgets are exact integers after that. float32 can differ from this float64 reference only
   when a value lies within rounding of such a threshold (rare on random data).

Outputs (dict): "kept" [L][Kh] sorted positions; "counts" [L, Kh] (= b); "layer_budgets" [L]
(phi^l); "caps" [L] (cap^l; phi^l in reading A, with hcc=False or when n == T); "compensation"
[L] (K^l for every layer, the last included; 0 without hcc or when n == T); "demand"
[L, Kh, 2] (k_v, k_t); "demand_slots" [L, Kh] (d); "modality_split" [L, Kh, 2] kept visual /
text slots, window included; "candidate_split" [L, Kh, 2] kept visual / text candidates;
"modality_weights" [L, Kh, 2] (w_v, w_t); "psi" [L, Kh, T]; "n"; "proxy" (p); "k", "v"
[L][Kh, max count, H] zero-padded, ascending positions, when keys / values are given.
"""

from __future__ import annotations

import math

import numpy as np

VISUAL = (2, 3)


def kept_tokens(t: int, ratio: float | None = None, tokens: int | None = None) -> int:
  """n: slots per layer and KV head (item 1)."""
  if (ratio is None) == (tokens is None):
    raise ValueError("give exactly one of ratio or tokens")
  if ratio is not None:
    return min(t, max(1, math.ceil(ratio * t)))
  return min(int(tokens), t)


def check_kernel(kernel) -> int:
  """The pooling kernel as an int: a positive odd integer (item 2), else ValueError."""
  if isinstance(kernel, bool) or not isinstance(kernel, (int, np.integer)):
    raise ValueError(f"kernel must be a positive odd integer, got {kernel!r}")
  if kernel < 1 or kernel % 2 == 0:
    raise ValueError(f"kernel must be a positive odd integer, got {kernel!r}")
  return int(kernel)


def pool_psi(psi: np.ndarray, n_cand: int, kernel: int = 1) -> np.ndarray:
  """psi [..., T] with the candidates 0 .. n_cand-1 average-pooled along positions (item 2):
  pooled(i) = (1/kernel) * sum of psi(j) over candidates j with |j - i| <= kernel // 2,
  positions outside the candidates count as zeros, the divisor is always kernel; positions
  n_cand .. T-1 (the window) are returned unpooled. kernel == 1 returns psi unchanged."""
  kernel = check_kernel(kernel)
  psi = np.asarray(psi, np.float64)
  if kernel == 1:
    return psi
  half = kernel // 2
  out = psi.copy()
  padded = np.zeros(psi.shape[:-1] + (n_cand + 2 * half,))
  padded[..., half : half + n_cand] = psi[..., :n_cand]
  total = np.zeros(psi.shape[:-1] + (n_cand,))
  for off in range(kernel):  # padded[i + off] is psi(i + off - half)
    total += padded[..., off : off + n_cand]
  out[..., :n_cand] = total / kernel
  return out


def proxy_scores(attn_NTT: np.ndarray, n_kv: int, proxy_window: int, kernel: int = 1) -> np.ndarray:
  """psi [Kh, T]: proxy-row sums per query head, candidates pooled with `kernel` (window
  unpooled), then the GQA mean per KV head (item 2)."""
  n, t, _ = attn_NTT.shape
  p = min(proxy_window, t)
  psi_NT = np.asarray(attn_NTT, np.float64)[:, t - p :, :].sum(1)
  psi_NT = pool_psi(psi_NT, t - p, kernel)
  return psi_NT.reshape(n_kv, n // n_kv, t).mean(1)


def demand(psi: np.ndarray, theta: float) -> int:
  """k_m: the smallest number of the largest scores whose sum reaches theta * total (item 4)."""
  s = np.concatenate([[0.0], np.cumsum(np.sort(psi)[::-1])])
  return int(np.sum(s[:-1] < theta * s[-1]))


def mpa_split(c: int, w_v: float, w_t: float, n_v: int, n_t: int) -> tuple[int, int]:
  """(c_v, c_t): c candidate slots split by modality preference, surplus passed on (item 7d)."""
  f = w_v / (w_v + w_t) if w_v + w_t > 0 else 0.0
  c_v = int(np.clip(math.floor(c * f + 0.5), max(0, c - n_t), min(c, n_v)))
  return c_v, c - c_v


def next_budget(phi: int, x_sum: int, layer: int, n_layers: int, n_kv: int, t: int, units: str):
  """phi^{l+1} from phi^l and X^l (item 5), exact integers, floor division, clamp [1, T]."""
  r = n_layers - 1 - layer
  if units == "per_head":
    num, den = n_kv * (r + 1) * phi - x_sum, n_kv * r
  elif units == "layer_total":
    num, den = (r + n_kv) * phi - x_sum, r
  else:
    raise ValueError(f"hcc_units must be per_head or layer_total, got {units!r}")
  return int(min(t, max(1, num // den)))


def layer_slots(rem: int, d_sum: int, r: int, n_kv: int, t: int, b_min: int):
  """(S^l, share^l, hi^l) of reading C (item 6C.a) from R^l, D^l and r = L-1-l; exact integers."""
  b_min = min(int(b_min), int(t))
  share = int(rem) // (r + 1)
  hi = min(n_kv * int(t), int(rem) - r * n_kv * b_min)
  return max(n_kv * b_min, min(max(int(d_sum), share), hi)), share, hi


def _quotas(extra: int, u: list[int], free: list[int], cap: int):
  """(E_F, {k: q_k}) over the free heads, q_k in float32 (item 6C.b)."""
  e_f = extra - cap * (len(u) - len(free))
  u_f = sum(u[k] for k in free)
  if u_f == 0:
    q = np.float32(e_f) / np.float32(len(free))
    return e_f, {k: q for k in free}
  return e_f, {k: (np.float32(e_f) * np.float32(u[k])) / np.float32(u_f) for k in free}


def allocate(s: int, d, b_min: int, t: int) -> np.ndarray:
  """b^{l,k} [Kh] (item 6C.b): S slots, b_min each plus the extra water-filled in proportion to
  max(d_k - b_min, 0), each head at most T, float32 quotas, largest-remainder rounding."""
  d = [int(x) for x in np.asarray(d).reshape(-1)]
  kh = len(d)
  b_min = min(int(b_min), int(t))
  cap = int(t) - b_min
  extra = int(s) - kh * b_min
  u = [max(x - b_min, 0) for x in d]
  e = [0] * kh
  capped = [False] * kh
  for _ in range(kh):
    free = [k for k in range(kh) if not capped[k]]
    if not free:
      break
    _, q = _quotas(extra, u, free, cap)
    over = [k for k in free if float(q[k]) > cap]
    if not over:
      break
    for k in over:
      capped[k], e[k] = True, cap
  free = [k for k in range(kh) if not capped[k]]
  if free:
    e_f, q = _quotas(extra, u, free, cap)
    fl = {k: math.floor(float(q[k])) for k in free}
    leftover = e_f - sum(fl.values())
    ranked = sorted(free, key=lambda k: (-(float(q[k]) - fl[k]), k))
    for rho, k in enumerate(ranked):
      adjust = 1 if rho < leftover else (-1 if rho >= len(free) + leftover else 0)
      e[k] = fl[k] + adjust
  return np.array([b_min + x for x in e], np.int64)


def _top(pos: np.ndarray, psi: np.ndarray, k: int) -> np.ndarray:
  """The k positions of `pos` with the largest psi, ties to the lower position."""
  order = np.lexsort((pos, -psi[pos]))
  return pos[order[:k]]


def _select_head(psi, visual, p, b, split, mpa):
  """Item 7: kept positions (ascending) and the (visual, text) candidate counts."""
  t = psi.shape[0]
  window = _top(np.arange(t - p, t), psi, min(b, p))
  cand = np.arange(t - p)
  c = max(0, b - p)
  if mpa:
    chosen = np.concatenate(
      [_top(cand[visual[cand]], psi, split[0]), _top(cand[~visual[cand]], psi, split[1])]
    )
  else:
    chosen = _top(cand, psi, c)
  kept = np.sort(np.concatenate([window, chosen])).astype(np.int64)
  return kept, (int(visual[chosen].sum()), int((~visual[chosen]).sum()))


def madakv_ref(
  attn,
  keys=None,
  values=None,
  modality=None,
  ratio: float | None = None,
  tokens: int | None = None,
  proxy_window: int = 32,
  theta: float = 0.9,
  reading: str = "C",
  hcc_units: str = "per_head",
  mpa: bool = True,
  hcc: bool = True,
  b_min: int = 1,
  pool_cap: bool = True,
  n_kv: int | None = None,
  kernel: int = 1,
) -> dict:
  """MadaKV on one row. attn: [L][N, T, T] causal probabilities; keys / values: [L][Kh, T, H]
  or None (then n_kv gives Kh, default N); modality: [T] ids (1 text, 2 image, 3 video);
  reading: "A", "B" or "C" (items 5, 6, 6C); kernel: odd psi pooling width (item 2, 1 = none)."""
  kernel = check_kernel(kernel)
  if reading not in ("A", "B", "C"):
    raise ValueError(f"reading must be 'A', 'B' or 'C', got {reading!r}")
  n_layers = len(attn)
  n_heads, t, _ = np.shape(attn[0])
  kh = keys[0].shape[0] if keys is not None else (n_kv or n_heads)
  n = kept_tokens(t, ratio, tokens)
  p = min(proxy_window, t)
  visual = np.isin(np.asarray(modality), VISUAL)
  cand_vis = visual[: t - p]
  n_v, n_t = int(cand_vis.sum()), int((~cand_vis).sum())

  psi = np.stack([proxy_scores(a, kh, proxy_window, kernel) for a in attn])  # [L, Kh, T]
  w = np.stack(
    [psi[..., : t - p][..., cand_vis].sum(-1), psi[..., : t - p][..., ~cand_vis].sum(-1)], -1
  )
  dem = np.zeros((n_layers, kh, 2), np.int64)
  d = np.zeros((n_layers, kh), np.int64)
  blind = reading == "C" and not mpa  # item 4: modality-blind demand d = p + k_a
  for l in range(n_layers):
    for k in range(kh):
      cand = psi[l, k, : t - p]
      dem[l, k] = demand(cand[cand_vis], theta), demand(cand[~cand_vis], theta)
      d[l, k] = p + (demand(cand, theta) if blind else int(dem[l, k].sum()))

  counts = np.zeros((n_layers, kh), np.int64)
  budgets = np.zeros(n_layers, np.int64)
  caps = np.zeros(n_layers, np.int64)
  comp = np.zeros(n_layers, np.int64)
  slots = np.zeros(n_layers, np.int64)
  remaining = np.zeros(n_layers, np.int64)
  adaptive = hcc and n < t
  rem = n_layers * kh * n
  phi = n
  for l in range(n_layers):  # budgets and slot counts (items 5, 6, 6C)
    r = n_layers - 1 - l
    remaining[l] = rem
    if reading == "C" and adaptive:
      budgets[l] = rem // (kh * (r + 1))
      slots[l], share, caps[l] = layer_slots(rem, int(d[l].sum()), r, kh, t, b_min)
      comp[l] = slots[l] - share
      counts[l] = allocate(int(slots[l]), d[l], b_min, t)
      rem -= int(slots[l])
      continue
    budgets[l] = phi
    if reading == "B" and adaptive:
      caps[l] = min(t, max(b_min, (r + 1) * phi - b_min * r)) if pool_cap else t
      counts[l] = np.clip(d[l], b_min, caps[l])
    else:
      caps[l] = phi
      counts[l] = phi
    slots[l] = counts[l].sum()
    rem -= int(slots[l])
    if adaptive:
      x_sum = int(d[l].sum() if reading == "A" else counts[l].sum())
      comp[l] = x_sum - kh * phi
      if l < n_layers - 1:
        phi = next_budget(phi, x_sum, l, n_layers, kh, t, hcc_units)

  msplit = np.zeros((n_layers, kh, 2), np.int64)
  csplit = np.zeros((n_layers, kh, 2), np.int64)
  kept = []
  for l in range(n_layers):  # selection (item 7)
    row = []
    for k in range(kh):
      b = int(counts[l, k])
      if reading in ("B", "C") and adaptive and b == d[l, k]:
        split = (int(dem[l, k, 0]), int(dem[l, k, 1]))
      else:
        split = mpa_split(max(0, b - p), w[l, k, 0], w[l, k, 1], n_v, n_t)
      pos, csplit[l, k] = _select_head(psi[l, k], visual, p, b, split, mpa)
      msplit[l, k] = visual[pos].sum(), (~visual[pos]).sum()
      row.append(pos)
    kept.append(row)

  out = {
    "kept": kept,
    "counts": counts,
    "layer_budgets": budgets,
    "caps": caps,
    "compensation": comp,
    "demand": dem,
    "demand_slots": d,
    "modality_split": msplit,
    "candidate_split": csplit,
    "modality_weights": w,
    "psi": psi,
    "n": n,
    "proxy": p,
  }
  if reading == "C":
    out["layer_slots"], out["remaining"] = slots, remaining
  for name, src in (("k", keys), ("v", values)):
    if src is not None:
      out[name] = [_gather(np.asarray(src[l], np.float64), kept[l]) for l in range(n_layers)]
  return out


def _gather(x_KTH: np.ndarray, kept_l) -> np.ndarray:
  """[Kh, max count, H]: kept rows per head in ascending position order, zero padded."""
  c = max(len(pos) for pos in kept_l)
  out = np.zeros((x_KTH.shape[0], c, x_KTH.shape[2]))
  for k, pos in enumerate(kept_l):
    out[k, : len(pos)] = x_KTH[k, pos]
  return out
