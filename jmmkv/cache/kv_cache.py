"""The decode cache: a compressed prompt **prefix** plus an **append** buffer for new tokens.

The prefix is one static-shape array per layer (a tuple: slicing a layer out of a stacked
``[L, ...]`` array is a copy on XLA CPU, every decode step); ``k``/``v``/``positions``/``modality``
give the stacked ``[L, B, K, C, ...]`` views. Prefix slots hold keys after RoPE with their
original prompt position and modality id (-1 / 0 where empty); the append buffer ``[L, B, K, M, H]``
has one write index shared by all rows (row b's m-th new token sits at RoPE position
``rope_start[b] + m``), in slot ``m mod M``: a buffer smaller than the answer
(`jmmkv.generate`'s ``decode_window``) keeps the last M generated tokens.

A sliding-window layer (Gemma 3's local layers: ``ring_layers``, window ``window``) has no
append row: its prefix is a **ring** of R = min(window, prompt bucket + M) slots holding the
last tokens of the row, prompt and generated alike; the token at sequence index p (prompt
tokens 0..length-1, then ``length + m``) sits in slot ``p mod R`` and ``positions`` holds p. A
policy never compresses a ring: it keeps the last ``min(length, window - 1)`` prompt tokens,
all that the next query can see.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jmmkv import sharding
from jmmkv.typing import TEXT, Array


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
  window: int = flax.struct.field(pytree_node=False, default=0)  # the ring layers' window
  ring_layers: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

  # The stacked views pad every layer to the widest (a ring can be wider or narrower than C).
  @property
  def k(self) -> Array:  # [L, B, K, C, H]
    return _stacked(self.layer_k, 0)

  @property
  def v(self) -> Array:  # [L, B, K, C, H]
    return _stacked(self.layer_v, 0)

  @property
  def positions(self) -> Array:  # [L, B, K, C]
    return _stacked(self.layer_positions, -1)

  @property
  def modality(self) -> Array:  # [L, B, K, C]
    return _stacked(self.layer_modality, 0)

  @property
  def valid(self) -> Array:  # [L, B, K, C]
    return self.positions >= 0

  @property
  def capacity(self) -> int:  # C of the compressed (non-ring) layers
    rest = [x for i, x in enumerate(self.layer_k) if i not in self.ring_layers]
    return rest[0].shape[2] if rest else 0

  def append_row(self, layer: int) -> int:
    """The append buffer's row of ``layer`` (static; ring layers have none)."""
    if layer in self.ring_layers:
      raise ValueError(f"layer {layer} is a sliding-window layer: it has a ring, no append row")
    return ordinal(layer, self.ring_layers)

  def append_valid(self, upto: Array) -> Array:  # [M], true for slots < upto (all past M)
    return jnp.arange(self.append_k.shape[3]) < upto

  def kept_LBK(self) -> np.ndarray:
    """Kept prompt slots per (layer, row, KV head), from the arrays (a ring's generated
    tokens are not prompt slots)."""
    pos = np.asarray(self.positions)
    return ((pos >= 0) & (pos < np.asarray(self.lengths)[None, :, None, None])).sum(-1)

  def prefix_slots(self) -> int:
    """Filled prefix slots (rings' generated tokens included), from the arrays."""
    return int(sum(int((np.asarray(x) >= 0).sum()) for x in self.layer_positions))

  def kv_bytes_allocated(self) -> int:
    return sum(int(x.nbytes) for x in (*self.layer_k, *self.layer_v, self.append_k, self.append_v))

  def kv_bytes_used(self) -> int:
    return used_bytes(self)


def require_dense(cache, what: str) -> None:
  """A one-line error unless ``cache`` is a dense `KVCache` without sliding-window rings
  (``what`` needs one: "fold_answer", "a next turn")."""
  if not isinstance(cache, KVCache):
    raise TypeError(
      f"{what} takes a dense KVCache (generate(..., layout='dense', return_cache=True) or "
      f"jmmkv.compress), got {type(cache).__name__}"
    )
  if cache.ring_layers:
    raise ValueError(f"{what} does not support sliding-window layers (rings) yet")


