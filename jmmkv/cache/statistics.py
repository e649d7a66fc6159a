"""The built-in prefill statistics (`jmmkv.cache.stats` says how a statistic is computed):

  WindowSums(w)  "window"   [B, N, T]  sum over the last ``w`` valid queries of their attention to
                                       each key (SnapKV / AdaKV observation window, MadaKV proxies)
  ColumnSums     "colsum"   [B, N, T]  sum over all valid queries (H2O, LOOK-M, MEDA scores)
  RowEntropy     "entropy"  [B, N]     mean over valid queries of the causal row entropy (MEDA code)
  CrossEntropy   "cross"    [B, 2]     MEDA paper: mean row entropy of head-averaged, non-causal
                                       text->visual and visual->text attention (each softmax over
                                       the other modality's keys only)

Entropies use 0 log 0 = 0. Padding is never a query or a key. A policy needing another statistic
defines one beside itself, as these are defined. Dimension key: `jmmkv.typing`.
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp

from jmmkv.cache.stats import (
  Keys,
  Online,
  ProbabilityStatistic,
  QueryStatistic,
  Rows,
  Shape,
  Tile,
)
from jmmkv.kernels import order
from jmmkv.kernels import select as kernel_select
from jmmkv.typing import IMAGE, MASK_VALUE, TEXT, VIDEO, Array


def _window_rows(valid_BT: Array, window: int) -> Array:
  """True for the last ``window`` valid tokens of each row (left or right padding)."""
  from_end = jnp.cumsum(valid_BT[:, ::-1], axis=1)[:, ::-1]  # valid tokens at slots >= t
  return valid_BT & (from_end <= window)


WINDOW_KEY_TILE = 2048  # keys scored at a time by `window_sums`


def window_sums(
  q_BTNH: Array,
  k_BKTH: Array,
  valid_BT: Array,
  window: int,
  key_valid_BKS: Array | None = None,
  offset: int = 0,
) -> Array:
  """``[B, N, T]``: sum over each row's last ``window`` valid queries of their causal attention.

  Only those W queries are scored, over `WINDOW_KEY_TILE` keys at a time in two passes (each
  row's max and sum, then the probabilities), so no ``W x T`` score array or copy of the keys is
  built; this costs little next to the prefill. After a cache (`jmmkv.cache.stats.Past`): the
  keys ``[B, K, S, H]`` are ``offset`` cache slots then the queries' tokens, with per-head
  validity ``key_valid_BKS``; the result is ``[B, N, S]``."""
  b, t, n, h = q_BTNH.shape
  kh, n_keys = k_BKTH.shape[1:3]
  if key_valid_BKS is None:
    key_valid_BKS = valid_BT[:, None, :]  # the queries' own tokens, in every head
  w = min(window, t)
  rows_BW = kernel_select.positions(_window_rows(valid_BT, w), w)  # [B, W] slots, -1: short row
  q_BWNH = jnp.take_along_axis(q_BTNH, jnp.maximum(rows_BW, 0)[:, :, None, None], axis=1)
  q_BKGWH = einops.rearrange(q_BWNH, "B W (K G) H -> B K G W H", K=kh) * h**-0.5
  size = min(n_keys, WINDOW_KEY_TILE)
  full, rest = divmod(n_keys, size)
  key_slot_BW = rows_BW + offset  # each window query's slot among the keys

  def scores(start, width: int):  # [B, K, G, W, S] of keys start .. start + width - 1
    k_BKSH = jax.lax.dynamic_slice_in_dim(k_BKTH, start, width, axis=2)
    s = jnp.einsum("BKGWH,BKSH->BKGWS", q_BKGWH, k_BKSH, preferred_element_type=jnp.float32)
    cols_S = start + jnp.arange(width)
    valid_BKS = jax.lax.dynamic_slice_in_dim(key_valid_BKS, start, width, axis=2)
    seen_BWS = key_slot_BW[:, :, None] >= cols_S[None, None, :]
    mask_BKWS = seen_BWS[:, None] & valid_BKS[:, :, None, :]
    return jnp.where(mask_BKWS[:, :, None], s, MASK_VALUE)

  def max_sum(start, width, carry):  # pass 1: each row's running max and sum
    m_BKGW, l_BKGW = carry
    s = scores(start, width)
    m_new = jnp.maximum(m_BKGW, s.max(axis=-1))
    l_BKGW = l_BKGW * jnp.exp(m_BKGW - m_new) + jnp.exp(s - m_new[..., None]).sum(axis=-1)
    return m_new, l_BKGW

  def add_probs(start, width, carry):  # pass 2: probabilities summed over the window
    sums_BKGT, m_BKGW, w_BKGW = carry
    p = jnp.exp(scores(start, width) - m_BKGW[..., None]) * w_BKGW[..., None]
    return (
      jax.lax.dynamic_update_slice_in_dim(sums_BKGT, p.sum(axis=3), start, axis=3),
      m_BKGW,
      w_BKGW,
    )

  def tiles(step, carry):  # the whole tiles, then the rest
    carry = jax.lax.fori_loop(0, full, lambda j, c: step(j * size, size, c), carry)
    return step(full * size, rest, carry) if rest else carry

  shape = (b, kh, n // kh, w)
  m_BKGW, l_BKGW = tiles(max_sum, (jnp.full(shape, MASK_VALUE), jnp.zeros(shape)))
  w_BKGW = jnp.where((rows_BW >= 0)[:, None, None, :], 1.0 / l_BKGW, 0.0)  # short rows: none
  sums_BKGT = order.after(jnp.zeros((b, kh, n // kh, n_keys), jnp.float32), m_BKGW[0, 0, 0, 0])
  sums_BKGT = tiles(add_probs, (sums_BKGT, m_BKGW, w_BKGW))[0]
  return einops.rearrange(sums_BKGT, "B K G S -> B (K G) S")


@dataclasses.dataclass(frozen=True)
class WindowSums(QueryStatistic):
  """`window_sums` of the last ``window`` valid queries."""

  window: int
  name = "window"
  per_key = True

  def __post_init__(self):
    if self.window < 1:
      raise ValueError(f"window must be >= 1, got {self.window}")

  def compute(self, q_BTNH, k_BKTH, valid_BT, modality_BT) -> Array:
    return window_sums(q_BTNH, k_BKTH, valid_BT, self.window)

  def compute_after(self, q_BTNH, keys: Keys) -> Array:
    return window_sums(q_BTNH, keys.k, keys.query_valid_BT, self.window, keys.valid, keys.offset)


# The most scores one query block of `cross_entropies` holds (each query reads every key of the
# other modality): 4M floats, 16 MiB; blocks shrink (to 8 queries at least) to stay under it.
SCORE_ELEMENTS = 1 << 22


def _query_blocks(q_BQNH, qvalid_BQ, k_BKSH, kvalid_BK1S, block: int):
  """The query blocks of an entropy sum: ``(blocks, scores)``, ``scores(i) -> (s, qv_BQ)`` with
  ``s`` ``[B, K, G, Q, S]`` the scaled scores of block i (`MASK_VALUE` at invalid keys) and
  ``qv_BQ`` its query validity. Blocks shrink (to 8 queries at least) to hold at most
  `SCORE_ELEMENTS` scores; few keys: the whole block."""
  b, nq, n, h = q_BQNH.shape
  kh, n_keys = k_BKSH.shape[1:3]
  block = min(block, nq, max(8, SCORE_ELEMENTS // (b * n * n_keys)))
  pad = -nq % block
  q_BQNH = jnp.pad(q_BQNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qvalid_BQ = jnp.pad(qvalid_BQ, ((0, 0), (0, pad)))

  def scores(i):
    q = jax.lax.dynamic_slice_in_dim(q_BQNH, i * block, block, axis=1)
    qv_BQ = jax.lax.dynamic_slice_in_dim(qvalid_BQ, i * block, block, axis=1)
    q_BKGQH = einops.rearrange(q, "B Q (K G) H -> B K G Q H", K=kh)
    s = jnp.einsum("BKGQH,BKSH->BKGQS", q_BKGQH, k_BKSH, preferred_element_type=jnp.float32)
    return jnp.where(kvalid_BK1S[:, :, None, None, :], s * h**-0.5, MASK_VALUE), qv_BQ

  return q_BQNH.shape[1] // block, scores


def _entropy_sum(q_BQNH, qvalid_BQ, k_BKSH, kvalid_BS, block: int) -> Array:
  """``[B]``: summed over the valid queries, the entropy of the head-averaged softmax of each
  query's (non-causal) scores over the valid keys; 0 for a row without valid keys."""
  b, n = q_BQNH.shape[0], q_BQNH.shape[2]
  blocks, scores = _query_blocks(q_BQNH, qvalid_BQ, k_BKSH, kvalid_BS[:, None], block)
  has_keys_B = kvalid_BS.any(axis=1)

  def step(total_B, i):
    s, qv_BQ = scores(i)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))  # exactly 0 at invalid keys
    z_BKGQ = jnp.einsum("BKGQS,BS->BKGQ", e, kvalid_BS.astype(jnp.float32))
    w_BKGQ = jnp.where(has_keys_B[:, None, None, None], 1.0 / z_BKGQ, 0.0) / n
    pbar_BQS = jnp.einsum("BKGQS,BKGQ->BQS", e, w_BKGQ)  # head-averaged probabilities
    plogp = pbar_BQS * jnp.log(jnp.where(pbar_BQS > 0, pbar_BQS, 1.0))  # 0 log 0 = 0
    ent_BQ = -jnp.einsum("BQS,BS->BQ", plogp, kvalid_BS.astype(jnp.float32))
    return total_B + jnp.einsum("BQ,BQ->B", ent_BQ, qv_BQ.astype(jnp.float32)), None

  total_B, _ = jax.lax.scan(step, jnp.zeros((b,), jnp.float32), jnp.arange(blocks))
  return total_B


