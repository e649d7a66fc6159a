"""Compression inside the prefill, layer by layer (the driver of `jmmkv.cache.policies.base`).

The decoder calls `on_layer` right after each layer's attention with that layer's prompt K/V
``[B, K, T, H]`` and statistics; the policy chooses what to keep and this module stores it, so
the layer's full K/V die before the next layer runs (the decoder makes the next layer's input
depend on what was stored: `jmmkv.kernels.order`). Storage (`Storage`, chosen on the host from the policy's `Plan`):

- dense: per layer ``[B, K, C, H]`` with C the plan's capacity (uniform policies; Full keeps
  the layer's own arrays, no copy);
- pool: a `jmmkv.cache.pool.Pool` of pages sized by the plan's total (per-head / per-layer
  allocations), re-laid out after the prefill as pages per layer or a dense prefix.

A sliding-window layer (``Storage.ring_layers``) is never handed to the policy: it keeps its
window as a ring (`jmmkv.cache.kv_cache.ring_of`). The policy sees the other layers as layers
0..L'-1 of an L'-layer model (``Context.num_layers`` = L'), so layer schedules (PyramidKV, MEDA,
MadaKV's compensation) run over the layers it compresses; such models store a dense prefix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jmmkv.cache import kv_cache, paged, pool, select
from jmmkv.cache.policies.base import Context, Kept, Plan
from jmmkv.cache.prompt import PromptKV
from jmmkv.cache.stats import Stats
from jmmkv.kernels import order
from jmmkv.typing import Array

# A pool is used when it needs at most this fraction of the dense prefix's slots.
POOL_GAIN = 0.9


@dataclasses.dataclass(frozen=True)
class Storage:
  """Where compressed layers go (static under jit)."""

  capacity: int  # C: kept positions per (layer, row, KV head) a policy returns
  pages: int = 0  # pool pages (0: a dense [B, K, C, H] prefix per layer)
  page_size: int = 0
  ring_layers: tuple[int, ...] = ()  # sliding-window layers: a ring each, no policy
  window: int = 0
  ring: int = 0  # R, the rings' slots (`jmmkv.cache.kv_cache.ring_size`)

  @property
  def pooled(self) -> bool:
    return self.pages > 0


# Static capacities round up to this many slots (and pool sizes to `paged.page_multiple`), so
# that prompts and budgets close to each other share one compiled prefill.
CAPACITY_MULTIPLE = 32


def storage_for(
  plan: Plan, num_layers: int, b: int, kh: int, bucket: int, pool_ok: bool = True
) -> Storage:
  """Dense at the plan's capacity, or a pool when the plan bounds the total well below it
  (``pool_ok``: false under a mesh, whose prefix stays split by KV head). ``bucket``: the
  padded prompt length T, which no capacity exceeds."""
  up = lambda n, m: -(-n // m) * m
  capacity = min(bucket, up(plan.capacity, CAPACITY_MULTIPLE))
  dense = num_layers * b * kh * capacity
  if plan.total is None or not pool_ok:
    return Storage(capacity)
  owners = num_layers * b * kh
  size = paged.page_size_for(np.full((1,), plan.total / owners))
  pages = -(-plan.total // size) + owners  # each (layer, row, head) wastes under one page
  pages = up(pages, paged.page_multiple(pages))
  if pages * size > POOL_GAIN * dense:
    return Storage(capacity)
  return Storage(capacity, pages, size)


def start(storage: Storage, num_layers: int, k_shape, dtype):
  """The empty store: a tuple of finished dense layers, or an empty pool."""
  if not storage.pooled:
    return ()
  b, kh, _, h = k_shape
  return pool.empty(storage.pages, storage.page_size, num_layers, b, kh, h, dtype)


def on_layer(policy, storage: Storage, ctx: Context, valid_BT, modality_BT, lengths_B):
  """The decoder's per-layer callback: ``(index, k_BKTH, v_BKTH, stats, (carry, store)) ->
  ((carry, store), token)``, ``token`` a finite scalar that depends on what was stored (the
  decoder makes the next layer wait for it: `jmmkv.models.llama.Decoder.prefill`)."""

  def step(index: int, k_BKTH: Array, v_BKTH: Array, st: Stats, state):
    carry, store = state
    if index in storage.ring_layers:
      ring = kv_cache.ring_of(k_BKTH, v_BKTH, modality_BT, lengths_B, storage.window, storage.ring)
      return (carry, store + (ring,)), order.token(*ring)
    lead = {name: x[None] for name, x in st.items()}
    layer = PromptKV(k_BKTH[None], v_BKTH[None], valid_BT, modality_BT, lengths_B, lead)
    ordinal = kv_cache.ordinal(index, storage.ring_layers)  # among the compressed layers
    kept, carry = policy.compress_layer(layer, ordinal, ctx, storage.capacity, carry)
    if storage.pooled:
      if kept.positions is None:
        raise ValueError(f"{policy.name}: keeping every token needs a dense store")
      first = store.next_page
      if kept.k is None:  # scattered straight from the layer's K/V
        store = pool.write(store, index, kept.positions[0], layer.k[0], layer.v[0], modality_BT)
      else:
        store = pool.write_slots(store, index, kept.positions[0], kept.k[0], kept.v[0], modality_BT)
      page = lambda x: jax.lax.dynamic_index_in_dim(x, jnp.minimum(first, x.shape[0] - 1), 0)
      return (carry, store), order.token(page(store.k), page(store.v), store.next_page)
    if kept.positions is None:  # the layer's own K/V are the output: nothing to wait for
      return (carry, store + (_dense(layer, kept, storage.capacity),)), jnp.zeros(())
    prefix = _dense(layer, kept, storage.capacity)
    return (carry, store + (prefix,)), order.token(*prefix)

  return step


def _dense(layer: PromptKV, kept: Kept, capacity: int):
  """(k, v, positions, modality) of one layer's dense prefix ``[B, K, C, ...]``."""
  b, kh, t = layer.k.shape[1:4]
  if kept.positions is None:  # every token: the layer's own arrays
    if capacity != t:
      raise ValueError(f"keeping every token needs capacity {t}, got {capacity}")
    pos_BT = jnp.where(layer.valid_BT, jnp.arange(t)[None, :], -1)
    mod_BT = jnp.where(layer.valid_BT, layer.modality_BT, 0)
    expand = lambda x_BT: jnp.broadcast_to(x_BT[:, None, :], (b, kh, t))
    return layer.k[0], layer.v[0], expand(pos_BT), expand(mod_BT)
  prefix = select.gather(layer, kept.positions)
  if kept.k is not None:  # the policy's own values at those slots (merged)
    prefix = prefix._replace(k=kept.k, v=kept.v)
  return tuple(x[0] for x in prefix)


