"""Prefill attention over query blocks, with the statistics policies ask for, in float32.

The causal mask hides half of the T x T pairs, and neither path below scores them. A prefill
whose statistics need no normalised probability of every query (SnapKV's window sums are
computed apart, from the last queries only) runs flash-style attention over key tiles
(`jmmkv.kernels.flash_attention`). Column sums and row entropies need each row's exact
probabilities: then each query block's scores over the same tiles go to a buffer of ``block x
T`` per head, reused by every block, with the rows' max and sum, and a second pass over it gives
the output and the statistics (`_exact`). Nothing of size T x T is ever built, no key range is
copied, and the output overwrites the queries. Statistics, when requested by a `StatsSpec`,
accumulate over the valid query rows of every block:

  window   [B, N, T]  sum over the last ``window`` valid queries of their attention to each key
                      (SnapKV / AdaKV observation window, MadaKV proxy tokens)
  colsum   [B, N, T]  sum over all valid queries (H2O, LOOK-M, MEDA scores)
  entropy  [B, N]     mean over valid queries of the causal row entropy, per head (MEDA code)
  cross    [B, 2]     MEDA paper: mean row entropy of head-averaged, non-causal text->visual and
                      visual->text attention (each softmax over the other modality's keys only)

Entropies use 0 log 0 = 0. Padding is never a query or a key. Dimension key: `jmmkv.typing`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp

from jmmkv.kernels import order
from jmmkv.kernels import select as kernel_select
from jmmkv.kernels import flash_attention
from jmmkv.typing import IMAGE, MASK_VALUE, TEXT, VIDEO, Array


@dataclasses.dataclass(frozen=True)
class StatsSpec:
  """Which prefill statistics to compute (static under jit); the default computes none."""

  window: int = 0
  colsum: bool = False
  entropy: bool = False
  cross: bool = False
  # Static upper bounds on any row's text / visual token count (0: the prompt length). The
  # cross-modal entropies then cost n_text x n_visual score pairs instead of T x T.
  cross_text: int = 0
  cross_visual: int = 0

  def __post_init__(self):
    if self.window < 0:
      raise ValueError(f"window must be >= 0, got {self.window}")
    if self.cross_text < 0 or self.cross_visual < 0:
      raise ValueError("cross_text / cross_visual must be >= 0")

  def __or__(self, other: "StatsSpec") -> "StatsSpec":
    return StatsSpec(
      max(self.window, other.window),
      self.colsum or other.colsum,
      self.entropy or other.entropy,
      self.cross or other.cross,
      max(self.cross_text, other.cross_text),
      max(self.cross_visual, other.cross_visual),
    )

  def with_cross_bounds(self, text_BT, visual_BT, multiple: int = 128) -> "StatsSpec":
    """This spec with `cross_text` / `cross_visual` set from host masks ``[B, T]``, rounded up
    to ``multiple`` (fewer distinct compilations)."""
    if not self.cross:
      return self
    t = text_BT.shape[1]  # never more than the prompt bucket
    up = lambda n: min(t, max(multiple, -(-int(n) // multiple) * multiple))
    n_text = max((int(r.sum()) for r in text_BT), default=0)
    n_vis = max((int(r.sum()) for r in visual_BT), default=0)
    return dataclasses.replace(self, cross_text=up(n_text), cross_visual=up(n_vis))


NONE = StatsSpec()


class Stats(NamedTuple):
  window: Array | None = None  # [B, N, T] (stacked over layers by the decoder: [L, B, N, T])
  colsum: Array | None = None  # [B, N, T]
  entropy: Array | None = None  # [B, N]
  cross: Array | None = None  # [B, 2]: (text->visual, visual->text)


def _window_rows(valid_BT: Array, window: int) -> Array:
  """True for the last ``window`` valid tokens of each row (left or right padding)."""
  from_end = jnp.cumsum(valid_BT[:, ::-1], axis=1)[:, ::-1]  # valid tokens at slots >= t
  return valid_BT & (from_end <= window)


def window_sums(q_BTNH: Array, k_BKTH: Array, valid_BT: Array, window: int) -> Array:
  """``[B, N, T]``: sum over each row's last ``window`` valid queries of their causal attention.

  Only those W queries are scored (W x T per head), so this costs little next to the prefill.
  """
  b, t, n, h = q_BTNH.shape
  kh = k_BKTH.shape[1]
  w = min(window, t)
  rows_BW = kernel_select.positions(_window_rows(valid_BT, w), w)  # [B, W] slots, -1: short row
  q_BWNH = jnp.take_along_axis(q_BTNH, jnp.maximum(rows_BW, 0)[:, :, None, None], axis=1)
  q_BKGWH = einops.rearrange(q_BWNH, "B W (K G) H -> B K G W H", K=kh)
  s = jnp.einsum("BKGWH,BKSH->BKGWS", q_BKGWH, k_BKTH, preferred_element_type=jnp.float32) * h**-0.5
  mask_BWS = (rows_BW[:, :, None] >= jnp.arange(t)[None, None, :]) & valid_BT[:, None, :]
  p = jax.nn.softmax(jnp.where(mask_BWS[:, None, None], s, MASK_VALUE), axis=-1)
  p = jnp.where((rows_BW >= 0)[:, None, None, :, None], p, 0.0)
  return einops.rearrange(p.sum(axis=3), "B K G S -> B (K G) S")


def _entropy_sum(q_BQNH, qvalid_BQ, k_BKSH, kvalid_BS, block: int) -> Array:
  """``[B]``: summed over the valid queries, the entropy of the head-averaged softmax of each
  query's (non-causal) scores over the valid keys; 0 for a row without valid keys."""
  b, nq, n, h = q_BQNH.shape
  kh = k_BKSH.shape[1]
  block = min(block, nq)
  pad = -nq % block
  q_BQNH = jnp.pad(q_BQNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qvalid_BQ = jnp.pad(qvalid_BQ, ((0, 0), (0, pad)))
  has_keys_B = kvalid_BS.any(axis=1)

  def step(total_B, i):
    q = jax.lax.dynamic_slice_in_dim(q_BQNH, i * block, block, axis=1)
    qv_BQ = jax.lax.dynamic_slice_in_dim(qvalid_BQ, i * block, block, axis=1)
    q_BKGQH = einops.rearrange(q, "B Q (K G) H -> B K G Q H", K=kh)
    s = jnp.einsum("BKGQH,BKSH->BKGQS", q_BKGQH, k_BKSH, preferred_element_type=jnp.float32)
    s = jnp.where(kvalid_BS[:, None, None, None, :], s * h**-0.5, MASK_VALUE)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))  # exactly 0 at invalid keys
    z_BKGQ = jnp.einsum("BKGQS,BS->BKGQ", e, kvalid_BS.astype(jnp.float32))
    w_BKGQ = jnp.where(has_keys_B[:, None, None, None], 1.0 / z_BKGQ, 0.0) / n
    pbar_BQS = jnp.einsum("BKGQS,BKGQ->BQS", e, w_BKGQ)  # head-averaged probabilities
    plogp = pbar_BQS * jnp.log(jnp.where(pbar_BQS > 0, pbar_BQS, 1.0))  # 0 log 0 = 0
    ent_BQ = -jnp.einsum("BQS,BS->BQ", plogp, kvalid_BS.astype(jnp.float32))
    return total_B + jnp.einsum("BQ,BQ->B", ent_BQ, qv_BQ.astype(jnp.float32)), None

  total_B, _ = jax.lax.scan(
    step, jnp.zeros((b,), jnp.float32), jnp.arange(q_BQNH.shape[1] // block)
  )
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


def _exact(q_BTNH, k_BKTH, v_BKTH, valid_BT, block: int, key_block: int, spec: StatsSpec):
  """Causal attention with exact softmax rows for the statistics. Each block of ``block``
  queries reads only the ``key_block``-key tiles at or before its last query (``T`` a multiple
  of ``key_block``, itself of ``block``) and scores each pair once:

  1. the tiles' scores go into one ``[B, K, G, block, T]`` buffer (reused by every block; only
     the tiles a block reads are written), with each row's running max and sum (online);
  2. a pass over the same tiles computes ``e = exp(s - max)``: the output ``e v / sum``, the
     column sums of the valid queries' exact probabilities ``e / sum`` and, for the entropy,
     ``sum_s e s``.

  The output overwrites the queries block by block (no output buffer); no key range is sliced
  or copied. Returns the output ``[B, T, N, H]`` and ``{"colsum": [B, N, T], "entropy": [B, N]
  (summed over valid queries)}`` as ``spec`` asks."""
  b, t, n, h = q_BTNH.shape
  kh = k_BKTH.shape[1]
  g = n // kh
  scale = h**-0.5
  tile = lambda x, j, axis: jax.lax.dynamic_slice_in_dim(x, j * key_block, key_block, axis)
  put = lambda x, y, j: jax.lax.dynamic_update_slice_in_dim(x, y, j * key_block, axis=4)

  def block_step(state, i):
    buf_BTNH, s_BKGQT, stats_ = state
    q_BQNH = jax.lax.dynamic_slice_in_dim(buf_BTNH, i * block, block, axis=1)
    q_BKGQH = einops.rearrange(q_BQNH, "B Q (K G) H -> B K G Q H", K=kh)
    rows_Q = i * block + jnp.arange(block)
    tiles = (i * block + block + key_block - 1) // key_block
    qv_BQ = jax.lax.dynamic_slice_in_dim(valid_BT, i * block, block, axis=1).astype(jnp.float32)

    def score_tile(j, carry):  # 1
      s_BKGQT, m_BKGQ, l_BKGQ = carry
      s = flash_attention.tile_scores(q_BKGQH * scale, k_BKTH, valid_BT, rows_Q, j, key_block)
      m_new = jnp.maximum(m_BKGQ, jnp.max(s, axis=-1))
      l_BKGQ = l_BKGQ * jnp.exp(m_BKGQ - m_new) + jnp.sum(jnp.exp(s - m_new[..., None]), axis=-1)
      return put(s_BKGQT, s, j), m_new, l_BKGQ

    zeros = jnp.zeros((b, kh, g, block), jnp.float32)
    m0 = jnp.full((b, kh, g, block), MASK_VALUE, jnp.float32)
    s_BKGQT, m_BKGQ, l_BKGQ = jax.lax.fori_loop(0, tiles, score_tile, (s_BKGQT, m0, zeros))
    inv_BKGQ = 1.0 / l_BKGQ
    w_BKGQ = inv_BKGQ * qv_BQ[:, None, None, :]  # padding queries weigh 0

    def prob_tile(j, carry):  # 2
      o_BKGQH, es_BKGQ, colsum_BNT = carry
      s = tile(s_BKGQT, j, 4)
      e = jnp.exp(s - m_BKGQ[..., None])
      o_BKGQH = o_BKGQH + jnp.einsum(
        "BKGQS,BKSH->BKGQH",
        e.astype(v_BKTH.dtype),
        tile(v_BKTH, j, 2),
        preferred_element_type=jnp.float32,
      )
      if spec.entropy:
        es_BKGQ = es_BKGQ + jnp.einsum("BKGQS,BKGQS->BKGQ", e, s)
      if spec.colsum:
        cs = einops.rearrange(jnp.einsum("BKGQS,BKGQ->BKGS", e, w_BKGQ), "B K G S -> B (K G) S")
        at = j * key_block
        old = jax.lax.dynamic_slice_in_dim(colsum_BNT, at, key_block, axis=2)
        colsum_BNT = jax.lax.dynamic_update_slice_in_dim(colsum_BNT, old + cs, at, axis=2)
      return o_BKGQH, es_BKGQ, colsum_BNT

    colsum0 = stats_.get("colsum", jnp.zeros((b, n, key_block), jnp.float32))
    init = (jnp.zeros((b, kh, g, block, h), jnp.float32), zeros, colsum0)
    o_BKGQH, es_BKGQ, colsum_BNT = jax.lax.fori_loop(0, tiles, prob_tile, init)
    stats_ = dict(stats_)
    if spec.colsum:
      stats_["colsum"] = colsum_BNT
    if spec.entropy:  # row entropy = log l + m - sum_s p s, summed over the valid queries
      ent_BKGQ = m_BKGQ + jnp.log(l_BKGQ) - es_BKGQ * inv_BKGQ
      ent_BN = einops.rearrange(jnp.einsum("BKGQ,BQ->BKG", ent_BKGQ, qv_BQ), "B K G -> B (K G)")
      stats_["entropy"] = stats_["entropy"] + ent_BN
    o_BQNH = einops.rearrange(o_BKGQH * inv_BKGQ[..., None], "B K G Q H -> B Q (K G) H")
    buf_BTNH = jax.lax.dynamic_update_slice_in_dim(
      buf_BTNH, o_BQNH.astype(buf_BTNH.dtype), i * block, axis=1
    )
    return (buf_BTNH, s_BKGQT, stats_), None

  init = {}
  if spec.colsum:
    init["colsum"] = jnp.zeros((b, n, t), jnp.float32)
  if spec.entropy:
    init["entropy"] = jnp.zeros((b, n), jnp.float32)
  # Made from this layer's queries, so that XLA allocates it when the layer runs.
  scores_BKGQT = order.after(jnp.zeros((b, kh, g, block, t), jnp.float32), q_BTNH[0, 0, 0, 0])
  state = (q_BTNH, scores_BKGQT, init)
  (out_BTNH, _, stats_), _ = jax.lax.scan(block_step, state, jnp.arange(t // block))
  return out_BTNH, stats_


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


def _flash(q_BTNH, k_BKTH, v_BKTH, valid_BT) -> Array:
  """`flash_attention.causal_attention` of any T: one tile up to `FLASH_KEY_BLOCK` keys, else padded
  to whole key tiles (padding is never a key; its rows are cut off)."""
  t = q_BTNH.shape[1]
  if t <= FLASH_KEY_BLOCK:
    return flash_attention.causal_attention(q_BTNH, k_BKTH, v_BKTH, valid_BT, t, t)
  padded = _pad_tokens(-t % FLASH_KEY_BLOCK, q_BTNH, k_BKTH, v_BKTH, valid_BT)
  return flash_attention.causal_attention(*padded, FLASH_QUERY_BLOCK, FLASH_KEY_BLOCK)[:, :t]


def attention(
  q_BTNH: Array,
  k_BKTH: Array,
  v_BKTH: Array,
  valid_BT: Array,
  modality_BT: Array,
  spec: StatsSpec = NONE,
  block: int = 128,
  key_block: int = 512,
) -> tuple[Array, Stats]:
  """Causal GQA attention of the prompt (keys at slots <= the query's slot, padding masked).

  Without column sums or row entropies (``spec``), the attention is flash style
  (`jmmkv.kernels.flash_attention`). With them, blocks of ``block`` queries read the
  ``key_block``-key tiles at or before them, their scores kept in a buffer for a second pass
  over the exact probabilities the statistics sum (`_exact`). The masked pairs are never
  computed.
  Returns the output ``[B, T, N, H]`` and the requested `Stats` (others None).
  """
  if key_block % block:
    raise ValueError(f"key_block {key_block} must be a multiple of block {block}")
  t_in = q_BTNH.shape[1]
  pad = -t_in % min(block, t_in)
  if pad:  # whole blocks
    q_BTNH, k_BKTH, v_BKTH, valid_BT, modality_BT = _pad_tokens(
      pad, q_BTNH, k_BKTH, v_BKTH, valid_BT, modality_BT
    )
  b, t, n, h = q_BTNH.shape
  block = min(block, t)
  is_text = (modality_BT == TEXT) & valid_BT
  is_vis = ((modality_BT == IMAGE) | (modality_BT == VIDEO)) & valid_BT

  carry = {}  # statistics that read the queries first: the attention then overwrites them
  if spec.cross:
    carry["cross"] = cross_entropies(
      q_BTNH, k_BKTH, is_text, is_vis, spec.cross_text or t, spec.cross_visual or t, block
    )
    counts = jnp.stack([is_text.sum(1), is_vis.sum(1)], axis=-1)
    both = (is_text.any(1) & is_vis.any(1))[:, None]
    carry["cross"] = jnp.where(both, carry["cross"] / jnp.maximum(counts, 1), 0.0)
  if spec.window:
    carry["window"] = window_sums(q_BTNH, k_BKTH, valid_BT, spec.window)
  q_BTNH = order.after(q_BTNH, *carry.values())  # those first: their temporaries die here
  if not (spec.colsum or spec.entropy):  # no statistic of every query: flash attention
    out_BTNH = _flash(q_BTNH, k_BKTH, v_BKTH, valid_BT)
  else:  # exact probabilities: two passes over key tiles (`_exact`)
    key_block = t if t <= key_block else key_block
    extra = -t % key_block
    padded = _pad_tokens(extra, q_BTNH, k_BKTH, v_BKTH, valid_BT)
    out_BTNH, part = _exact(*padded, block, key_block, spec)
    out_BTNH = out_BTNH[:, :t]
    for name, x in part.items():
      carry[name] = x[..., :t] if name == "colsum" else x
  if "entropy" in carry:
    carry["entropy"] = carry["entropy"] / jnp.maximum(valid_BT.sum(1), 1)[:, None]
  if pad:
    out_BTNH = out_BTNH[:, :t_in]
    carry = {k: v[..., :t_in] if v.ndim == 3 else v for k, v in carry.items()}
  return out_BTNH, Stats(**carry)
