"""The paged decode cache: each layer stores exactly the pages its kept slots need.

Per-layer/per-head budgets (PyramidKV, AdaKV, MEDA, MadaKV) keep different counts in every
(layer, row, KV head). Padding every head to the largest count wastes memory and decode reads, so
after compression the prefix can be re-laid out as pages of ``S`` slots: layer l holds ``P_l``
pages (the sum over (row, head) of ceil(kept / S), rounded up a little), each owned by one
(row, KV head), ``owner = b * K + kv_head``; padding pages have ``owner = B * K``. Decode attention
reads only these pages (`jmmkv.kernels.decode_attention.paged_partials`) and merges them with the
append buffer, which stays dense ``[L, B, K, M, H]``.

``S`` (`page_size_for`) and ``P_l`` are static shapes: decode compiles once per distinct page
layout (``P_l`` rounded up to a multiple of ``page_multiple(P_l)``, at most 1/32 of ``P_l``, to
bound the number of layouts).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jmmkv.cache.kv_cache import KVCache, used_bytes
from jmmkv.typing import Array

PAGE_SIZE = 32  # the smallest page; `page_size_for` picks larger ones for long prompts
MAX_PAGE_SIZE = 512
# A GPU (Triton) block holds a whole page's K and V in shared memory: 128 slots x H 128 x f32 is
# 64 KiB each, within an H100's 227 KiB; 512 slots would be 256 KiB for V alone.
MAX_PAGE_SIZE_GPU = 128


def page_size_for(kept_LBK: np.ndarray, platform: str | None = None) -> int:
  """Slots per page: the largest power of two <= 1/8 of the mean kept count per (layer, row,
  head), within [32, 512] ([32, 128] when ``platform`` (default: the default backend) is
  ``"gpu"``). Pages waste under S / 2 slots per head on average (< 1/16 of what is kept), and
  long prompts get few large pages, which XLA CPU reads near its bandwidth (many 32-slot pages
  cost about 2x the bytes' time)."""
  mean = float(np.mean(kept_LBK)) if np.size(kept_LBK) else 0.0
  size = 1 << max(0, int(mean / 8).bit_length() - 1)
  gpu = (platform or jax.default_backend()) == "gpu"
  return int(min(MAX_PAGE_SIZE_GPU if gpu else MAX_PAGE_SIZE, max(PAGE_SIZE, size)))


@flax.struct.dataclass
class PagedKVCache:
  k: tuple[Array, ...]  # per layer [P_l, S, H] kept keys (after RoPE)
  v: tuple[Array, ...]  # per layer [P_l, S, H]
  owner: tuple[Array, ...]  # per layer [P_l] int32 b * K + kv_head (B * K: padding page)
  positions: tuple[Array, ...]  # per layer [P_l, S] int32 original prompt position, -1 where empty
  modality: tuple[Array, ...]  # per layer [P_l, S] int32 modality id (0 where empty)
  append_k: Array  # [L, B, K, M, H] generated tokens' keys
  append_v: Array  # [L, B, K, M, H]
  lengths: Array  # [B] int32 prompt length per row
  rope_start: Array  # [B] (or [3, B] for M-RoPE) int32 RoPE position of the first new token
  index: Array  # [] int32 number of tokens written to the append buffer

  @property
  def page_size(self) -> int:  # S
    return self.k[0].shape[1]

  def append_valid(self, upto: Array) -> Array:  # [M], true for slots < upto (all past M)
    return jnp.arange(self.append_k.shape[3]) < upto

  def kept_LBK(self) -> np.ndarray:
    """Kept prompt slots per (layer, row, KV head), from the arrays."""
    _, b, kh = self.append_k.shape[:3]
    out = np.zeros((len(self.k), b * kh + 1), np.int64)
    for layer, (owner, pos) in enumerate(zip(self.owner, self.positions)):
      np.add.at(out[layer], np.asarray(owner), (np.asarray(pos) >= 0).sum(-1))
    return out[:, :-1].reshape(len(self.k), b, kh)

  def append_row(self, layer: int) -> int:  # every layer has one (a paged cache has no rings)
    return layer

  def prefix_slots(self) -> int:
    return int(self.kept_LBK().sum())

  def kv_bytes_allocated(self) -> int:
    return sum(int(x.nbytes) for x in (*self.k, *self.v, self.append_k, self.append_v))

  def kv_bytes_used(self) -> int:
    return used_bytes(self)


def page_multiple(pages: int) -> int:
  """Granularity of a layer's page count: the largest power of two <= pages / 32 (at least 1)."""
  return max(1, 1 << max(0, int(pages).bit_length() - 6))


def pages_per_layer(kept_LBK: np.ndarray, page_size: int = PAGE_SIZE) -> list[int]:
  """``P_l``: the pages layer l stores (ceil(kept / S) per (row, head), summed, rounded up)."""
  need = (-(-np.asarray(kept_LBK) // page_size)).reshape(len(kept_LBK), -1).sum(-1)
  return [int(-(-max(1, n) // page_multiple(max(1, n))) * page_multiple(max(1, n))) for n in need]


def plan_pages(kept_LBK: np.ndarray, page_size: int, source):
  """Host-side layout: per layer the source page of every stored page and its owner, owners in
  order, padding pages last (owner ``B * K``, source 0). ``source(layer, owner_P, page_P)`` says
  where an owner's ``page``-th page comes from. Returns two tuples of int32 arrays ``[P_l]``."""
  sources, owners = [], []
  for layer, (kept_BK, total) in enumerate(
    zip(np.asarray(kept_LBK), pages_per_layer(kept_LBK, page_size))
  ):
    n_O = -(-kept_BK.reshape(-1) // page_size)
    owner = np.repeat(np.arange(n_O.size), n_O)
    page = np.arange(owner.size) - np.repeat(np.cumsum(n_O) - n_O, n_O)
    pad = total - owner.size
    src = source(layer, owner, page)
    sources.append(np.concatenate([src, np.zeros(pad, np.int64)]).astype(np.int32))
    owners.append(np.concatenate([owner, np.full(pad, n_O.size)]).astype(np.int32))
  return tuple(sources), tuple(owners)


def page_plan(kept_LBK: np.ndarray, capacity: int, page_size: int = PAGE_SIZE):
  """`plan_pages` from the dense prefix viewed as ``[B * K * ceil(C / S)]`` pages."""
  per_owner = -(-capacity // page_size)
  return plan_pages(kept_LBK, page_size, lambda layer, owner, page: owner * per_owner + page)


def paged_bytes(kept_LBK: np.ndarray, slot_bytes: int, page_size: int):
  """Prefix K/V bytes the paged layout would allocate for these kept counts."""
  return sum(pages_per_layer(kept_LBK, page_size)) * page_size * slot_bytes


# Pages are used (layout "auto") when they need under this fraction of a dense prefix's bytes.
PAGED_GAIN = 0.9


def pages_pay(kept_LBK: np.ndarray, slot_bytes: int, page_size: int) -> bool:
  """Whether pages of ``page_size`` hold these kept counts in under `PAGED_GAIN` of the bytes of
  the tightest dense prefix (every (layer, row, head) padded to the largest count)."""
  kept_LBK = np.asarray(kept_LBK)
  dense = kept_LBK.size * int(kept_LBK.max(initial=0)) * slot_bytes
  return paged_bytes(kept_LBK, slot_bytes, page_size) < PAGED_GAIN * dense


def take_pages(x_P, src_P, owner_P, owners: int, fill) -> Array:
  """Pages ``src_P`` of ``x_P`` (``[pages, S, ...]``); padding pages (``owner >= owners``) hold
  ``fill``."""
  y = jnp.take(x_P, src_P, axis=0)
  is_pad = (owner_P >= owners).reshape((-1,) + (1,) * (y.ndim - 1))
  return jnp.where(is_pad, jnp.asarray(fill, y.dtype), y)


@functools.partial(jax.jit, static_argnames=("page_size",), donate_argnums=0)
def to_paged(cache: KVCache, sources, owners, page_size: int = PAGE_SIZE) -> PagedKVCache:
  """The dense-prefix ``cache`` re-laid out as pages (`page_plan` gives ``sources``/``owners``)."""
  b, kh, c = cache.layer_k[0].shape[:3]
  per_owner = -(-c // page_size)
  pad = per_owner * page_size - c

  def per_layer(layers, fill):  # per layer [B, K, C, ...] -> [P_l, S, ...]
    widths = lambda x: [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3)
    return tuple(
      take_pages(
        jnp.pad(x, widths(x), constant_values=fill).reshape(
          b * kh * per_owner, page_size, *x.shape[3:]
        ),
        src_P,
        owner_P,
        b * kh,
        fill,
      )
      for x, src_P, owner_P in zip(layers, sources, owners, strict=True)
    )

  return with_pages(
    cache,
    owners,
    per_layer(cache.layer_k, 0),
    per_layer(cache.layer_v, 0),
    per_layer(cache.layer_positions, -1),
    per_layer(cache.layer_modality, 0),
  )


def with_pages(cache: KVCache, owners, k, v, positions, modality) -> PagedKVCache:
  """A `PagedKVCache` of these per-layer pages (tuples ``[P_l, S, ...]``) with ``cache``'s
  append buffer, lengths, RoPE start and index."""
  return PagedKVCache(
    k=k,
    v=v,
    owner=tuple(jnp.asarray(o) for o in owners),
    positions=positions,
    modality=modality,
    append_k=cache.append_k,
    append_v=cache.append_v,
    lengths=cache.lengths,
    rope_start=cache.rope_start,
    index=cache.index,
  )
