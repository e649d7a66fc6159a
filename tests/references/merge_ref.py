"""Dense NumPy reference for LOOK-M / MEDA KV merging (ALGORITHMS.md 1.1 step 4, 1.2 step 3g, 3.1).

One layer at a time. Inputs: ``keys`` / ``values`` [K, T, H] (keys after RoPE, KV heads not
repeated), ``kept`` a list over KV heads of the kept positions, ``evicted`` (optional) a list over
KV heads of the positions to merge away; by default every position of [0, T) that is not kept.
Both are used in ascending position order. Everything is float64. Never imports jmmkv.

Paper merge, `merge(..., rule)`, independently per KV head h:

1. Similarity on KEYS only: u[i, c] = <k_i, k_c> / (|k_i| |k_c|) for evicted i and kept c. A key of
   zero norm is normalised to the zero vector (cosine 0 with everything).
2. Assignment (many-to-one nearest neighbour): c*(i) = argmax_c u[i, c]; ties go to the LOWER kept
   position, and cosines within TIE = 1e-6 of the maximum count as ties (copies of one key must
   tie although float32 rounds their cosines differently). Every evicted token is assigned
   (nothing is filtered). If a head keeps nothing, its evicted tokens are dropped (target -1).
3. For each kept c with assigned set A_c (L_c = |A_c|; L_c = 0 leaves c unchanged), with x = k and
   x = v alike (the SAME assignment and the SAME key-cosine weights u for the values):
     average   (A-Merge)  x_c <- (x_c + sum_{i in A_c} x_i) / (L_c + 1)
     pivot     (P-Merge)  x_c <- (x_c + 1/2 sum_{i in A_c} (x_i + x_c)) / (L_c + 1)
     weighted  (W-Merge)  x_c <- (x_c + sum_{i in A_c} u[i, c] x_i) / (L_c + 1)
   All updates are simultaneous: the right-hand sides use the original, unmerged x_c and x_i.
   (P-Merge is what LOOK-M's code computes with scatter_reduce(mean, include_self=True) over the
   pivot averages (x_i + x_c)/2; A-Merge and W-Merge are the same scatter with x_i and u x_i.)

Released-code behaviour, `merge_code_compat(..., rule)` ("code-compat", NOT the paper). It mirrors
MEDA's `AttnEntropyTextAVGMergeKVCache_LayerWise` and LOOK-M's `TextAVGMergeKVCache_LayerWise` /
`AVGMergeKVCache_LayerWise` (rule "average"), the `*WeightedMerge*` classes ("weighted") and the
`*PivotMerge*` classes ("pivot"). The code holds one tensor per layer, so every KV head must evict
the same number E of tokens (ValueError otherwise). Evicted tokens are indexed by their RANK
m = 0..E-1 in ascending position order within each head (the m-th evicted token of different heads
is in general a different position). With u, c* as above:

1. mx[h, m] = max_c u[h, m, c] (the cosine to the nearest kept token, same tie rule).
2. Similarity filter, shared by all heads of the layer: rank m passes iff
   mean_h mx[h, m] >= mean_{h, m'} mx[h, m'] (h over the layer's K KV heads: the mean over heads
   of the rank's max-cosine against the global mean over all heads and ranks; ">=", float64; the
   released code, written for MHA, averages its attention heads). F = passing ranks, ascending.
   Ranks that do not pass are dropped, not merged.
3. average (misaligned=True, the released code's bug): slot j = 0..|F|-1 sends the j-th evicted
   token of head h (rank j, NOT rank F[j]) into the kept token c*(h, F[j]): the index list is
   filtered but the source tensor is not, and scatter_reduce reads the first |F| sources. Then
   x_c <- (x_c + sum of the sources sent to c) / (1 + their count), for k and v with the same
   pairing. misaligned=False pairs rank F[j] with c*(h, F[j]) (filter only, no bug).
4. weighted: filtered and correctly aligned (ALGORITHMS.md 3.1 "Code": the official W-Merge,
   TextWeightedMerge_LayerWise, applies the same filter without the misalignment), with the W-Merge
   weight u[i, c*(i)] = mx:
   x_c <- (x_c + sum_j mx[h, F[j]] x_{F[j]}) / (1 + count), over the j with c*(h, F[j]) = c.
5. pivot: no filter, no misalignment: identical to the paper P-Merge.

Output of both: dict with "k", "v" [K, C, H] (kept slots in ascending position order, C = the
largest kept count of the layer, zero padded), "counts" [K], "target" (list over heads of int
arrays [E_h]: the kept position each evicted token, in ascending evicted order, was added into; -1
when it was dropped) and "nearest" (list over heads: c*(i) as a kept position, -1 when nothing is
kept). In the misaligned case target[j] is c*(h, F[j]) for the evicted token of rank j.
"""

from __future__ import annotations

import numpy as np

RULES = ("average", "pivot", "weighted")


def _positions(kept, evicted, T: int):
  kept = [np.sort(np.asarray(p, np.int64)) for p in kept]
  if evicted is None:
    evicted = [np.setdiff1d(np.arange(T), p) for p in kept]
  evicted = [np.sort(np.asarray(p, np.int64)) for p in evicted]
  for p, e in zip(kept, evicted):
    if np.intersect1d(p, e).size:
      raise ValueError("a position is both kept and evicted")
  return kept, evicted


