"""Causal prompt attention, flash style: query blocks read only the key tiles at or before them.

`causal_attention_reference` is plain jnp; `causal_attention_pallas` is a Pallas kernel for TPU
(Mosaic) and GPU (Triton) beside it. `causal_attention` runs the one `jmmkv.kernels.mode()` picks:
the kernel on a TPU/GPU backend, the reference on CPU.

Both give, per query row and head, softmax over the keys at or before the row's slot with
``valid_BT`` true of ``q . k * H**-0.5`` (float32 scores, online softmax over key tiles), times v.
A row without any such key (a left-padding slot: a valid row sees itself) is finite in both but not
the same: the kernel gives 0, the reference the mean of v over the tiles it read (their scores all
tie at `MASK_VALUE`). Callers ignore padding rows. With an ``offset`` (a conversation's next turn)
the T queries sit at key slots ``offset ..`` after a cache's slots, and key validity may be per KV
head (``[B, K, S]``: each head kept its own slots).
"""

from __future__ import annotations

import functools
import math

import einops
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jmmkv import kernels
from jmmkv.typing import MASK_VALUE, Array

f32 = jnp.float32


def tile_scores(
  q_BKGQH,
  k_BKTH,
  valid_BT,
  rows_Q,
  j,
  key_block: int,
  window: int | None = None,
  groups_BT: Array | None = None,
) -> Array:
  """Scores ``[B, K, G, Q, S]`` (float32) of (scaled) queries at slots ``rows_Q`` against key
  tile ``j`` of ``key_block`` keys; `MASK_VALUE` where the causal mask or padding hides a key,
  or, with a sliding ``window``, where the key is ``window`` or more slots before the query (as
  transformers' ``sliding_window``: a query sees itself and the ``window - 1`` slots before).
  ``groups_BT`` (`runs`): slots of one run also see each other's later slots (Gemma 3's
  bidirectional image tokens; the window still applies). ``valid_BT`` may be per KV head
  (``[B, K, T]``: a compressed cache's slots before the new tokens)."""
  tile = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, j * key_block, key_block, axis)
  s = jnp.einsum("BKGQH,BKSH->BKGQS", q_BKGQH, tile(k_BKTH, 2), preferred_element_type=jnp.float32)
  cols_S = j * key_block + jnp.arange(key_block)
  seen_BQS = (rows_Q[:, None] >= cols_S[None, :])[None]
  if groups_BT is not None:
    gq_BQ1 = jnp.take(groups_BT, rows_Q, axis=1)[:, :, None]
    seen_BQS = seen_BQS | ((gq_BQ1 == tile(groups_BT, 1)[:, None, :]) & (gq_BQ1 >= 0))
  if window is not None:
    seen_BQS &= (rows_Q[:, None] - cols_S[None, :] < window)[None]
  valid_BKS = tile(valid_BT, valid_BT.ndim - 1)
  valid_BK1S = valid_BKS[:, :, None, :] if valid_BT.ndim == 3 else valid_BKS[:, None, None, :]
  mask_BKQS = seen_BQS[:, None] & valid_BK1S
  return jnp.where(mask_BKQS[:, :, None], s, MASK_VALUE)


def runs(bidirectional_BT: Array) -> tuple[Array, Array]:
  """The contiguous runs of true slots of ``bidirectional_BT`` ``[B, T]`` (bool): each slot's
  run id ``[B, T]`` (-1 outside runs), and ``[T]`` the last slot a query there may see in any
  row (its run's last slot; itself outside runs)."""
  t = bidirectional_BT.shape[1]
  before_BT = jnp.pad(bidirectional_BT, ((0, 0), (1, 0)))[:, :-1]
  starts_BT = bidirectional_BT & ~before_BT
  groups_BT = jnp.where(bidirectional_BT, jnp.cumsum(starts_BT, axis=1) - 1, -1)
  slot_T = jnp.arange(t)
  stops_BT = jnp.where(bidirectional_BT, t, slot_T[None])  # the slots that end no run
  next_stop_BT = jnp.flip(jax.lax.cummin(jnp.flip(stops_BT, 1), axis=1), 1)
  reach_BT = jnp.where(bidirectional_BT, next_stop_BT - 1, slot_T[None])
  return groups_BT.astype(jnp.int32), reach_BT.max(0)


