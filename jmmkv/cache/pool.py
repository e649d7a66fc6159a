"""A page pool shared by all layers and heads, filled layer by layer during the prefill.

Policies whose kept counts vary by layer or head (AdaKV, PyramidKV, MadaKV, MEDA) can keep up to
the whole prompt in one (layer, row, KV head) but far less in total. A dense prefix per layer
would be sized by the prompt; the pool is sized by the policy's bound on the total
(`Plan.total`): ``P`` pages of ``S`` slots. As layer l is compressed, each (row, KV head) claims
``ceil(kept / S)`` consecutive pages after the last claimed one, in (row, head) order, so the
pages of (l, b, k) are found on the host from the kept counts alone. After the prefill the pool
becomes the decode layout: per layer pages (`to_paged`, exactly `jmmkv.cache.paged`'s layout) or
a dense prefix (`to_dense`).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jmmkv.cache import kv_cache, paged
from jmmkv.typing import Array


@flax.struct.dataclass
class Pool:
  k: Array  # [P, S, H] kept keys (after RoPE)
  v: Array  # [P, S, H]
  positions: Array  # [P, S] int32 prompt position, -1 where empty
  modality: Array  # [P, S] int32 modality id, 0 where empty
  next_page: Array  # [] int32 pages claimed so far
  kept_LBK: Array  # [L, B, K] int32 kept slots per (layer, row, KV head)

  @property
  def page_size(self) -> int:  # S
    return self.k.shape[1]


def empty(pages: int, page_size: int, num_layers: int, b: int, kh: int, h: int, dtype) -> Pool:
  z = lambda *s: jnp.zeros((pages, page_size) + s, dtype)
  return Pool(
    z(h),
    z(h),
    jnp.full((pages, page_size), -1, jnp.int32),
    jnp.zeros((pages, page_size), jnp.int32),
    jnp.zeros((), jnp.int32),
    jnp.zeros((num_layers, b, kh), jnp.int32),
  )


def _claim(pool: Pool, layer: int, idx_BKC: Array):
  """Pages for one layer's kept slots: (first page of each (b, k) ``[B, K]``, the pool with its
  counters advanced). (b, k) claims ``ceil(n_bk / S)`` pages after the last claimed one."""
  b, kh = idx_BKC.shape[:2]
  n_BK = (idx_BKC >= 0).sum(-1).astype(jnp.int32)
  claimed = (-(-n_BK // pool.page_size)).reshape(-1)
  first_BK = pool.next_page + (jnp.cumsum(claimed) - claimed).reshape(b, kh)
  return first_BK, pool.replace(
    next_page=pool.next_page + claimed.sum(), kept_LBK=pool.kept_LBK.at[layer].set(n_BK)
  )


def _put(pool: Pool, dest_OX: Array, k_OXH: Array, v_OXH: Array, pos_OX: Array, mod_OX: Array):
  """Pool slots ``dest`` (flat ``page * S + slot``; out of range: dropped) set to these rows,
  one owner ``O = b * K + kv_head`` at a time: XLA CPU copies a scatter's whole update operand
  (a layer's K/V at once), so each step copies one owner's rows only."""
  pages, s = pool.k.shape[:2]
  flat = lambda x: x.reshape(pages * s, *x.shape[2:])

  def step(o, arrays):
    put = lambda x, new: x.at[dest_OX[o]].set(new[o].astype(x.dtype), mode="drop")
    return tuple(map(put, arrays, (k_OXH, v_OXH, pos_OX, mod_OX)))

  arrays = (flat(pool.k), flat(pool.v), flat(pool.positions), flat(pool.modality))
  k, v, positions, modality = jax.lax.fori_loop(0, dest_OX.shape[0], step, arrays)
  return pool.replace(
    k=k.reshape(pool.k.shape),
    v=v.reshape(pool.v.shape),
    positions=positions.reshape(pool.positions.shape),
    modality=modality.reshape(pool.modality.shape),
  )


def write(
  pool: Pool, layer: int, idx_BKC: Array, k_BKTH: Array, v_BKTH: Array, modality_BT: Array
) -> Pool:
  """Stores the slots at kept positions ``idx`` (ascending, -1 after) of one layer: its j-th
  kept slot of (b, k) goes to slot ``j`` of the pages it claims (`_claim`). Scattered straight
  from the layer's K/V (no gathered copy)."""
  b, kh, t, h = k_BKTH.shape
  first_BK, pool = _claim(pool, layer, idx_BKC)
  rows = jnp.arange(b * kh)[:, None]
  keep_BKT = (
    jnp.zeros((b * kh, t + 1), bool)
    .at[rows, jnp.where(idx_BKC >= 0, idx_BKC, t).reshape(b * kh, -1)]
    .set(True)[:, :t]
    .reshape(b, kh, t)
  )
  rank_BKT = jnp.cumsum(keep_BKT, axis=-1) - 1
  s = pool.page_size
  dest = jnp.where(keep_BKT, first_BK[..., None] * s + rank_BKT, pool.k.shape[0] * s)
  pos_BKT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, kh, t))
  mod_BKT = jnp.broadcast_to(modality_BT[:, None, :].astype(jnp.int32), (b, kh, t))
  owners = lambda x: x.reshape(b * kh, *x.shape[2:])
  return _put(pool, *map(owners, (dest, k_BKTH, v_BKTH, pos_BKT, mod_BKT)))


