"""Prefill attention over query blocks, with the statistics policies ask for, in float32.

A statistic is a small frozen dataclass with a ``name`` (its key in the returned `Stats`); a
policy asks for a set of them (`StatsSpec`, built by `spec`). Two kinds exist, and a policy that
needs a new statistic subclasses one beside its own code (`jmmkv.cache.statistics` holds the
built-in ones):

- `QueryStatistic`: computed from the layer's queries and keys before the attention (which then
  overwrites the queries), e.g. SnapKV's observation-window sums or MEDA's cross-modal entropies;
- `ProbabilityStatistic`: accumulated from every valid query's *exact* attention probabilities,
  tile by tile (column sums, row entropies).

The causal mask hides half of the T x T pairs, and neither path below scores them. Without a
probability statistic, the attention runs flash style over key tiles
(`jmmkv.kernels.flash_attention`). With one, the same flash pass hands each tile to the
statistics (`_exact`), and for statistics of each key (column sums) scores each query block's
tiles a second time with the rows' final max and sum. Nothing of size T x T (or block x T) is
ever built, no key range is copied, and the output overwrites the queries. Padding is never a
query or a key. Dimension key: `jmmkv.typing`.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import einops
import jax
import jax.numpy as jnp

from jmmkv import sharding
from jmmkv.kernels import flash_attention, order
from jmmkv.typing import MASK_VALUE, Array

Stats = dict  # {statistic name: Array}; stacked over layers by the decoder: [L, ...]


class Statistic:
  """A prefill statistic: frozen dataclass subclasses (hashable: static under jit)."""

  name: ClassVar[str]
  per_key: ClassVar[bool] = False  # a value per key on the last axis ([B, N, T]), not per row

  def for_prompt(self, valid_BT, modality_BT) -> "Statistic":
    """This statistic with static settings from the prompt's host masks (NumPy ``[B, T]``)."""
    return self


class Keys(NamedTuple):
  """What a conversation's next turn attends to (`Past`): the cache's ``offset`` slots, then
  the new tokens. Statistics of each key are ``[..., slots]`` over that axis."""

  k: Array  # [B, K, S, H] (S >= slots: padded with invalid keys)
  valid: Array  # [B, K, S] bool, per KV head (a compressed cache keeps other slots per head)
  query_valid_BT: Array  # [B, T] the new tokens
  offset: int  # C, static: the first new token's key slot
  slots: int  # C + T, static: the keys before padding
  modality: Array  # [B, K, S] int32 modality of each key
  positions: Array  # [B, K, S] int32 sequence position of each key (which token it is)
  query_modality_BT: Array  # [B, T] int32


class QueryStatistic(Statistic):
  """Computed from the queries and keys before the attention."""

  def compute(self, q_BTNH: Array, k_BKTH: Array, valid_BT: Array, modality_BT: Array) -> Array:
    raise NotImplementedError

  def compute_after(self, q_BTNH: Array, keys: Keys) -> Array:
    """The statistic of a next turn's queries over a cache and their own tokens (`Keys`)."""
    raise NotImplementedError(f"the {self.name!r} statistic after a cache is not supported yet")


class Shape(NamedTuple):
  """Static sizes of the exact pass: query ``block`` rows of ``kh * g`` heads over ``t`` keys
  (``t`` padded to whole key tiles)."""

  b: int
  kh: int
  g: int
  block: int
  t: int


class Online(NamedTuple):
  """One key tile of one query block in the first (online) step of the exact pass (float32):
  ``e`` is relative to the rows' running max, so accumulators over earlier tiles are first
  multiplied by ``a`` (as the output is)."""

  e: Array  # [B, K, G, Q, S] exp(s - running row max); 0 where masked
  s: Array  # [B, K, G, Q, S] scaled scores (MASK_VALUE where masked)
  a: Array  # [B, K, G, Q] exp(previous running max - new running max)
  j: Array  # the tile's index: keys j * S .. j * S + S - 1