def ordinal(layer: int, ring_layers: tuple[int, ...]) -> int:
  """``layer``'s index among the layers that are not rings: its append row, and the layer
  index a policy sees."""
  return layer - sum(r < layer for r in ring_layers)


def _stacked(layers: tuple[Array, ...], fill) -> Array:
  """Per-layer ``[B, K, C_l, ...]`` arrays stacked ``[L, B, K, max C_l, ...]``, padded with ``fill``."""
  c = max(x.shape[2] for x in layers)
  pad = lambda x: [(0, 0), (0, 0), (0, c - x.shape[2])] + [(0, 0)] * (x.ndim - 3)
  return jnp.stack([jnp.pad(x, pad(x), constant_values=fill) for x in layers])


def slot_bytes(append_k_LBKMH: Array) -> int:
  """Bytes of one cache slot: a key and a value of one KV head."""
  return 2 * append_k_LBKMH.shape[-1] * append_k_LBKMH.dtype.itemsize


def used_bytes(cache) -> int:
  """Bytes of K/V in valid prefix slots and written append slots of a dense or paged cache, from
  the arrays."""
  l, b, kh, m = cache.append_k.shape[:4]
  written = min(int(cache.index), m)  # a full buffer wraps around (`write_append`)
  return slot_bytes(cache.append_k) * (cache.prefix_slots() + l * b * kh * written)


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
  window: int = 0,
  ring_layers: tuple[int, ...] = (),
) -> KVCache:
  """`from_prefix` from per-layer arrays (``[B, K, C, H]`` / ``[B, K, C]`` each; no stacking);
  the entries of ``ring_layers`` are their rings (`ring_of`), with no append row."""
  b, kh, _, h = k_L[0].shape
  rows = len(k_L) - len(ring_layers)
  empty = jnp.zeros((rows, b, kh, append_capacity, h), k_L[0].dtype)
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
    window=window,
    ring_layers=tuple(ring_layers),
  )
  return constrain(cache)


def ring_size(window: int, bucket: int, append_capacity: int) -> int:
  """R: the slots of a sliding-window layer's ring, for prompts padded to ``bucket`` and
  ``append_capacity`` generated tokens fed back (no more than ever fit in the window)."""
  return max(1, min(window, bucket + append_capacity))


def ring_of(
  k_BKTH: Array, v_BKTH: Array, modality_BT: Array, lengths_B: Array, window: int, size: int
):
  """A sliding-window layer's ring after the prompt: ``(k, v, positions, modality)``
  ``[B, K, R, ...]`` holding each row's last ``min(length, window - 1)`` prompt tokens, token p
  in slot ``p mod R`` (`ring_size` gives R)."""
  b, kh = k_BKTH.shape[:2]
  last_B1 = lengths_B[:, None] - 1
  p_BR = last_B1 - (last_B1 - jnp.arange(size)[None]) % size  # the latest prompt position per slot
  keep_BR = (p_BR >= 0) & (p_BR > lengths_B[:, None] - window)
  at_BR = jnp.maximum(p_BR, 0)
  at_BKR = jnp.broadcast_to(at_BR[:, None], (b, kh, size))
  keep_BKR = jnp.broadcast_to(keep_BR[:, None], (b, kh, size))
  take = lambda x_BKTH: jnp.where(
    keep_BKR[..., None], jnp.take_along_axis(x_BKTH, at_BKR[..., None], axis=2), 0
  ).astype(x_BKTH.dtype)
  mod_BR = jnp.where(keep_BR, jnp.take_along_axis(modality_BT, at_BR, axis=1), 0)
  return (
    take(k_BKTH),
    take(v_BKTH),
    jnp.where(keep_BKR, at_BKR, -1).astype(jnp.int32),
    jnp.broadcast_to(mod_BR[:, None], (b, kh, size)).astype(jnp.int32),
  )