def write_slots(
  pool: Pool, layer: int, idx_BKC: Array, k_BKCH: Array, v_BKCH: Array, modality_BT: Array
) -> Pool:
  """`write` for K/V given at the kept slots (``[B, K, C, H]``, slot j holding position
  ``idx[..., j]``), e.g. merged values."""
  b, kh, c, _ = k_BKCH.shape
  first_BK, pool = _claim(pool, layer, idx_BKC)
  s = pool.page_size
  dest = jnp.where(idx_BKC >= 0, first_BK[..., None] * s + jnp.arange(c), pool.k.shape[0] * s)
  mod_BKC = jnp.take_along_axis(
    jnp.broadcast_to(modality_BT[:, None, :], (b, kh, modality_BT.shape[1])),
    jnp.maximum(idx_BKC, 0),
    axis=2,
  )
  owners = lambda x: x.reshape(b * kh, *x.shape[2:])
  return _put(pool, *map(owners, (dest, k_BKCH, v_BKCH, idx_BKC, mod_BKC)))


def first_pages(kept_LBK: np.ndarray, page_size: int, pages: int) -> np.ndarray:
  """The first pool page of every (layer, row, KV head) ``[L, B, K]`` (host), from the kept
  counts. Raises when they claim more than the pool's ``pages`` (the policy broke its bound:
  slots would have been lost)."""
  claimed = -(-np.asarray(kept_LBK, np.int64) // page_size)
  if claimed.sum() > pages:
    raise RuntimeError(
      f"the policy kept {int(np.asarray(kept_LBK).sum())} slots, more than its plan's bound "
      f"({pages} pages of {page_size}): a bug in the policy's plan()"
    )
  flat = claimed.reshape(-1)
  return (np.cumsum(flat) - flat).reshape(claimed.shape)


def paged_plan(kept_LBK: np.ndarray, page_size: int, pages: int):
  """`paged.plan_pages` from the pool: per layer its pages, in `jmmkv.cache.paged`'s order and
  padding, and their owners (``b * K + kv_head``; ``B * K`` for padding)."""
  first_LO = first_pages(kept_LBK, page_size, pages).reshape(len(kept_LBK), -1)
  return paged.plan_pages(kept_LBK, page_size, lambda l, owner, page: first_LO[l][owner] + page)


@functools.partial(jax.jit, donate_argnums=0)
def to_paged(pool: Pool, sources, owners, cache: kv_cache.KVCache) -> paged.PagedKVCache:
  """The pool as a `PagedKVCache` (`paged_plan` gives ``sources`` / ``owners``); ``cache``
  gives the append buffer, lengths and RoPE start (its prefix is ignored)."""
  b, kh = cache.append_k.shape[1:3]

  def per_layer(x, fill):
    return tuple(
      paged.take_pages(x, src_P, owner_P, b * kh, fill)
      for src_P, owner_P in zip(sources, owners, strict=True)
    )

  return paged.with_pages(
    cache,
    owners,
    per_layer(pool.k, 0),
    per_layer(pool.v, 0),
    per_layer(pool.positions, -1),
    per_layer(pool.modality, 0),
  )


def dense_plan(kept_LBK: np.ndarray, page_size: int, pages: int, capacity: int) -> np.ndarray:
  """Flat pool slot of every dense prefix slot ``[L, B, K, C]`` (-1: empty)."""
  kept = np.asarray(kept_LBK)
  first = first_pages(kept, page_size, pages)
  c = np.arange(capacity)
  return np.where(c < kept[..., None], first[..., None] * page_size + c, -1).astype(np.int32)


@functools.partial(jax.jit, donate_argnums=0)
def to_dense(pool: Pool, slots_LBKC: Array, cache: kv_cache.KVCache) -> kv_cache.KVCache:
  """The pool as a dense prefix of ``C`` slots per (layer, row, KV head) (`dense_plan`)."""
  pages, s = pool.k.shape[:2]
  flat = lambda x: x.reshape(pages * s, *x.shape[2:])
  safe = jnp.maximum(slots_LBKC, 0)
  empty_LBKC = slots_LBKC < 0

  def take(x, fill):  # layer by layer: no stacked [L, ...] copy
    out = []
    for safe_BKC, empty_BKC in zip(safe, empty_LBKC):
      y = jnp.take(flat(x), safe_BKC, axis=0)
      mask = empty_BKC.reshape(empty_BKC.shape + (1,) * (y.ndim - 3))
      out.append(jnp.where(mask, jnp.asarray(fill, y.dtype), y))
    return tuple(out)

  return kv_cache.constrain(
    cache.replace(
      layer_k=take(pool.k, 0),
      layer_v=take(pool.v, 0),
      layer_positions=take(pool.positions, -1),
      layer_modality=take(pool.modality, 0),
    )
  )