class Tile(NamedTuple):
  """One key tile of one finished query block in the second step of the exact pass (float32):
  ``e * w[..., None]`` are the exact attention probabilities of the block's valid queries."""

  e: Array  # [B, K, G, Q, S] exp(s - row max); 0 where masked
  s: Array  # [B, K, G, Q, S] scaled scores (MASK_VALUE where masked)
  w: Array  # [B, K, G, Q] 1 / row sum for valid queries, 0 for padding
  j: Array  # the tile's index: keys j * S .. j * S + S - 1


class Rows(NamedTuple):
  """One finished query block of the exact pass (float32)."""

  m: Array  # [B, K, G, Q] row max
  l: Array  # [B, K, G, Q] row sum of exp(s - m); 0 for a row with no key (padding)
  inv: Array  # [B, K, G, Q] 1 / l (0 where l is 0)
  qv: Array  # [B, Q] 1.0 for valid queries, 0.0 for padding


class ProbabilityStatistic(Statistic):
  """Accumulated from the exact probabilities of every valid query: ``acc = init(shape)``, then
  per query block ``online`` on each key tile as the attention reads it, ``tile`` on each key
  tile once the block's rows are done (exact probabilities) and ``block`` after that, and
  ``finish(acc, valid_BT)`` (``valid_BT`` unpadded) gives the statistic. Statistics are per
  head: ``[B, N, ...]``. A statistic that overrides `tile` makes the pass score every tile a
  second time; row statistics (`online` and `block` only) cost about what the attention does."""

  def init(self, shape: Shape) -> Any:
    raise NotImplementedError

  def online(self, acc, tile: Online) -> Any:
    return acc

  def tile(self, acc, tile: Tile) -> Any:
    return acc

  def block(self, acc, rows: Rows) -> Any:
    return acc

  def finish(self, acc, valid_BT: Array) -> Array:
    raise NotImplementedError

  def finish_after(self, acc, keys: Keys) -> Array:
    """`finish` for a next turn's queries over a cache and their own tokens (`Keys`)."""
    raise NotImplementedError(f"the {self.name!r} statistic after a cache is not supported yet")


def _reads_tiles(statistic: ProbabilityStatistic) -> bool:
  return type(statistic).tile is not ProbabilityStatistic.tile


StatsSpec = frozenset  # of `Statistic`s
NONE: StatsSpec = frozenset()


def spec(*statistics: Statistic) -> StatsSpec:
  """The set of ``statistics``; two different ones may not share a name."""
  out = frozenset(statistics)
  names = [x.name for x in out]
  if len(set(names)) < len(names):
    raise ValueError(f"conflicting statistics of one name: {sorted(map(repr, out))}")
  return out


def stack(per_layer: list[Stats]) -> Stats:
  """The layers' statistics stacked: ``{name: [L, ...]}``."""
  return {name: jnp.stack([st[name] for st in per_layer]) for name in per_layer[0]}


def for_prompt(statistics: StatsSpec, valid_BT, modality_BT) -> StatsSpec:
  """Each statistic's `Statistic.for_prompt` (host NumPy masks ``[B, T]``)."""
  return spec(*(x.for_prompt(valid_BT, modality_BT) for x in statistics))