def _token_ids(token_BKS: Array, valid_BKS: Array) -> Array:
  """``[B, K*S]``: for each (KV head, slot) of a row, the index of its token among the row's
  distinct valid tokens (``token_BKS``: which token a slot holds; heads may hold it at other
  slots); invalid slots get one past the last."""
  b = token_BKS.shape[0]
  tok_BU = jnp.where(valid_BKS, token_BKS, jnp.iinfo(jnp.int32).max).reshape(b, -1)
  order_BU = jnp.argsort(tok_BU, axis=1, stable=True)
  sorted_BU = jnp.take_along_axis(tok_BU, order_BU, axis=1)
  first_BU = jnp.concatenate(
    [jnp.ones((b, 1), bool), sorted_BU[:, 1:] != sorted_BU[:, :-1]], axis=1
  )
  ids_sorted_BU = jnp.cumsum(first_BU, axis=1) - 1
  rows = jnp.arange(b)[:, None]
  return jnp.zeros_like(tok_BU).at[rows, order_BU].set(ids_sorted_BU.astype(tok_BU.dtype))


def _entropy_sum_by_token(q_BQNH, qvalid_BQ, k_BKSH, kvalid_BKS, token_BKS, block: int) -> Array:
  """`_entropy_sum` when each KV head has its own key slots (a conversation's cache): each
  head's softmax is over its own valid keys, and the head average is taken per token
  (``token_BKS``: the token each slot holds), so a token two heads kept counts once."""
  b, n = q_BQNH.shape[0], q_BQNH.shape[2]
  blocks, scores = _query_blocks(q_BQNH, qvalid_BQ, k_BKSH, kvalid_BKS, block)
  ids_BU = _token_ids(token_BKS, kvalid_BKS)  # U = K * S (head, slot) pairs
  has_keys_BK = kvalid_BKS.any(axis=2)

  def step(total_B, i):
    s, qv_BQ = scores(i)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    e = jnp.where(kvalid_BKS[:, :, None, None, :], e, 0.0)  # a head without keys: all 0
    z_BKGQ = e.sum(-1)
    w_BKGQ = jnp.where(has_keys_BK[:, :, None, None], 1.0 / jnp.where(z_BKGQ > 0, z_BKGQ, 1), 0.0)
    p_BQU = einops.rearrange(jnp.einsum("BKGQS,BKGQ->BKQS", e, w_BKGQ / n), "B K Q S -> B Q (K S)")
    rows, queries = jnp.arange(b)[:, None, None], jnp.arange(s.shape[3])[None, :, None]
    pbar_BQU = jnp.zeros_like(p_BQU).at[rows, queries, ids_BU[:, None, :]].add(p_BQU, mode="drop")
    plogp = pbar_BQU * jnp.log(jnp.where(pbar_BQU > 0, pbar_BQU, 1.0))  # 0 log 0 = 0
    ent_BQ = -plogp.sum(-1)
    return total_B + jnp.einsum("BQ,BQ->B", ent_BQ, qv_BQ.astype(jnp.float32)), None

  total_B, _ = jax.lax.scan(step, jnp.zeros((b,), jnp.float32), jnp.arange(blocks))
  return total_B