def cosine(a_IH: np.ndarray, b_JH: np.ndarray) -> np.ndarray:
  """[I, J] cosine similarity; zero-norm rows count as zero vectors."""

  def unit(x):
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)

  return unit(np.asarray(a_IH, np.float64)) @ unit(np.asarray(b_JH, np.float64)).T


TIE = 1e-6


def nearest(k_TH: np.ndarray, kept: np.ndarray, evicted: np.ndarray):
  """(index into ``kept`` [E], max cosine [E]) of each evicted token; ties -> lower kept slot."""
  if len(kept) == 0 or len(evicted) == 0:
    return np.full(len(evicted), -1, np.int64), np.zeros(len(evicted))
  u_EC = cosine(k_TH[evicted], k_TH[kept])
  near = u_EC >= u_EC.max(axis=1, keepdims=True) - TIE
  idx = np.argmax(near, axis=1)  # first near-maximum = lowest kept position (kept is ascending)
  return idx, u_EC[np.arange(len(evicted)), idx]


def _apply(x_TH, kept, src_pos, dst_slot, weight, rule):
  """Merged x at the kept slots: each (src_pos[j] -> dst_slot[j], weight[j]) pair is one merge."""
  x_TH = np.asarray(x_TH, np.float64)
  base_CH = x_TH[kept].copy()
  acc_CH = np.zeros_like(base_CH)
  cnt_C = np.zeros(len(kept))
  for s, c, w in zip(src_pos, dst_slot, weight):
    if rule == "average":
      acc_CH[c] += x_TH[s]
    elif rule == "pivot":
      acc_CH[c] += 0.5 * (x_TH[s] + base_CH[c])
    elif rule == "weighted":
      acc_CH[c] += w * x_TH[s]
    else:
      raise ValueError(f"merge rule must be one of {RULES}, got {rule!r}")
    cnt_C[c] += 1
  return (base_CH + acc_CH) / (cnt_C + 1.0)[:, None]


def _pack(kept, k_list, v_list, target, near):
  K, H = len(kept), k_list[0].shape[-1] if k_list else 0
  C = max((len(p) for p in kept), default=0)
  k_out, v_out = np.zeros((K, C, H)), np.zeros((K, C, v_list[0].shape[-1] if v_list else 0))
  for j, p in enumerate(kept):
    k_out[j, : len(p)] = k_list[j]
    v_out[j, : len(p)] = v_list[j]
  counts = np.array([len(p) for p in kept], np.int64)
  return {"k": k_out, "v": v_out, "counts": counts, "target": target, "nearest": near}


def merge(keys_KTH, values_KTH, kept, evicted=None, rule: str = "average") -> dict:
  """Paper merge (A/P/W-Merge) of one layer; see the module docstring."""
  if rule not in RULES:
    raise ValueError(f"merge rule must be one of {RULES}, got {rule!r}")
  keys_KTH = np.asarray(keys_KTH, np.float64)
  values_KTH = np.asarray(values_KTH, np.float64)
  kept, evicted = _positions(kept, evicted, keys_KTH.shape[1])
  ks, vs, target, near = [], [], [], []
  for h, (p, e) in enumerate(zip(kept, evicted)):
    slot, u = nearest(keys_KTH[h], p, e)
    ok = slot >= 0
    ks.append(_apply(keys_KTH[h], p, e[ok], slot[ok], u[ok], rule))
    vs.append(_apply(values_KTH[h], p, e[ok], slot[ok], u[ok], rule))
    pos = np.where(ok, p[np.maximum(slot, 0)] if len(p) else -1, -1)
    target.append(pos)
    near.append(pos.copy())
  return _pack(kept, ks, vs, target, near)


def merge_code_compat(
  keys_KTH, values_KTH, kept, evicted=None, rule: str = "average", misaligned: bool = True
) -> dict:
  """The released code's merge (similarity filter, src/index misalignment); module docstring."""
  if rule not in RULES:
    raise ValueError(f"merge rule must be one of {RULES}, got {rule!r}")
  if rule == "pivot":
    return merge(keys_KTH, values_KTH, kept, evicted, "pivot")
  keys_KTH = np.asarray(keys_KTH, np.float64)
  values_KTH = np.asarray(values_KTH, np.float64)
  kept, evicted = _positions(kept, evicted, keys_KTH.shape[1])
  E = {len(e) for e in evicted}
  if len(E) != 1:
    raise ValueError(f"code-compat merge needs the same evicted count in every head, got {E}")
  E = E.pop()
  slots, mx = zip(*(nearest(keys_KTH[h], p, e) for h, (p, e) in enumerate(zip(kept, evicted))))
  mx_KE = np.stack(mx)
  passing = np.flatnonzero(mx_KE.mean(0) >= mx_KE.mean()) if E else np.zeros(0, np.int64)
  ks, vs, target, near = [], [], [], []
  for h, (p, e) in enumerate(zip(kept, evicted)):
    slot = slots[h]
    near.append(np.where(slot >= 0, p[np.maximum(slot, 0)] if len(p) else -1, -1))
    dst = slot[passing]
    src_rank = np.arange(len(passing)) if (rule == "average" and misaligned) else passing
    ok = dst >= 0
    src_pos, dst, w = e[src_rank][ok], dst[ok], mx_KE[h, passing][ok]
    ks.append(_apply(keys_KTH[h], p, src_pos, dst, w, rule))
    vs.append(_apply(values_KTH[h], p, src_pos, dst, w, rule))
    tgt = np.full(E, -1, np.int64)
    tgt[src_rank[ok]] = p[dst]
    target.append(tgt)
  return _pack(kept, ks, vs, target, near)
