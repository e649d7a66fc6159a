"""Merging evicted KV into kept KV by key-cosine nearest neighbour (LOOK-M A/P/W rules, MEDA).

Per (layer, row, KV head): every evicted token i is assigned to the kept token c*(i) whose key has
the largest cosine with k_i (ties: lower position; a zero key has cosine 0 with everything); then,
for x = k and x = v alike, with A_c the tokens assigned to c and L_c = |A_c|:
  average   x_c <- (x_c + sum_i x_i) / (L_c + 1)
  pivot     x_c <- (x_c + 1/2 sum_i (x_i + x_c)) / (L_c + 1)
  weighted  x_c <- (x_c + sum_i u_ic x_i) / (L_c + 1)          (u = the key cosine)
All in float32; evicted tokens are processed in blocks, so no T x T array is built.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp

from jmmkv.cache.select import positions_from_mask
from jmmkv.typing import Array

RULES = ("average", "pivot", "weighted")
CODE_COMPAT = "code-compat"  # the released MEDA / LOOK-M average merge, see `merge_code_compat`


def _unit(x):
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1.0), 0.0)


def nearest(k_RTH: Array, keep_RT: Array, evict_RT: Array, block: int = 128):
  """Per row r (a flattened layer x batch x head): the kept target of every token ``[R, T]``
  (-1 unless evicted) and its cosine ``[R, T]``."""
  r, t, h = k_RTH.shape
  block = min(block, t)
  pad = -t % block
  unit = _unit(k_RTH.astype(jnp.float32))
  unit_p = jnp.pad(unit, ((0, 0), (0, pad), (0, 0)))
  blocks = einops.rearrange(unit_p, "R (C Q) H -> C R Q H", Q=block)

  def one(q_RQH):
    cos = jnp.einsum("RQH,RTH->RQT", q_RQH, unit)
    cos = jnp.where(keep_RT[:, None, :], cos, -jnp.inf)
    return jnp.argmax(cos, axis=-1), jnp.max(cos, axis=-1)

  target, best = jax.lax.map(one, blocks)
  target = einops.rearrange(target, "C R Q -> R (C Q)")[:, :t]
  best = einops.rearrange(best, "C R Q -> R (C Q)")[:, :t]
  live = evict_RT & keep_RT.any(-1, keepdims=True)
  return jnp.where(live, target, -1).astype(jnp.int32), jnp.where(live, best, 0.0)


def merge(k: Array, v: Array, keep_LBKT: Array, evict_LBKT: Array, rule: str):
  """``k``, ``v`` ``[L, B, K, T, H]`` with every evicted token merged into its nearest kept one
  (values at non-kept positions are left as they were)."""
  if rule == CODE_COMPAT:
    return merge_code_compat(k, v, keep_LBKT, evict_LBKT)
  if rule not in RULES:
    raise ValueError(f"merge rule must be one of {', '.join(RULES)}, got {rule!r}")
  shape = k.shape
  flat = lambda x: x.reshape((-1,) + x.shape[3:])
  kf, vf, keep, evict = flat(k), flat(v), flat(keep_LBKT), flat(evict_LBKT)
  target, cos = nearest(kf, keep, evict)
  t = shape[3]
  seg = jnp.where(target >= 0, target, t)  # t: a discarded segment
  weight = cos if rule == "weighted" else jnp.ones_like(cos)
  count = jax.vmap(lambda s: jax.ops.segment_sum(jnp.ones((t,)), s, t + 1)[:t])(seg)
  out = []
  for x in (kf, vf):
    x32 = x.astype(jnp.float32)
    summed = jax.vmap(lambda d, s: jax.ops.segment_sum(d, s, t + 1)[:t])(
      x32 * weight[..., None], seg
    )
    if rule == "pivot":
      new = (x32 * (1 + count[..., None] / 2) + summed / 2) / (count[..., None] + 1)
    else:
      new = (x32 + summed) / (count[..., None] + 1)
    out.append(jnp.where(keep[..., None], new, x32).astype(x.dtype).reshape(shape))
  return out[0], out[1]


def merge_code_compat(
  k: Array, v: Array, keep_LBKT: Array, evict_LBKT: Array, misaligned: bool = True
):
  """The released MEDA / LOOK-M average merge ("code-compat", not the paper), as
  tests/references/merge_ref.merge_code_compat specifies: evicted tokens are indexed by their rank
  in each head; a rank passes when the head-mean of its best cosine is >= the layer's mean; with
  ``misaligned`` the j-th passing target receives the rank-j token (the released bug), otherwise
  the passing token itself. Every head of a layer must evict the same number of tokens."""
  l, b, kh, t, _ = k.shape
  flat = lambda x: x.reshape((-1,) + x.shape[3:])
  target, cos = nearest(flat(k), flat(keep_LBKT), flat(evict_LBKT))
  target, cos = target.reshape(l, b, kh, t), cos.reshape(l, b, kh, t)
  rank_pos = positions_from_mask(evict_LBKT, t)  # [L, B, K, T]: evicted positions by rank, -1 after
  has = rank_pos >= 0
  tgt_m = jnp.where(has, jnp.take_along_axis(target, jnp.maximum(rank_pos, 0), -1), -1)
  mx_m = jnp.where(has, jnp.take_along_axis(cos, jnp.maximum(rank_pos, 0), -1), 0.0)
  n_m = has[:, :, 0].sum(-1, keepdims=True)  # evicted per head (the same in every head)
  head_mean = mx_m.mean(2)  # [L, B, T]
  global_mean = head_mean.sum(-1, keepdims=True) / jnp.maximum(n_m, 1)
  passing = has[:, :, 0] & (head_mean >= global_mean)
  f_rank = positions_from_mask(passing[:, :, None], t)[:, :, 0]  # [L, B, T]: F[j], -1 after
  slot_ok = f_rank >= 0
  dest = jnp.where(
    slot_ok[:, :, None], jnp.take_along_axis(tgt_m, jnp.maximum(f_rank, 0)[:, :, None], -1), -1
  )
  src_rank = jnp.arange(t) if misaligned else jnp.maximum(f_rank, 0)
  src_pos = jnp.take_along_axis(rank_pos, jnp.broadcast_to(src_rank, (l, b, t))[:, :, None], -1)
  src_pos = jnp.where(slot_ok[:, :, None] & (src_pos >= 0), src_pos, -1)  # [L, B, K, T]
  seg = jnp.where((src_pos >= 0) & (dest >= 0), dest, t)
  rows = lambda x: x.reshape((-1,) + x.shape[3:])
  count = jax.vmap(lambda s: jax.ops.segment_sum(jnp.ones((t,)), s, t + 1)[:t])(rows(seg))
  out = []
  for x in (k, v):
    x32 = x.astype(jnp.float32)
    src = jnp.take_along_axis(x32, jnp.maximum(src_pos, 0)[..., None], 3)
    summed = jax.vmap(lambda d, s: jax.ops.segment_sum(d, s, t + 1)[:t])(rows(src), rows(seg))
    new = (rows(x32) + summed) / (count[..., None] + 1)
    out.append(
      jnp.where(rows(keep_LBKT)[..., None], new, rows(x32)).astype(x.dtype).reshape(x.shape)
    )
  return out[0], out[1]