def end_tile(i, query_block: int, key_block: int, reach_T: Array | None, offset: int = 0):
  """One past the last key tile query block ``i`` reads: the tile of its last query (at slot
  ``offset + i * query_block + query_block - 1``), or of the furthest slot a run lets one of its
  queries see (``reach_T``, `runs`)."""
  if reach_T is None:
    return (offset + i * query_block + query_block + key_block - 1) // key_block
  last = jnp.max(jax.lax.dynamic_slice_in_dim(reach_T, i * query_block, query_block))
  return last // key_block + 1


def first_tile(i, query_block: int, key_block: int, window: int | None):
  """The first key tile query block ``i`` reads: 0, or with a ``window`` the tile of its first
  row's oldest visible key."""
  if window is None:
    return 0
  return jnp.maximum(i * query_block - window + 1, 0) // key_block


def _check_blocks(t: int, query_block: int, key_block: int):
  if t % key_block or key_block % query_block:
    raise ValueError(f"T={t} must be a multiple of {key_block}, a multiple of {query_block}")


def _check_blocks_after(t: int, s: int, query_block: int, key_block: int):
  if t % query_block or s % key_block:
    raise ValueError(f"T={t} must be a multiple of {query_block}, S={s} of {key_block}")


def causal_attention_reference(
  q_BTNH: Array,
  k_BKTH: Array,
  v_BKTH: Array,
  valid_BT: Array,
  query_block: int = 256,
  key_block: int = 512,
  window: int | None = None,
  bidirectional_BT: Array | None = None,
  offset: int = 0,
) -> Array:
  """Causal GQA attention of a prompt, flash style: each block of ``query_block`` queries reads
  only the ``key_block``-key tiles at or before its last query, with an online softmax, so the
  pairs the causal mask hides are neither scored nor stored. ``T`` must be a multiple of both
  blocks, and ``key_block`` of ``query_block``. Padding (``valid_BT`` false) is never a key.
  A sliding ``window`` (`tile_scores`) also skips the tiles wholly before it; each contiguous
  run of ``bidirectional_BT`` slots attends within itself both ways (blocks read on to its end).

  With an ``offset``, the T queries sit at key slots ``offset ..``: the keys ``[B, K, S, H]``
  are ``offset`` earlier slots (a cache: every query sees them) then the queries' own tokens,
  ``valid_BT`` is ``[B, S]`` or per KV head ``[B, K, S]``, and S must be a multiple of
  ``key_block`` (T of ``query_block``). Returns ``[B, T, N, H]``."""
  b, t, n, h = q_BTNH.shape
  kh = k_BKTH.shape[1]
  if offset:
    if window is not None or bidirectional_BT is not None:
      raise NotImplementedError("an offset with a window or bidirectional runs")
    _check_blocks_after(t, k_BKTH.shape[2], query_block, key_block)
  else:
    _check_blocks(t, query_block, key_block)
  g = n // kh
  groups_BT, reach_T = (None, None) if bidirectional_BT is None else runs(bidirectional_BT)

  def query_step(buf_BTNH, i):  # queries not yet reached, outputs of those done
    q_BQNH = jax.lax.dynamic_slice_in_dim(buf_BTNH, i * query_block, query_block, axis=1)
    q_BKGQH = einops.rearrange(q_BQNH, "B Q (K G) H -> B K G Q H", K=kh) * h**-0.5
    rows_Q = offset + i * query_block + jnp.arange(query_block)

    def key_step(j, carry):
      o_BKGQH, m_BKGQ, l_BKGQ = carry
      s = tile_scores(q_BKGQH, k_BKTH, valid_BT, rows_Q, j, key_block, window, groups_BT)
      v_BKSH = jax.lax.dynamic_slice_in_dim(v_BKTH, j * key_block, key_block, 2)
      m_new = jnp.maximum(m_BKGQ, jnp.max(s, axis=-1))
      rescale = jnp.exp(m_BKGQ - m_new)
      e = jnp.exp(s - m_new[..., None])
      o_BKGQH = o_BKGQH * rescale[..., None] + jnp.einsum(
        "BKGQS,BKSH->BKGQH", e.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=jnp.float32
      )
      return o_BKGQH, m_new, l_BKGQ * rescale + jnp.sum(e, axis=-1)

    init = (
      jnp.zeros((b, kh, g, query_block, h), jnp.float32),
      jnp.full((b, kh, g, query_block), MASK_VALUE, jnp.float32),
      jnp.zeros((b, kh, g, query_block), jnp.float32),
    )
    tiles = end_tile(i, query_block, key_block, reach_T, offset)
    start = first_tile(i, query_block, key_block, window)
    o_BKGQH, _, l_BKGQ = jax.lax.fori_loop(start, tiles, key_step, init)
    o_BKGQH = o_BKGQH / l_BKGQ[..., None]
    o_BQNH = einops.rearrange(o_BKGQH, "B K G Q H -> B Q (K G) H").astype(q_BTNH.dtype)
    return jax.lax.dynamic_update_slice_in_dim(buf_BTNH, o_BQNH, i * query_block, axis=1), None

  # The output overwrites the queries block by block (each block reads its own queries first):
  # no output buffer is allocated, which XLA would otherwise create before the layer runs.
  out_BTNH, _ = jax.lax.scan(query_step, q_BTNH, jnp.arange(t // query_block))
  return out_BTNH


# The kernel's own tiles (query rows, key slots), whatever blocks the reference is given.
TPU_TILES = (128, 512)
GPU_TILES = (64, 64)  # key tiles of 32 where a K row is wider than 256 bytes (shared memory)
LANES = 128  # TPU vector lanes: key tiles are whole lanes; m and l are kept lane-replicated


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def kernel_tiles(
  t: int, h: int, dtype, query_block: int | None, key_block: int | None, backend: str | None
) -> tuple[int, int, int]:
  """The kernel's query and key tiles for a ``t``-token prompt, and ``T`` padded to whole tiles.

  Default tiles: `TPU_TILES` (any backend but GPU), `GPU_TILES`. Tiles longer than the padded
  prompt shrink to it. TPU (Mosaic): query tiles a multiple of 8, key tiles of 128 (the validity
  row is lane-tiled). GPU (Triton): both powers of two >= 16 (``tl.dot``'s smallest)."""
  if backend == "gpu":
    wide = jnp.dtype(dtype).itemsize * max(16, pl.next_power_of_2(h)) > 256
    qb, sb = query_block or GPU_TILES[0], key_block or GPU_TILES[1] // (2 if wide else 1)
    for name, x in (("query_block", qb), ("key_block", sb)):
      if x < 16 or x & (x - 1):
        raise ValueError(f"on GPU {name} must be a power of two >= 16, got {x}")
    cap = max(16, pl.next_power_of_2(t))
  else:
    qb, sb = query_block or TPU_TILES[0], key_block or TPU_TILES[1]
    if qb < 8 or qb % 8 or sb < LANES or sb % LANES:
      raise ValueError(
        f"on TPU query_block must be a multiple of 8, key_block of {LANES}: {qb, sb}"
      )
    cap = _round_up(t, LANES)
  qb, sb = min(qb, cap), min(sb, cap)
  return qb, sb, _round_up(t, math.lcm(qb, sb))


def _last_tile(i, query_block: int, key_block: int, offset: int = 0, tiles: int | None = None):
  """Index of the last key tile that query block ``i`` reads (the one holding its last row, at
  key slot ``offset + (i + 1) * query_block - 1``), at most ``tiles - 1``."""
  last = _div(offset + (i + 1) * query_block - 1, key_block)
  return last if tiles is None else jnp.minimum(last, tiles - 1)


def _kv_tile(i, j, query_block: int, key_block: int, offset: int = 0, tiles: int | None = None):
  """The key tile (grid step) ``j`` of query block ``i`` fetches on TPU: ``j`` up to the last tile
  it reads, then 0, the next query block's first tile, so that the skipped steps fetch nothing new
  and that fetch overlaps the diagonal tile's work."""
  return jnp.where(j <= _last_tile(i, query_block, key_block, offset, tiles), j, 0)


def _div(x, d: int):
  """``x // d`` of a non-negative int32 scalar (a grid index; ``//`` lowers to more ops)."""
  return lax.div(x, x.dtype.type(d))


_QK = (((1,), (1,)), ((), ()))  # [Q, H] x [S, H] -> [Q, S]
_PV = (((1,), (0,)), ((), ()))  # [Q, S] x [S, H] -> [Q, H]


def _tile_step(q_QH, k_SH, v_SH, keep_QS, m_Q1, l_Q1, acc_QH):
  """One key tile of the online softmax (queries already scaled): the running row max ``m``,
  sum ``l`` and unnormalised output ``acc`` (f32) after it. Hidden keys score `MASK_VALUE`."""
  if q_QH.dtype != k_SH.dtype:
    q_QH, k_SH = q_QH.astype(f32), k_SH.astype(f32)
  s_QS = lax.dot_general(q_QH, k_SH, _QK, preferred_element_type=f32)
  s_QS = jnp.where(keep_QS, s_QS, MASK_VALUE)
  m_next = jnp.maximum(m_Q1, jnp.max(s_QS, axis=1, keepdims=True))
  alpha_Q1 = jnp.exp(m_Q1 - m_next)
  p_QS = jnp.exp(s_QS - m_next)
  l_Q1 = alpha_Q1 * l_Q1 + jnp.sum(p_QS, axis=1, keepdims=True)
  pv_QH = lax.dot_general(p_QS.astype(v_SH.dtype), v_SH, _PV, preferred_element_type=f32)
  return m_next, l_Q1, alpha_Q1 * acc_QH + pv_QH


def _normalised(acc_QH, m_Q1, l_Q1):
  """``acc / l``, and 0 on rows without a valid key (their max never rose above `MASK_VALUE`)."""
  return acc_QH * jnp.where(m_Q1 > MASK_VALUE, 1.0 / l_Q1, 0.0)


def _tpu_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, acc_ref, m_ref, l_ref, *, offset: int):
  """Grid step (batch, KV head, query block i, key tile j). Refs: q/o ``[G, Q, H]``, k/v
  ``[S, H]``, valid ``[1, S]`` int32; scratch acc ``[G, Q, H]``, m/l ``[G, Q, LANES]`` (f32, all
  lanes equal), carried over j. The queries sit at key slots ``offset + i * Q ..``. Steps past
  the diagonal (``j > last``) score nothing; the last step writes the output."""
  heads, qb, _ = q_ref.shape
  sb = k_ref.shape[0]
  i, j = pl.program_id(2), pl.program_id(3)
  last = _last_tile(i, qb, sb, offset)

  @pl.when(j == 0)
  def _start():
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, f32)
    l_ref[...] = jnp.zeros(l_ref.shape, f32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

  @pl.when(j <= last)
  def _tile():
    rows_QS = offset + i * qb + lax.broadcasted_iota(jnp.int32, (qb, sb), 0)
    cols_QS = j * sb + lax.broadcasted_iota(jnp.int32, (qb, sb), 1)
    keep_QS = (rows_QS >= cols_QS) & (jnp.broadcast_to(valid_ref[...], (qb, sb)) != 0)
    k_SH, v_SH = k_ref[...], v_ref[...]
    for g in range(heads):  # the G query heads of this KV head share its K/V tile
      carry = (m_ref[g][:, :1], l_ref[g][:, :1], acc_ref[g])
      m_Q1, l_Q1, acc_QH = _tile_step(q_ref[g], k_SH, v_SH, keep_QS, *carry)
      m_ref[g] = jnp.broadcast_to(m_Q1, (qb, LANES))
      l_ref[g] = jnp.broadcast_to(l_Q1, (qb, LANES))
      acc_ref[g] = acc_QH

  @pl.when(j == pl.num_programs(3) - 1)
  def _store():
    for g in range(heads):
      out_QH = _normalised(acc_ref[g], m_ref[g][:, :1], l_ref[g][:, :1])
      o_ref[g] = out_QH.astype(o_ref.dtype)


def _gpu_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, *, key_block: int, offset: int):
  """Program (query block, query head, batch). Refs: q/o ``[Q, H]``, k/v ``[S, H]`` (the KV
  head's whole prompt), valid ``[S]`` int32. The queries sit at key slots ``offset + i * Q ..``;
  the key-tile loop stops at the diagonal tile."""
  qb, sb = q_ref.shape[0], key_block
  i = pl.num_programs(0) - 1 - pl.program_id(0)  # the longest query blocks are launched first
  q_QH = q_ref[...]
  rows_Q1 = (offset + i * qb + jnp.arange(qb))[:, None]

  def key_tile(j, carry):
    slots = pl.ds(j * sb, sb)
    cols_1S = (j * sb + jnp.arange(sb))[None, :]
    keep_QS = (rows_Q1 >= cols_1S) & (valid_ref[slots] != 0)[None, :]
    return _tile_step(q_QH, k_ref[slots, :], v_ref[slots, :], keep_QS, *carry)

  init = (jnp.full((qb, 1), MASK_VALUE, f32), jnp.zeros((qb, 1), f32), jnp.zeros(q_ref.shape, f32))
  tiles = k_ref.shape[0] // sb
  m_Q1, l_Q1, acc_QH = lax.fori_loop(0, _last_tile(i, qb, sb, offset, tiles) + 1, key_tile, init)
  o_ref[...] = _normalised(acc_QH, m_Q1, l_Q1).astype(o_ref.dtype)


