"""Merging evicted KV into kept KV by key-cosine nearest neighbour (LOOK-M A/P/W rules, MEDA).

Per (layer, row, KV head): every evicted token i is assigned to the kept token c*(i) whose key has
the largest cosine u_i with k_i (ties, and cosines within TIE of the best, go to the lower
position, so copies of one key tie although float32 rounds their cosines differently; a zero key
has cosine 0 with everything); then, for x = k and x = v alike, with A_c the tokens merged into c
and L_c = |A_c|:
  average   x_c <- (x_c + sum_i x_i) / (L_c + 1)              A-Merge (paper: every i merged)
  pivot     x_c <- (x_c + 1/2 sum_i (x_i + x_c)) / (L_c + 1)  P-Merge (paper = released code)
  weighted  x_c <- (x_c + sum_i u_i x_i) / (L_c + 1)          W-Merge (paper: every i merged)
The released code's merges (not the papers') filter first, per layer and batch row: with m the
rank of an evicted token among its head's evicted tokens (ascending positions; every KV head of a
row evicts the same number E; kept and padding tokens have no rank), rank m passes when the mean
of u at rank m over the row's K KV heads (the code, MHA, averages its heads) is >= the global
mean of u over those K x E (head, rank) pairs (u = 0 where a head keeps nothing); the other ranks
are dropped, not merged (`code_targets`):
  average-code   A-Merge of the passing ranks with the released index misalignment: the j-th
                 passing rank's target receives the head's rank-j token (MEDA's and LOOK-M's
                 TextAVGMerge classes; MEDA variant "code")
  weighted-code  W-Merge of the passing tokens themselves (LOOK-M's TextWeightedMerge)
All in float32; evicted tokens are processed in blocks and merged sums row by row, so no T x T
and no [rows, T, H] array is built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jmmkv import sharding
from jmmkv.cache.select import positions_from_mask
from jmmkv.kernels import order
from jmmkv.typing import Array

RULES = ("average", "pivot", "weighted")  # the papers: every evicted token merged
CODE_RULES = ("average-code", "weighted-code")  # the released code's filtered merges
CODE_COMPAT = CODE_RULES[0]  # MEDA's "code" variant
TIE = 1e-6  # cosines this close to the best are ties
SUB_FROM = 5120  # kept tokens from which `nearest` searches by sub-blocks (measured crossover)


def _unit(x):
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1.0), 0.0)


def nearest(
  k_RTH: Array,
  keep_RT: Array,
  evict_RT: Array,
  block: int = 128,
  groups: int = 1,
  sub: int = 64,
  sub_from: int = SUB_FROM,
  kept_width: int | None = None,
):
  """Per row r (a flattened layer x batch x head): the kept target of every token ``[R, T]``
  (-1 unless evicted) and its cosine ``[R, T]`` (0 where there is none). ``kept_width``: a static
  bound on any row's kept count (the compacted kept keys are that wide, not T).

  ``groups`` > 1 splits the rows into that many consecutive groups (e.g. layers), searched one
  after another, each with its own trip counts: where counts differ between groups (per-layer
  budgets), the search costs the sum over groups of evicted x kept, not the rows' worst case.

  Only evicted x kept pairs are scored: both sets are compacted to the front (ascending
  positions), and query / key blocks run up to the largest count over rows (dynamic trip counts,
  nothing recompiles), so a 20% budget costs about 0.8 x 0.2 of the all-pairs search. Two
  searches give the same answer; the largest kept count picks one at run time:
  - below ``sub_from``, `_slot_search`: each block of cosines is reduced twice over the kept
    axis (the max, then the lowest slot holding it);
  - from ``sub_from`` on (when ``sub`` divides the block), `_sub_search`: the loop keeps only
    the best ``sub``-slot sub-block (a max fused with the matmul), and the slot within it is
    found once at the end from that sub-block's keys. The end reads evicted x ``sub`` keys,
    which pays off once kept >> ``sub`` (2 CPU cores, 64 rows, H = 64, 16k tokens: 3.3 s
    against 4.1 s with 8192 kept; the two break even between 4.1k and 5.7k kept)."""
  r, t, _ = k_RTH.shape
  if groups > 1:
    if r % groups:
      raise ValueError(f"{r} rows do not split into {groups} groups")
    split = lambda x: x.reshape((groups, r // groups) + x.shape[1:])
    # Fewer rows per step: twice the block keeps each step's work (and speed) about the same.
    inner = lambda a: nearest(
      *a, block=2 * block, sub=sub, sub_from=sub_from, kept_width=kept_width
    )
    out = jax.lax.map(inner, (split(k_RTH), split(keep_RT), split(evict_RT)))
    return tuple(x.reshape((r,) + x.shape[2:]) for x in out)
  block = min(block, t)
  tp = -(-t // block) * block
  kp = tp if kept_width is None else min(tp, -(-max(1, kept_width) // block) * block)

  def compacted(mask_RT, width):  # ascending positions [R, width], -1 after
    pos = positions_from_mask(mask_RT, min(width, t))
    return jnp.pad(pos, ((0, 0), (0, width - pos.shape[1])), constant_values=-1)

  def unit_keys(pos_RX):  # [R, X, H] float32 (no unit copy of every key)
    keys = jnp.take_along_axis(k_RTH, jnp.maximum(pos_RX, 0)[..., None], axis=1)
    return _unit(keys.astype(jnp.float32))

  kept_pos = compacted(keep_RT, kp)
  kept = kept_pos, unit_keys(kept_pos)
  ev_pos = compacted(evict_RT, tp)  # their unit keys are made block by block
  n_kept = keep_RT.sum(-1).max()
  key_blocks = (n_kept + block - 1) // block

  def query_block(search, qi, out):
    q_RQH = unit_keys(jax.lax.dynamic_slice_in_dim(ev_pos, qi * block, block, axis=1))
    found = search(q_RQH, kept, key_blocks, block)
    return tuple(jax.lax.dynamic_update_slice(o, f, (0, qi * block)) for o, f in zip(out, found))

  def scan(search):
    init = (jnp.full((r, tp), -1, jnp.int32), jnp.zeros((r, tp), jnp.float32))
    q_blocks = (evict_RT.sum(-1).max() + block - 1) // block
    return jax.lax.fori_loop(0, q_blocks, functools.partial(query_block, search), init)

  if block % sub:
    tgt_R_, cos_R_ = scan(_slot_search)
  else:
    # Padding slots score -4 through an extra key coordinate (exact for the rest): a mask pass
    # would break the fused max. Built once, outside the loops.
    pad = jnp.where(kept[0] >= 0, 0.0, -4.0)[..., None]
    by_sub = functools.partial(_sub_search, sub=sub, kept_aug=jnp.concatenate([kept[1], pad], -1))
    tgt_R_, cos_R_ = jax.lax.cond(
      n_kept >= sub_from, lambda: scan(by_sub), lambda: scan(_slot_search)
    )
  live = (ev_pos >= 0) & (tgt_R_ >= 0)
  rows = jnp.arange(r)[:, None]
  dest = jnp.where(live, ev_pos, t)  # t: a discarded column
  target = jnp.full((r, t + 1), -1, jnp.int32).at[rows, dest].set(tgt_R_)[:, :t]
  best = jnp.zeros((r, t + 1), jnp.float32).at[rows, dest].set(jnp.where(live, cos_R_, 0.0))[:, :t]
  return target, best


def _slot_search(q_RQH, kept, key_blocks, block):
  """(kept position ``[R, Q]``, -1 for none; cosine ``[R, Q]``) for one block of evicted unit
  keys. Each block of cosines is laid out [R, kept, evicted] and reduced twice over the kept
  axis: XLA's CPU argmax is a scalar loop, these two reductions vectorise (about 3.5x faster at
  128 x 128 blocks, which stay in cache)."""
  kept_pos, kept_unit = kept
  r, q = q_RQH.shape[:2]
  cut = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1)
  slot = jnp.arange(block, dtype=jnp.int32)[:, None]

  def key_block(ki, best):
    pos_RK = cut(kept_pos, ki)
    cos = jnp.einsum("RQH,RKH->RKQ", q_RQH, cut(kept_unit, ki))
    cos = jnp.where(pos_RK[:, :, None] >= 0, cos, -jnp.inf)
    c_RQ = cos.max(1)
    first = jnp.min(jnp.where(cos >= c_RQ[:, None, :] - TIE, slot, block), axis=1)
    p_RQ = jnp.take_along_axis(pos_RK, jnp.minimum(first, block - 1), axis=1)
    better = c_RQ > best[1] + TIE  # near-ties keep the earlier, lower position
    return jnp.where(better, p_RQ, best[0]), jnp.where(better, c_RQ, best[1])

  init = (jnp.full((r, q), -1, jnp.int32), jnp.full((r, q), -jnp.inf, jnp.float32))
  return jax.lax.fori_loop(0, key_blocks, key_block, init)


def _sub_search(q_RQH, kept, key_blocks, block, sub, kept_aug):
  """`_slot_search`'s answer in two steps. The loop scores [R, S, kept, evicted], the S = block
  / ``sub`` sub-blocks a batch axis, so XLA fuses each sub-block's max into the matmul and no
  block of cosines is written out; it keeps the first sub-block within TIE of the best. Then the
  ``sub`` keys of each evicted token's sub-block are gathered (contiguous) and scored again for
  the first slot within TIE. ``kept_aug``: the kept unit keys with a last coordinate, -4 at
  padding slots, so a query with an appended 1 scores them -4 without a mask pass."""
  kept_pos, kept_unit = kept
  r, q, h = q_RQH.shape
  n_sub = block // sub
  q_aug = jnp.concatenate([q_RQH, jnp.ones((r, q, 1), q_RQH.dtype)], -1)
  # Written once per query block (the barrier), not broadcast inside every step's matmul.
  q_RSQH = jax.lax.optimization_barrier(jnp.broadcast_to(q_aug[:, None], (r, n_sub, q, h + 1)))
  sub_slot = jnp.arange(n_sub, dtype=jnp.int32)[:, None]

  def key_block(ki, best):
    k_RSKH = jax.lax.dynamic_slice_in_dim(kept_aug, ki * block, block, axis=1)
    cos = jnp.einsum("RSQH,RSKH->RSKQ", q_RSQH, k_RSKH.reshape(r, n_sub, sub, h + 1))
    # The barrier keeps XLA from folding the two maxima into one over the whole block.
    c_RSQ = jax.lax.optimization_barrier(cos.max(2))
    c_RQ = c_RSQ.max(1)
    first = jnp.min(jnp.where(c_RSQ >= c_RQ[:, None, :] - TIE, sub_slot, n_sub), axis=1)
    better = c_RQ > best[1] + TIE  # near-ties keep the earlier, lower position
    return jnp.where(better, ki * n_sub + first, best[0]), jnp.where(better, c_RQ, best[1])

  init = (jnp.zeros((r, q), jnp.int32), jnp.full((r, q), -jnp.inf, jnp.float32))
  sub_RQ, c_RQ = jax.lax.fori_loop(0, key_blocks, key_block, init)
  k_RQSH = jnp.take_along_axis(kept_unit.reshape(r, -1, sub, h), sub_RQ[:, :, None, None], axis=1)
  pos_RQS = jnp.take_along_axis(kept_pos.reshape(r, -1, sub), sub_RQ[:, :, None], axis=1)
  cos = jnp.where(pos_RQS >= 0, jnp.einsum("RQH,RQSH->RQS", q_RQH, k_RQSH), -jnp.inf)
  near = cos >= c_RQ[..., None] - TIE
  # Rounding can move the rescored best just outside TIE: then take the rescored argmax.
  j = jnp.where(near.any(-1), jnp.argmax(near, -1), jnp.argmax(cos, -1))
  return jnp.take_along_axis(pos_RQS, j[..., None], -1)[..., 0], c_RQ


def merge_kept(
  k: Array,
  v: Array,
  keep_LBKT: Array,
  evict_LBKT: Array,
  rule: str,
  positions_LBKC: Array,
):
  """The kept tokens' K/V with the evicted tokens merged into their nearest kept ones by ``rule``
  (module docstring), at the ascending kept positions ``positions_LBKC`` only: ``[L, B, K, C,
  H]`` each (-1: empty slot, zeros). The search and the sums run shard-locally over rows and KV
  heads (`sharding.per_head`); the code rules' filter, which averages over a row's heads, between
  them. No key or value array of the prompt's size is written."""
  if rule not in RULES + CODE_RULES:
    raise ValueError(f"merge rule must be one of {', '.join(RULES + CODE_RULES)}, got {rule!r}")
  found = functools.partial(nearest_kept, kept_width=positions_LBKC.shape[-1])
  target, cos = sharding.per_head(found, k, keep_LBKT, evict_LBKT)
  if rule in CODE_RULES:
    target = code_targets(target, cos, evict_LBKT, misaligned=rule == "average-code")
  weight = cos if rule in ("weighted", "weighted-code") else jnp.ones_like(cos)
  sums = functools.partial(merged_slots, pivot=rule == "pivot")
  return sharding.per_head(sums, k, v, target, weight, positions_LBKC)