def write_ring(cache: KVCache, layer: int, k_BKH: Array, v_BKH: Array) -> KVCache:
  """Writes the current token's K/V into ring ``layer``: row b's at sequence index
  ``lengths[b] + index``, slot ``(lengths[b] + index) mod R`` (index is not advanced)."""
  b, _, size = cache.layer_k[layer].shape[:3]
  p_B = cache.lengths + cache.index
  rows, slot_B = jnp.arange(b), p_B % size
  put = lambda xs, x: tuple(
    xs[i].at[rows, :, slot_B].set(x.astype(xs[i].dtype)) if i == layer else xs[i]
    for i in range(len(xs))
  )
  kh = k_BKH.shape[1]
  return cache.replace(
    layer_k=put(cache.layer_k, k_BKH),
    layer_v=put(cache.layer_v, v_BKH),
    layer_positions=put(cache.layer_positions, jnp.broadcast_to(p_B[:, None], (b, kh))),
    layer_modality=put(cache.layer_modality, jnp.full((b, kh), TEXT, jnp.int32)),
  )


def ring_valid(cache: KVCache, layer: int) -> Array:
  """``[B, K, R]``: the ring slots the current token (sequence index ``lengths + index``)
  attends to, itself included: the last ``window`` tokens."""
  p_B11 = (cache.lengths + cache.index)[:, None, None]
  pos_BKR = cache.layer_positions[layer]
  return (pos_BKR >= 0) & (pos_BKR > p_B11 - cache.window)


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
  """Writes one token's K/V for ``layer`` at slot ``index mod M`` of the append buffer (index is
  not advanced): once M tokens are written, each overwrites the oldest."""
  at = (cache.append_row(layer), 0, 0, cache.index % cache.append_k.shape[3], 0)
  k = jax.lax.dynamic_update_slice(
    cache.append_k, k_BKH[None, :, :, None].astype(cache.append_k.dtype), at
  )
  v = jax.lax.dynamic_update_slice(
    cache.append_v, v_BKH[None, :, :, None].astype(cache.append_v.dtype), at
  )
  return cache.replace(append_k=k, append_v=v)


def compact_capacity(cache: KVCache, multiple: int = 32) -> int:
  """The smallest capacity, a multiple of ``multiple`` (or the current one), that holds every
  kept slot of ``cache`` (slots are stored first, in ascending position order; rings keep their
  size)."""
  kept_LBK = np.delete(cache.kept_LBK(), list(cache.ring_layers), axis=0)
  return min(cache.capacity, capacity_for(int(kept_LBK.max(initial=0)), multiple))


def capacity_with(cache: KVCache, added_B) -> int:
  """The prefix capacity (a multiple of 32, never below the current one) that holds every
  (layer, row, KV head)'s kept slots plus row b's ``added_B[b]`` more (an answer folded in, a
  next turn's tokens)."""
  kept_LBK = np.stack([np.asarray(p >= 0).sum(-1) for p in cache.layer_positions])
  need = int((kept_LBK + np.asarray(added_B)[None, :, None]).max())
  return max(cache.capacity, capacity_for(need))


def capacity_for(used: int, multiple: int = 32) -> int:
  """The smallest multiple of ``multiple`` (at least one) that holds ``used`` slots: decode
  compiles once per capacity, so capacities are rounded."""
  return max(multiple, -(-used // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("capacity",), donate_argnums=0)
def shrink(cache: KVCache, capacity: int) -> KVCache:
  """The same cache with the prefix cut to ``capacity`` slots (all cut slots must be empty;
  rings are not cut)."""
  cut = lambda xs: tuple(
    x if i in cache.ring_layers else x[:, :, :capacity] for i, x in enumerate(xs)
  )
  return constrain(
    cache.replace(
      layer_k=cut(cache.layer_k),
      layer_v=cut(cache.layer_v),
      layer_positions=cut(cache.layer_positions),
      layer_modality=cut(cache.layer_modality),
    )
  )