def cross_entropies(
  q_BTNH, k_BKTH, is_text_BT, is_vis_BT, n_text: int, n_vis: int, block: int = 128
) -> Array:
  """``[B, 2]``: summed row entropies of the head-averaged, non-causal text->visual attention
  (text queries, softmax over visual keys only) and visual->text attention. Text and visual
  tokens are first compacted (at most ``n_text`` / ``n_vis`` per row), so the cost is
  ``2 n_text n_vis`` scores per head, not ``T^2``."""
  text_BX = kernel_select.positions(is_text_BT, n_text)  # ascending slots, -1 after
  vis_BY = kernel_select.positions(is_vis_BT, n_vis)
  take_q = lambda idx: jnp.take_along_axis(q_BTNH, jnp.maximum(idx, 0)[:, :, None, None], axis=1)
  take_k = lambda idx: jnp.take_along_axis(k_BKTH, jnp.maximum(idx, 0)[:, None, :, None], axis=2)
  tv = _entropy_sum(take_q(text_BX), text_BX >= 0, take_k(vis_BY), vis_BY >= 0, block)
  vt = _entropy_sum(take_q(vis_BY), vis_BY >= 0, take_k(text_BX), text_BX >= 0, block)
  return jnp.stack([tv, vt], axis=-1)


def _modalities(valid_BT, modality_BT):
  """(text, visual) masks ``[B, T]`` of the valid tokens (NumPy or jnp)."""
  is_text = (modality_BT == TEXT) & valid_BT
  return is_text, ((modality_BT == IMAGE) | (modality_BT == VIDEO)) & valid_BT