def _cost(b, n, h, qb, sb, tq, ts, offset, *arrays) -> pl.CostEstimate:
  """Scores and products of the tiles read, one exp a score; q, k, v and o read/written once."""
  last = lambda i: min((offset + (i + 1) * qb - 1) // sb + 1, ts // sb)
  pairs = sum(last(i) * sb * qb for i in range(tq // qb))
  return pl.CostEstimate(
    flops=4 * b * n * h * pairs,
    transcendentals=b * n * pairs,
    bytes_accessed=sum(x.nbytes for x in arrays) + arrays[0].nbytes,
  )


def _tpu_call(q_BTNH, k_BKSH, v_BKSH, valid_BKS, qb, sb, tq, offset, interpret) -> Array:
  """Grid (B, K, T/Q, S/S') over head-major copies ``[B, N, T, H]`` of q and o (a block holds
  the G query heads of a KV head), q padded to ``tq`` rows. Steps past the diagonal are skipped
  by `pl.when` and fetch no tile (`_kv_tile`)."""
  from jax.experimental.pallas import tpu as pltpu

  b, t, n, h = q_BTNH.shape
  kh, ts = k_BKSH.shape[1], valid_BKS.shape[2]
  g, tiles = n // kh, ts // sb
  widths = lambda x, axis, to: [
    (0, to - x.shape[a]) if a == axis else (0, 0) for a in range(x.ndim)
  ]
  q_BNTH = einops.rearrange(q_BTNH, "B T N H -> B N T H")
  q_BNTH = jnp.pad(q_BNTH, widths(q_BNTH, 2, tq))
  k_BKSH, v_BKSH = (jnp.pad(x, widths(x, 2, ts)) for x in (k_BKSH, v_BKSH))
  fetch = lambda i, j: _kv_tile(i, j, qb, sb, offset, tiles)

  q_spec = pl.BlockSpec((None, g, qb, h), lambda b_, k_, i, j: (b_, k_, i, 0))
  kv_spec = pl.BlockSpec((None, None, sb, h), lambda b_, k_, i, j: (b_, k_, fetch(i, j), 0))
  valid_spec = pl.BlockSpec((None, None, 1, sb), lambda b_, k_, i, j: (b_, k_, 0, fetch(i, j)))
  params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3 + ("arbitrary",))
  o_BNTH = pl.pallas_call(
    functools.partial(_tpu_kernel, offset=offset),
    grid=(b, kh, tq // qb, tiles),
    in_specs=[q_spec, kv_spec, kv_spec, valid_spec],
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(q_BNTH.shape, q_BNTH.dtype),
    scratch_shapes=[
      pltpu.VMEM((g, qb, h), f32),
      pltpu.VMEM((g, qb, LANES), f32),
      pltpu.VMEM((g, qb, LANES), f32),
    ],
    input_output_aliases={0: 0},  # each block's queries are read before its output is written
    interpret=interpret,
    name="jmmkv_causal_attention",
    compiler_params=None if interpret else params,
    cost_estimate=_cost(b, n, h, qb, sb, tq, ts, offset, q_BNTH, k_BKSH, v_BKSH),
  )(q_BNTH, k_BKSH, v_BKSH, valid_BKS[:, :, None, :])
  return einops.rearrange(o_BNTH[:, :, :t], "B N T H -> B T N H")


def _gpu_call(q_BTNH, k_BKSH, v_BKSH, valid_BKS, qb, sb, tq, offset, interpret) -> Array:
  """Grid (T/Q, N, B), a program per query block and head, reading q and o in place
  (``[B, T, N, H]``, padded to ``tq`` rows) and its KV head's k/v. H is zero-padded to a power
  of two >= 16 (exact: the padded columns add 0 to q.k and are cut from o)."""
  from jax.experimental.pallas import triton as pltriton

  b, t, n, h = q_BTNH.shape
  kh, ts = k_BKSH.shape[1], valid_BKS.shape[2]
  g, hp, nq = n // kh, max(16, pl.next_power_of_2(h)), tq // qb
  q_BTNH = jnp.pad(q_BTNH, [(0, 0), (0, tq - t), (0, 0), (0, hp - h)])
  k_BKSH, v_BKSH = (
    jnp.pad(x, [(0, 0), (0, 0), (0, ts - x.shape[2]), (0, hp - h)]) for x in (k_BKSH, v_BKSH)
  )
  q_spec = pl.BlockSpec((None, qb, None, hp), lambda i, n_, b_: (b_, nq - 1 - i, n_, 0))
  kv_spec = pl.BlockSpec((None, None, ts, hp), lambda i, n_, b_: (b_, _div(n_, g), 0, 0))
  valid_spec = pl.BlockSpec((None, None, ts), lambda i, n_, b_: (b_, _div(n_, g), 0))
  params = pltriton.CompilerParams(num_warps=4 if hp <= 64 else 8, num_stages=2)
  o_BTNH = pl.pallas_call(
    functools.partial(_gpu_kernel, key_block=sb, offset=offset),
    grid=(nq, n, b),
    in_specs=[q_spec, kv_spec, kv_spec, valid_spec],
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype),
    input_output_aliases={0: 0},  # a program reads its queries before it writes its output
    interpret=interpret,
    name="jmmkv_causal_attention",
    compiler_params=None if interpret else params,
    cost_estimate=_cost(b, n, hp, qb, sb, tq, ts, offset, q_BTNH, k_BKSH, v_BKSH),
  )(q_BTNH, k_BKSH, v_BKSH, valid_BKS)
  return o_BTNH[:, :t, :, :h]


@functools.partial(
  jax.jit, static_argnames=("query_block", "key_block", "offset", "interpret", "platform")
)
def causal_attention_pallas(
  q_BTNH: Array,
  k_BKSH: Array,
  v_BKSH: Array,
  valid: Array,
  query_block: int | None = None,
  key_block: int | None = None,
  *,
  offset: int = 0,
  interpret: bool = False,
  platform: str | None = None,
) -> Array:
  """`causal_attention_reference` as a Pallas kernel, in tiles of ``query_block`` queries and
  ``key_block`` keys (default and constraints: `kernel_tiles`; q and the keys are padded to
  whole tiles with invalid slots, so any length works). A block of queries reads only the key
  tiles up to the one holding its last row. Rows without a valid key give 0 (see the module
  docstring). With an ``offset`` (a conversation's next turn) the T queries sit at key slots
  ``offset ..`` of the S >= offset + T keys, as in the reference; ``valid`` is ``[B, S]`` or per
  KV head ``[B, K, S]``. ``platform`` (``"tpu"``/``"gpu"``, default: the default backend; in
  interpret mode, the TPU kernel unless ``"gpu"``) picks the kernel and its lowering. Returns
  ``[B, T, N, H]`` in q's dtype."""
  t, h = q_BTNH.shape[1], q_BTNH.shape[3]
  b, kh, s = k_BKSH.shape[:3]
  if offset + t > s:
    raise ValueError(f"{t} queries at key slot {offset} need {offset + t} keys, got {s}")
  backend = platform or (None if interpret else jax.default_backend())
  qb, sb, ts = kernel_tiles(s, h, q_BTNH.dtype, query_block, key_block, backend)
  tq = ts if not offset else _round_up(t, qb)  # without an offset q and k share their padding
  q_BTNH = q_BTNH * h**-0.5  # as the reference scales (in q's dtype)
  valid_BKS = valid.astype(jnp.int32)
  valid_BKS = jnp.broadcast_to(valid_BKS[:, None] if valid.ndim == 2 else valid_BKS, (b, kh, s))
  valid_BKS = jnp.pad(valid_BKS, [(0, 0), (0, 0), (0, ts - s)])
  call = _gpu_call if backend == "gpu" else _tpu_call
  return call(q_BTNH, k_BKSH, v_BKSH, valid_BKS, qb, sb, tq, offset, interpret)


def causal_attention(
  q_BTNH: Array,
  k_BKTH: Array,
  v_BKTH: Array,
  valid_BT: Array,
  query_block: int = 256,
  key_block: int = 512,
  window: int | None = None,
  bidirectional_BT: Array | None = None,
  offset: int = 0,
) -> Array:
  """`causal_attention_reference` (same arguments and checks) as `kernels.mode()` says: on TPU/GPU
  `causal_attention_pallas` in its own tiles (the blocks are the reference's), on CPU the
  reference. A sliding ``window`` or bidirectional runs run the reference everywhere (the
  kernels have neither yet). With an ``offset`` (a next turn after a cache) ``valid_BT`` is
  ``[B, S]`` or ``[B, K, S]``. Returns ``[B, T, N, H]``.

  A kernel call cannot be split by XLA: under a mesh the caller runs this shard-locally
  (`jmmkv.sharding.per_head`), else q, k and v are gathered for it."""
  impl = kernels.mode()
  if impl == "reference" or window is not None or bidirectional_BT is not None:
    return causal_attention_reference(
      q_BTNH, k_BKTH, v_BKTH, valid_BT, query_block, key_block, window, bidirectional_BT, offset
    )
  if offset:
    _check_blocks_after(q_BTNH.shape[1], k_BKTH.shape[2], query_block, key_block)
  else:
    _check_blocks(q_BTNH.shape[1], query_block, key_block)
  return causal_attention_pallas(
    q_BTNH, k_BKTH, v_BKTH, valid_BT, offset=offset, interpret=impl == "interpret"
  )