def stored(storage: Storage, store, lengths_B, rope_start_B, append_capacity: int, k_shape, dtype):
  """After the last layer: (dense `KVCache`, None), or (a `KVCache` with an empty prefix that
  carries the append buffer, the `Pool`)."""
  if storage.pooled:
    b, kh, _, h = k_shape
    l = store.kept_LBK.shape[0]
    none = lambda *s: (jnp.zeros((b, kh, 0) + s, dtype),) * l
    shell = kv_cache.from_layers(
      none(h), none(h), none(), none(), lengths_B, rope_start_B, append_capacity
    )
    return shell, store
  k, v, positions, modality = zip(*store)
  rings = (storage.window, storage.ring_layers)
  return kv_cache.from_layers(
    k, v, positions, modality, lengths_B, rope_start_B, append_capacity, *rings
  ), None


def from_pool(shell: kv_cache.KVCache, store: pool.Pool, storage: Storage, layout: str):
  """The decode cache of a filled pool: pages per layer, or a dense prefix (``layout`` "dense",
  or "auto" when pages would not save 10% of the dense bytes)."""
  kept_LBK = np.asarray(store.kept_LBK)
  s, slot = storage.page_size, kv_cache.slot_bytes(shell.append_k)
  if layout == "paged" or (layout == "auto" and paged.pages_pay(kept_LBK, slot, s)):
    return pool.to_paged(store, *pool.paged_plan(kept_LBK, s, storage.pages), shell)
  capacity = kv_cache.capacity_for(int(kept_LBK.max(initial=0)))
  return pool.to_dense(store, pool.dense_plan(kept_LBK, s, storage.pages, capacity), shell)