def nearest_kept(k: Array, keep_LBKT: Array, evict_LBKT: Array, kept_width: int | None = None):
  """`nearest` per (layer, row, KV head) of keys ``[L, B, K, T, H]``: (kept target, cosine)
  ``[L, B, K, T]`` each."""
  flat = lambda x: x.reshape((-1,) + x.shape[3:])
  target, cos = nearest(flat(k), flat(keep_LBKT), flat(evict_LBKT), kept_width=kept_width)
  return target.reshape(evict_LBKT.shape), cos.reshape(evict_LBKT.shape)


def code_targets(target_LBKT: Array, cos_LBKT: Array, evict_LBKT: Array, misaligned: bool):
  """The released code's similarity filter on the nearest targets / cosines ``[L, B, K, T]``
  (module docstring; as tests/references/merge_ref.merge_code_compat specifies): the targets of
  the merged evicted tokens, -1 for the dropped. A rank's mean is over the K heads, the global
  mean over heads and the row's E ranks (so every head of a row must evict E tokens; the K heads
  of a row must all be here). ``misaligned``: the rank-j token of each head goes to that head's
  target of the j-th passing rank (j < the number passing; the later ranks are dropped)."""
  t = evict_LBKT.shape[-1]
  at = lambda x, i: jnp.take_along_axis(x, jnp.maximum(i, 0), -1)
  by_rank = positions_from_mask(evict_LBKT, t)  # [L, B, K, T]: rank m's position, -1 after
  has = by_rank >= 0
  head_mean = jnp.where(has, at(cos_LBKT, by_rank), 0.0).mean(2)  # [L, B, T] per rank
  n = has[:, :, 0].sum(-1, keepdims=True)  # [L, B, 1]: E
  passing = has[:, :, 0] & (head_mean >= head_mean.sum(-1, keepdims=True) / jnp.maximum(n, 1))
  rank = jnp.cumsum(evict_LBKT, -1, dtype=jnp.int32) - 1  # [L, B, K, T] of each evicted token
  per_head = lambda x: jnp.broadcast_to(x[:, :, None], evict_LBKT.shape)
  if not misaligned:
    return jnp.where(evict_LBKT & at(per_head(passing), rank), target_LBKT, -1)
  nth = per_head(positions_from_mask(passing, t))  # the j-th passing rank, -1 after
  dest = jnp.where(nth >= 0, at(at(target_LBKT, by_rank), nth), -1)  # [L, B, K, T] by j
  return jnp.where(evict_LBKT, at(dest, rank), -1)