@dataclasses.dataclass(frozen=True)
class CrossEntropy(QueryStatistic):
  """Mean `cross_entropies` per row (0 for a row without both text and visual tokens).

  ``text`` / ``visual``: static bounds on any row's text / visual token count (0: the prompt
  length), set from the prompt by `for_prompt` (rounded up to ``multiple``, so that few distinct
  shapes compile); the cost is then ``text x visual`` score pairs instead of ``T x T``."""

  text: int = 0
  visual: int = 0
  multiple: int = 128
  block: int = 128
  name = "cross"

  def __post_init__(self):
    if min(self.text, self.visual) < 0 or min(self.multiple, self.block) < 1:
      raise ValueError("text / visual must be >= 0, multiple / block >= 1")

  def for_prompt(self, valid_BT, modality_BT) -> "CrossEntropy":
    t = valid_BT.shape[1]  # never more than the prompt bucket
    up = lambda n: min(t, max(self.multiple, -(-int(n) // self.multiple) * self.multiple))
    text_BT, visual_BT = _modalities(valid_BT, modality_BT)
    most = lambda m: max((int(r.sum()) for r in m), default=0)
    return dataclasses.replace(self, text=up(most(text_BT)), visual=up(most(visual_BT)))

  def compute(self, q_BTNH, k_BKTH, valid_BT, modality_BT) -> Array:
    t = q_BTNH.shape[1]
    is_text, is_vis = _modalities(valid_BT, modality_BT)
    sums_B2 = cross_entropies(
      q_BTNH, k_BKTH, is_text, is_vis, self.text or t, self.visual or t, self.block
    )
    counts_B2 = jnp.stack([is_text.sum(1), is_vis.sum(1)], axis=-1)
    both = (is_text.any(1) & is_vis.any(1))[:, None]
    return jnp.where(both, sums_B2 / jnp.maximum(counts_B2, 1), 0.0)

  def compute_after(self, q_BTNH, keys: Keys) -> Array:
    """The new turn's text queries over the visual keys (of the cache and the turn), and its
    visual queries over the text keys; a direction without queries or keys is 0."""
    t = q_BTNH.shape[1]
    q_text, q_vis = _modalities(keys.query_valid_BT, keys.query_modality_BT)
    k_text, k_vis = _modalities(keys.valid, keys.modality)
    out = []
    for rows_BT, keys_BKS in ((q_text, k_vis), (q_vis, k_text)):
      idx_BX = kernel_select.positions(rows_BT, t)
      q_BXNH = jnp.take_along_axis(q_BTNH, jnp.maximum(idx_BX, 0)[:, :, None, None], axis=1)
      total_B = _entropy_sum_by_token(
        q_BXNH, idx_BX >= 0, keys.k, keys_BKS, keys.positions, self.block
      )
      count_B = rows_BT.sum(1)
      has_B = rows_BT.any(1) & keys_BKS.any((1, 2))
      out.append(jnp.where(has_B, total_B / jnp.maximum(count_B, 1), 0.0))
    return jnp.stack(out, axis=-1)


@dataclasses.dataclass(frozen=True)
class ColumnSums(ProbabilityStatistic):
  """Per head, each key's attention summed over all valid queries ``[B, N, T]``."""

  name = "colsum"
  per_key = True

  def init(self, shape: Shape):
    return jnp.zeros((shape.b, shape.kh * shape.g, shape.t), jnp.float32)

  def tile(self, colsum_BNT, tile: Tile):
    p_BKGS = jnp.einsum("BKGQS,BKGQ->BKGS", tile.e, tile.w)
    at = tile.j * tile.e.shape[-1]
    old_BNS = jax.lax.dynamic_slice_in_dim(colsum_BNT, at, tile.e.shape[-1], axis=2)
    new_BNS = old_BNS + einops.rearrange(p_BKGS, "B K G S -> B (K G) S")
    return jax.lax.dynamic_update_slice_in_dim(colsum_BNT, new_BNS, at, axis=2)

  def finish(self, colsum_BNT, valid_BT) -> Array:
    return colsum_BNT[..., : valid_BT.shape[1]]

  def finish_after(self, colsum_BNS, keys: Keys) -> Array:
    return colsum_BNS[..., : keys.slots]  # the cache's slots, then the new tokens


@dataclasses.dataclass(frozen=True)
class RowEntropy(ProbabilityStatistic):
  """Per head, the mean over valid queries of the entropy of their causal attention ``[B, N]``:
  ``log l + m - sum_s p s`` per row, from the exact pass's max ``m``, sum ``l`` and ``e s``."""

  name = "entropy"

  def init(self, shape: Shape):
    return (
      jnp.zeros((shape.b, shape.kh * shape.g), jnp.float32),
      jnp.zeros((shape.b, shape.kh, shape.g, shape.block), jnp.float32),  # sum_s e s, this block
    )

  def online(self, acc, tile: Online):
    total_BN, es_BKGQ = acc  # sum_s e s, relative to the running max like the output
    return total_BN, es_BKGQ * tile.a + jnp.einsum("BKGQS,BKGQS->BKGQ", tile.e, tile.s)

  def block(self, acc, rows: Rows):
    total_BN, es_BKGQ = acc
    ent_BKGQ = jnp.where(rows.l > 0, rows.m + jnp.log(rows.l) - es_BKGQ * rows.inv, 0.0)
    ent_BN = einops.rearrange(jnp.einsum("BKGQ,BQ->BKG", ent_BKGQ, rows.qv), "B K G -> B (K G)")
    return total_BN + ent_BN, jnp.zeros_like(es_BKGQ)

  def finish(self, acc, valid_BT) -> Array:
    return acc[0] / jnp.maximum(valid_BT.sum(1), 1)[:, None]

  def finish_after(self, acc, keys: Keys) -> Array:
    return self.finish(acc, keys.query_valid_BT)  # the mean over the new turn's queries