def _exact(
  q_BTNH,
  k_BKTH,
  v_BKTH,
  valid_BT,
  block,
  key_block,
  wanted,
  window=None,
  bidirectional_BT=None,
  keys: Keys | None = None,
):
  """Causal attention with exact softmax rows for the ``wanted`` `ProbabilityStatistic`s. Each
  block of ``block`` queries reads only the ``key_block``-key tiles at or before its last query
  (``T`` a multiple of ``key_block``, itself of ``block``):

  1. flash style over the tiles (online max, sum and output), handing each tile to the
     statistics' `online` hooks;
  2. when a statistic reads tiles (`ProbabilityStatistic.tile`), the tiles are scored again
     with the rows' final max and sum (`Tile`), rather than kept: a ``block x T`` buffer per
     head would cost more memory than the scores cost time;

  then the block's rows (`Rows`) go to the statistics. The output overwrites the queries block
  by block (no output buffer); no key range is sliced or copied. With ``keys`` (a next turn),
  ``k_BKTH`` / ``v_BKTH`` are its keys (a multiple of ``key_block``) and the queries sit at key
  slots ``keys.offset ..``. Returns the output ``[B, T, N, H]`` and each statistic's
  accumulator."""
  b, t, n, h = q_BTNH.shape
  kh = k_BKTH.shape[1]
  offset, key_valid = (0, valid_BT) if keys is None else (keys.offset, keys.valid)
  g = n // kh
  scale = h**-0.5
  v_tile = lambda j: jax.lax.dynamic_slice_in_dim(v_BKTH, j * key_block, key_block, 2)
  second = any(map(_reads_tiles, wanted))
  groups_BT, reach_T = (None, None)
  if bidirectional_BT is not None:
    groups_BT, reach_T = flash_attention.runs(bidirectional_BT)
  m0 = MASK_VALUE / 2  # above every masked score: masked pairs get e = 0, a row with no key l = 0

  def block_step(state, i):
    buf_BTNH, accs = state
    q_BQNH = jax.lax.dynamic_slice_in_dim(buf_BTNH, i * block, block, axis=1)
    q_BKGQH = einops.rearrange(q_BQNH, "B Q (K G) H -> B K G Q H", K=kh) * scale
    rows_Q = offset + i * block + jnp.arange(block)
    tiles = flash_attention.end_tile(i, block, key_block, reach_T, offset)
    start = flash_attention.first_tile(i, block, key_block, window)
    qv_BQ = jax.lax.dynamic_slice_in_dim(valid_BT, i * block, block, axis=1).astype(jnp.float32)
    scores = lambda j: flash_attention.tile_scores(
      q_BKGQH, k_BKTH, key_valid, rows_Q, j, key_block, window, groups_BT
    )

    def online_tile(j, carry):  # 1
      m_BKGQ, l_BKGQ, o_BKGQH, accs = carry
      s = scores(j)
      m_new = jnp.maximum(m_BKGQ, jnp.max(s, axis=-1))
      a = jnp.exp(m_BKGQ - m_new)
      e = jnp.exp(s - m_new[..., None])
      pv = jnp.einsum(
        "BKGQS,BKSH->BKGQH", e.astype(v_BKTH.dtype), v_tile(j), preferred_element_type=jnp.float32
      )
      here = Online(e, s, a, j)
      accs = {x.name: x.online(accs[x.name], here) for x in wanted}
      return m_new, l_BKGQ * a + jnp.sum(e, axis=-1), o_BKGQH * a[..., None] + pv, accs

    zeros = jnp.zeros((b, kh, g, block), jnp.float32)
    o_BKGQH = jnp.zeros((b, kh, g, block, h), jnp.float32)
    m_BKGQ, l_BKGQ, o_BKGQH, accs = jax.lax.fori_loop(
      start, tiles, online_tile, (jnp.full_like(zeros, m0), zeros, o_BKGQH, accs)
    )
    inv_BKGQ = jnp.where(l_BKGQ > 0, 1.0 / jnp.where(l_BKGQ > 0, l_BKGQ, 1.0), 0.0)
    w_BKGQ = inv_BKGQ * qv_BQ[:, None, None, :]  # padding queries weigh 0

    def prob_tile(j, accs):  # 2
      s = scores(j)
      here = Tile(jnp.exp(s - m_BKGQ[..., None]), s, w_BKGQ, j)
      return {x.name: x.tile(accs[x.name], here) for x in wanted}  # the default tile: acc

    if second:
      accs = jax.lax.fori_loop(start, tiles, prob_tile, accs)
    accs = {x.name: x.block(accs[x.name], Rows(m_BKGQ, l_BKGQ, inv_BKGQ, qv_BQ)) for x in wanted}
    o_BQNH = einops.rearrange(o_BKGQH * inv_BKGQ[..., None], "B K G Q H -> B Q (K G) H")
    buf_BTNH = jax.lax.dynamic_update_slice_in_dim(
      buf_BTNH, o_BQNH.astype(buf_BTNH.dtype), i * block, axis=1
    )
    return (buf_BTNH, accs), None

  accs = {x.name: x.init(Shape(b, kh, g, block, k_BKTH.shape[2])) for x in wanted}
  (out_BTNH, accs), _ = jax.lax.scan(block_step, (q_BTNH, accs), jnp.arange(t // block))
  return out_BTNH, accs


# Flash tiles (`jmmkv.kernels.flash_attention`): the fastest on XLA CPU of those measured at T=8192.
FLASH_QUERY_BLOCK, FLASH_KEY_BLOCK = 256, 512


def _pad_tokens(pad: int, q_BTNH, k_BKTH, v_BKTH, *x_BT):
  """The prompt arrays with ``pad`` more tokens (zeros, so invalid: neither queries nor keys)."""
  widths = lambda x, axis: [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)]
  return (
    jnp.pad(q_BTNH, widths(q_BTNH, 1)),
    *(jnp.pad(x, widths(x, 2)) for x in (k_BKTH, v_BKTH)),
    *(jnp.pad(x, widths(x, 1)) for x in x_BT),
  )


def _flash(q_BTNH, k_BKTH, v_BKTH, valid_BT, window=None, bidirectional_BT=None) -> Array:
  """`flash_attention.causal_attention` of any T: one tile up to `FLASH_KEY_BLOCK` keys, else padded
  to whole key tiles (padding is never a key; its rows are cut off); shard-local under a mesh
  (`_shard_local`)."""
  b, t = q_BTNH.shape[:2]
  kh = k_BKTH.shape[1]
  # The query blocks `_exact` uses (at most 256 rows): both paths then do the same arithmetic and
  # give the same outputs, so one prefill can serve policies with and without probability
  # statistics (`jmmkv.compare`).
  blocks = (
    (min(t, FLASH_QUERY_BLOCK), t) if t <= FLASH_KEY_BLOCK else (FLASH_QUERY_BLOCK, FLASH_KEY_BLOCK)
  )
  masks_BT = (valid_BT,) if bidirectional_BT is None else (valid_BT, bidirectional_BT)
  if t > FLASH_KEY_BLOCK:
    q_BTNH, k_BKTH, v_BKTH, *masks_BT = _pad_tokens(
      -t % FLASH_KEY_BLOCK, q_BTNH, k_BKTH, v_BKTH, *masks_BT
    )
  attend = lambda q, k, v, valid, bi=None: flash_attention.causal_attention(
    q, k, v, valid, *blocks, window, bi
  )
  if jax.sharding.get_abstract_mesh().empty:
    return attend(q_BTNH, k_BKTH, v_BKTH, *masks_BT)[:, :t]
  per_head = lambda x_BT: jnp.broadcast_to(x_BT[:, None], (b, kh, x_BT.shape[1]))
  rows = lambda q, k, v, *masks_BKT: attend(q, k, v, *(x[:, 0] for x in masks_BKT))
  return _shard_local(rows, q_BTNH, k_BKTH, v_BKTH, *map(per_head, masks_BT))[:, :t]


def _shard_local(attend, q_BTNH, k_BKSH, v_BKSH, *masks_BKX) -> Array:
  """``attend(q, k, v, *masks)`` (a flash attention call; masks per KV head ``[B, K, ...]``)
  under a mesh: shard-locally per (row, KV head) (`sharding.per_head`), since XLA cannot split
  a kernel call and would otherwise gather every device's q/K/V. Returns ``[B, T, N, H]``."""
  kh = k_BKSH.shape[1]

  def local(q_BKTGH, k_BKSH, v_BKSH, *masks_BKX):
    q_BTNH = einops.rearrange(q_BKTGH, "B K T G H -> B T (K G) H")
    o_BTNH = attend(q_BTNH, k_BKSH, v_BKSH, *masks_BKX)
    return einops.rearrange(o_BTNH, "B T (K G) H -> B K T G H", K=k_BKSH.shape[1])

  q_BKTGH = einops.rearrange(q_BTNH, "B T (K G) H -> B K T G H", K=kh)
  o_BKTGH = sharding.per_head(local, q_BKTGH, k_BKSH, v_BKSH, *masks_BKX, lead=0)
  return einops.rearrange(o_BKTGH, "B K T G H -> B T (K G) H")


class Past(NamedTuple):
  """One layer's cache before the new tokens (a conversation's earlier turns): every new query
  sees every valid slot."""

  k: Array  # [B, K, C, H] after RoPE
  v: Array  # [B, K, C, H]
  valid: Array  # [B, K, C] bool
  modality: Array  # [B, K, C] int32
  positions: Array  # [B, K, C] int32 sequence position of each slot (-1 where invalid)
  lengths_B: Array  # [B] int32 tokens before the new ones: the first new token's position


def _joined(
  past: Past, k_BKTH, v_BKTH, valid_BT, modality_BT, key_block: int, slots: int | None = None
):
  """The keys of a next turn (`Keys`) and their values: the ``past``'s slots, then the new
  tokens, padded to a multiple of ``key_block`` keys (``slots``: the unpadded count, when the
  new tokens were padded)."""
  b, kh, t = k_BKTH.shape[:3]
  c = past.k.shape[2]
  pad = [(0, 0), (0, 0), (0, -(c + t) % key_block)]
  join = lambda old, new: jnp.pad(
    jnp.concatenate([old.astype(new.dtype), new], axis=2), pad + [(0, 0)] * (new.ndim - 3)
  )
  heads = lambda x_BT: jnp.broadcast_to(x_BT[:, None], (b, kh, t))
  seq_BT = jnp.where(valid_BT, past.lengths_B[:, None] + jnp.arange(t), -1)
  keys = Keys(
    join(past.k, k_BKTH),
    join(past.valid, heads(valid_BT)),
    valid_BT,
    c,
    c + t if slots is None else slots,
    join(past.modality, heads(modality_BT.astype(past.modality.dtype))),
    join(past.positions, heads(seq_BT.astype(past.positions.dtype))),
    modality_BT,
  )
  return keys, join(past.v, v_BKTH)


def _key_block(s: int, key_block: int) -> int:
  return s if s <= key_block else key_block


def _flash_after(q_BTNH, k_BKTH, v_BKTH, valid_BT, past: Past) -> Array:
  """`_flash` of new tokens after a ``past``: the keys are the past's slots, then the new
  tokens (causal among themselves; `flash_attention.causal_attention` with an offset and
  per-KV-head key validity). ``T`` is a multiple of the query block."""
  t, c = q_BTNH.shape[1], past.k.shape[2]
  key_block = _key_block(c + t, FLASH_KEY_BLOCK)
  keys, v_BKSH = _joined(past, k_BKTH, v_BKTH, valid_BT, valid_BT.astype(jnp.int32), key_block)
  k_BKSH, valid_BKS = keys.k, keys.valid
  attend = lambda q, k, v, valid: flash_attention.causal_attention(
    q, k, v, valid, min(t, FLASH_QUERY_BLOCK), key_block, offset=c
  )
  if jax.sharding.get_abstract_mesh().empty:
    return attend(q_BTNH, k_BKSH, v_BKSH, valid_BKS)
  return _shard_local(attend, q_BTNH, k_BKSH, v_BKSH, valid_BKS)


def attention(
  q_BTNH: Array,
  k_BKTH: Array,
  v_BKTH: Array,
  valid_BT: Array,
  modality_BT: Array,
  statistics: StatsSpec = NONE,
  block: int = 256,
  key_block: int = 512,
  window: int | None = None,
  bidirectional_BT: Array | None = None,
  past: Past | None = None,
) -> tuple[Array, Stats]:
  """Causal GQA attention of the prompt (keys at slots <= the query's slot, padding masked;
  with a sliding ``window``, only the ``window - 1`` slots before the query and itself). The
  slots of each contiguous run of ``bidirectional_BT`` (bool ``[B, T]``: Gemma 3's image
  tokens) also see the later slots of their run; the probability statistics are those of this
  attention, the `QueryStatistic`s stay causal.

  The `QueryStatistic`s in ``statistics`` are computed first. Without a `ProbabilityStatistic`,
  the attention is flash style (`jmmkv.kernels.flash_attention`). With one, blocks of ``block``
  queries read the ``key_block``-key tiles at or before them, flash style with the statistics'
  hooks, and again for the exact probabilities when a statistic reads tiles (`_exact`). The
  masked pairs are never computed.
  With a ``past`` (`Past`), the queries also see every valid slot of an earlier turn's cache,
  and the statistics are those of these queries over the cache's slots and the new tokens
  (`QueryStatistic.compute_after`, `ProbabilityStatistic.finish_after`; no sliding windows or
  bidirectional runs yet).
  Returns the output ``[B, T, N, H]`` and `Stats` ``{name: array}`` of the requested statistics.
  """
  if key_block % block:
    raise ValueError(f"key_block {key_block} must be a multiple of block {block}")
  statistics = spec(*statistics)
  if past is not None and (window is not None or bidirectional_BT is not None):
    raise NotImplementedError("attention after a cache has no sliding windows or runs yet")
  if window is not None and any(isinstance(x, QueryStatistic) for x in statistics):
    raise NotImplementedError(
      "query statistics (observation windows, cross entropies) of a sliding-window layer are "
      "not supported yet"
    )
  if past is not None and statistics:
    keys = _joined(past, k_BKTH, v_BKTH, valid_BT, modality_BT, 1)[0]
    compute = lambda x: x.compute_after(q_BTNH, keys)
  else:
    compute = lambda x: x.compute(q_BTNH, k_BKTH, valid_BT, modality_BT)
  out = {  # statistics that read the queries first: the attention then overwrites them
    x.name: compute(x)
    for x in sorted(statistics, key=lambda x: x.name)
    if isinstance(x, QueryStatistic)
  }
  q_BTNH = order.after(q_BTNH, *out.values())  # those first: their temporaries die here
  wanted = [x for x in statistics if isinstance(x, ProbabilityStatistic)]
  unknown = statistics - set(wanted) - {x for x in statistics if isinstance(x, QueryStatistic)}
  if unknown:
    raise TypeError(f"not a QueryStatistic or ProbabilityStatistic: {sorted(map(repr, unknown))}")
  t_in = q_BTNH.shape[1]
  pad = -t_in % min(block, t_in)
  bi_BT = () if bidirectional_BT is None else (bidirectional_BT,)
  if pad:  # whole blocks (padding is never a query or a key; cut off below)
    q_BTNH, k_BKTH, v_BKTH, valid_BT, *bi_BT = _pad_tokens(
      pad, q_BTNH, k_BKTH, v_BKTH, valid_BT, *bi_BT
    )
  t = q_BTNH.shape[1]
  if past is not None and wanted:  # the exact pass over the cache's slots and the new tokens
    s_in = past.k.shape[2] + t_in
    kb = _key_block(past.k.shape[2] + t, key_block)
    mod_BT = jnp.pad(modality_BT, ((0, 0), (0, t - t_in)))  # padding: invalid
    keys, v_BKSH = _joined(past, k_BKTH, v_BKTH, valid_BT, mod_BT, kb, s_in)
    out_BTNH, accs = _exact(q_BTNH, keys.k, v_BKSH, valid_BT, min(block, t), kb, wanted, keys=keys)
    query_valid = valid_BT[:, :t_in]
    out.update(
      {
        x.name: x.finish_after(accs[x.name], keys._replace(query_valid_BT=query_valid))
        for x in wanted
      }
    )
  elif past is not None:
    out_BTNH = _flash_after(q_BTNH, k_BKTH, v_BKTH, valid_BT, past)
  elif not wanted:  # no statistic of every query's probabilities: flash attention
    out_BTNH = _flash(q_BTNH, k_BKTH, v_BKTH, valid_BT, window, *bi_BT)
  else:  # exact probabilities: two passes over key tiles (`_exact`)
    key_block = t if t <= key_block else key_block
    q, k, v, valid, *bi = _pad_tokens(-t % key_block, q_BTNH, k_BKTH, v_BKTH, valid_BT, *bi_BT)
    out_BTNH, accs = _exact(q, k, v, valid, min(block, t), key_block, wanted, window, *bi)
    out.update({x.name: x.finish(accs[x.name], valid_BT[:, :t_in]) for x in wanted})
  return out_BTNH[:, :t_in], out
