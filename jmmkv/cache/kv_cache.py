"""The decode cache: a compressed prompt **prefix** plus an **append** buffer for new tokens.

The prefix is one static-shape array per layer (a tuple: slicing a layer out of a stacked
``[L, ...]`` array is a copy on XLA CPU, every decode step); ``k``/``v``/``positions``/``modality``
give the stacked ``[L, B, K, C, ...]`` views. Prefix slots hold keys after RoPE with their
original prompt position and modality id (-1 / 0 where empty); the append buffer ``[L, B, K, M, H]``
has one write index shared by all rows (row b's m-th new token sits at RoPE position
``rope_start[b] + m``).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jmmkv import sharding
from jmmkv.typing import Array


@flax.struct.dataclass
class KVCache:
  layer_k: tuple[Array, ...]  # per layer [B, K, C, H] compressed prompt keys (after RoPE)
  layer_v: tuple[Array, ...]  # per layer [B, K, C, H]
  layer_positions: tuple[Array, ...]  # per layer [B, K, C] int32 prompt position, -1 where empty
  layer_modality: tuple[Array, ...]  # per layer [B, K, C] int32 modality id (0 where empty)
  append_k: Array  # [L, B, K, M, H] generated tokens' keys
  append_v: Array  # [L, B, K, M, H]
  lengths: Array  # [B] int32 prompt length per row
  rope_start: Array  # [B] (or [3, B] for M-RoPE) int32 RoPE position of the first new token
  index: Array  # [] int32 number of tokens written to the append buffer

  @property
  def k(self) -> Array:  # [L, B, K, C, H]
    return jnp.stack(self.layer_k)

  @property
  def v(self) -> Array:  # [L, B, K, C, H]
    return jnp.stack(self.layer_v)

  @property
  def positions(self) -> Array:  # [L, B, K, C]
    return jnp.stack(self.layer_positions)

  @property
  def modality(self) -> Array:  # [L, B, K, C]
    return jnp.stack(self.layer_modality)

  @property
  def valid(self) -> Array:  # [L, B, K, C]
    return self.positions >= 0

  @property
  def capacity(self) -> int:  # C
    return self.layer_k[0].shape[2]

  def append_valid(self, upto: Array) -> Array:  # [M], true for slots < upto
    return jnp.arange(self.append_k.shape[3]) < upto

  def kept_LBK(self) -> np.ndarray:
    """Kept prompt slots per (layer, row, KV head), from the arrays."""
    return np.asarray(self.valid).sum(-1)

  def kv_bytes_allocated(self) -> int:
    return sum(int(x.nbytes) for x in (*self.layer_k, *self.layer_v, self.append_k, self.append_v))

  def kv_bytes_used(self) -> int:
    return used_bytes(self)


def slot_bytes(append_k_LBKMH: Array) -> int:
  """Bytes of one cache slot: a key and a value of one KV head."""
  return 2 * append_k_LBKMH.shape[-1] * append_k_LBKMH.dtype.itemsize


def used_bytes(cache) -> int:
  """Bytes of K/V in valid prefix slots and written append slots of a dense or paged cache, from
  the arrays."""
  l, b, kh = cache.append_k.shape[:3]
  kept = int(cache.kept_LBK().sum())
  return slot_bytes(cache.append_k) * (kept + l * b * kh * int(cache.index))


def from_prefix(
  k_LBKCH: Array,
  v_LBKCH: Array,
  positions_LBKC: Array,
  modality_LBKC: Array,
  lengths_B: Array,
  rope_start_B: Array,
  append_capacity: int,
) -> KVCache:
  """Builds a decode cache from a (compressed) prefix and an empty append buffer of M slots."""
  return from_layers(
    tuple(k_LBKCH),
    tuple(v_LBKCH),
    tuple(positions_LBKC),
    tuple(modality_LBKC),
    lengths_B,
    rope_start_B,
    append_capacity,
  )


def from_layers(
  k_L: tuple[Array, ...],
  v_L: tuple[Array, ...],
  positions_L: tuple[Array, ...],
  modality_L: tuple[Array, ...],
  lengths_B: Array,
  rope_start_B: Array,
  append_capacity: int,
) -> KVCache:
  """`from_prefix` from per-layer arrays (``[B, K, C, H]`` / ``[B, K, C]`` each; no stacking)."""
  b, kh, _, h = k_L[0].shape
  empty = jnp.zeros((len(k_L), b, kh, append_capacity, h), k_L[0].dtype)
  cache = KVCache(
    layer_k=tuple(k_L),
    layer_v=tuple(v_L),
    layer_positions=tuple(x.astype(jnp.int32) for x in positions_L),
    layer_modality=tuple(x.astype(jnp.int32) for x in modality_L),
    append_k=empty,
    append_v=empty,
    lengths=lengths_B.astype(jnp.int32),
    rope_start=rope_start_B.astype(jnp.int32),
    index=jnp.zeros((), jnp.int32),
  )
  return constrain(cache)


def constrain(cache: KVCache) -> KVCache:
  """The cache split over batch and KV heads on the current mesh (a no-op without one)."""
  per_layer = lambda xs: tuple(sharding.constrain_BK(x) for x in xs)
  return cache.replace(
    layer_k=per_layer(cache.layer_k),
    layer_v=per_layer(cache.layer_v),
    layer_positions=per_layer(cache.layer_positions),
    layer_modality=per_layer(cache.layer_modality),
    append_k=sharding.constrain_BK(cache.append_k, lead=1),
    append_v=sharding.constrain_BK(cache.append_v, lead=1),
  )


def write_append(cache: KVCache, layer: int, k_BKH: Array, v_BKH: Array) -> KVCache:
  """Writes one token's K/V for ``layer`` at the current append index (index is not advanced)."""
  at = (layer, 0, 0, cache.index, 0)
  k = jax.lax.dynamic_update_slice(
    cache.append_k, k_BKH[None, :, :, None].astype(cache.append_k.dtype), at
  )
  v = jax.lax.dynamic_update_slice(
    cache.append_v, v_BKH[None, :, :, None].astype(cache.append_v.dtype), at
  )
  return cache.replace(append_k=k, append_v=v)


def compact_capacity(cache: KVCache, multiple: int = 32) -> int:
  """The smallest capacity, a multiple of ``multiple`` (or the current one), that holds every
  kept slot of ``cache`` (slots are stored first, in ascending position order)."""
  return min(cache.capacity, capacity_for(int(cache.kept_LBK().max(initial=0)), multiple))


def capacity_for(used: int, multiple: int = 32) -> int:
  """The smallest multiple of ``multiple`` (at least one) that holds ``used`` slots: decode
  compiles once per capacity, so capacities are rounded."""
  return max(multiple, -(-used // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("capacity",), donate_argnums=0)
def shrink(cache: KVCache, capacity: int) -> KVCache:
  """The same cache with the prefix cut to ``capacity`` slots (all cut slots must be empty)."""
  cut = lambda xs: tuple(x[:, :, :capacity] for x in xs)
  return constrain(
    cache.replace(
      layer_k=cut(cache.layer_k),
      layer_v=cut(cache.layer_v),
      layer_positions=cut(cache.layer_positions),
      layer_modality=cut(cache.layer_modality),
    )
  )