def merged_slots(
  k: Array,
  v: Array,
  target_LBKT: Array,
  weight_LBKT: Array,
  positions_LBKC: Array,
  pivot: bool = False,
):
  """The kept slots' K/V ``[L, B, K, C, H]`` (``positions_LBKC`` ascending, -1: empty slot,
  zeros) with each token t whose ``target_LBKT`` is a kept position (not -1) merged into it:
  x_c <- (x_c + sum_t w_t x_t) / (L_c + 1), w = ``weight_LBKT``; ``pivot``: x_t -> (x_t + x_c)
  / 2. The sums are made row by row (XLA CPU copies a scatter's whole update operand)."""
  shape = k.shape
  c = positions_LBKC.shape[-1]
  flat = lambda x: x.reshape((-1,) + x.shape[3:])
  kf, vf, target, weight, pos_RC = map(flat, (k, v, target_LBKT, weight_LBKT, positions_LBKC))
  r, t = kf.shape[:2]
  rows = jnp.arange(r)[:, None]
  slot_of = (
    jnp.full((r, t + 1), c, jnp.int32)
    .at[rows, jnp.where(pos_RC >= 0, pos_RC, t)]
    .set(jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), pos_RC.shape))
  )
  seg = jnp.take_along_axis(slot_of, jnp.where(target >= 0, target, t), axis=1)  # c: discarded
  # Sums into a buffer made from this layer's data: XLA would otherwise allocate every layer's
  # zeros at the start of the prefill.
  zeros = lambda *shape: order.after(jnp.zeros((r, c + 1) + shape, jnp.float32), target[0, 0])
  count = zeros().at[rows, seg].add(1.0)[:, :c]

  def sums(x):  # [R, C, H]
    def row(i, acc):
      update = x[i].astype(jnp.float32) * weight[i][:, None]
      return acc.at[i, seg[i]].add(update)

    return jax.lax.fori_loop(0, r, row, zeros(x.shape[-1]))[:, :c]

  out = []
  for x in (kf, vf):
    summed = sums(x)
    x_c = jnp.take_along_axis(x, jnp.maximum(pos_RC, 0)[..., None], axis=1).astype(jnp.float32)
    if pivot:
      new = (x_c * (1 + count[..., None] / 2) + summed / 2) / (count[..., None] + 1)
    else:
      new = (x_c + summed) / (count[..., None] + 1)
    new = jnp.where((pos_RC >= 0)[..., None], new, 0.0)
    out.append(new.astype(x.dtype).reshape(shape[:3] + (c,) + shape[4:]))
  return out[0], out[1]
