"""Prefill attention over query blocks, with the statistics policies ask for, in float32.

The causal mask hides half of the T x T pairs, and neither path below scores them. A prefill
whose statistics need no normalised probability of every query (SnapKV's window sums are
computed apart, from the last queries only) runs flash-style attention over key tiles
(`jmmkv.kernels.flash_attention`). Column sums and row entropies need each row's
probabilities: then each block of ``block`` queries attends to the keys up to the end of its
group of blocks (`_segments`) with exact softmax rows. Nothing of size T x T is ever built: extra
memory is O(B * N * block * T). Statistics, when requested by a
`StatsSpec`, accumulate over the valid query rows of every block:

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

from jmmkv.kernels import select as kernel_select
from jmmkv.kernels.flash_attention import causal_attention
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


def _segments(n_blocks: int, most: int) -> list[tuple[int, int]]:
  """``most`` (or fewer) runs of consecutive query blocks, as (first, end) block indices: the
  queries of a run attend to the keys of blocks ``[0, end)`` only, as the causal mask hides the
  rest. With s runs the prefill scores ``(s + 1) / 2s`` of the ``T x T`` pairs (0.5625 for 8)."""
  s = max(1, min(most, n_blocks))
  ends = [-(-(i + 1) * n_blocks // s) for i in range(s)]
  return [(0 if i == 0 else ends[i - 1], e) for i, e in enumerate(ends)]


def _run(q_BTNH, k_BKSH, v_BKSH, valid_BT, first: int, end: int, block: int, spec: StatsSpec):
  """Causal attention of query blocks ``[first, end)`` to the ``S`` keys before them (``S =
  end * block``): outputs ``[B, (end - first) * block, N, H]`` and the column sums ``[B, N, S]``
  / summed row entropies ``[B, N]`` of those queries (as ``spec`` asks; else None)."""
  b, _, n, h = q_BTNH.shape
  kh, s_len = k_BKSH.shape[1], k_BKSH.shape[2]
  scale = h**-0.5
  slots = jnp.arange(s_len)
  kvalid_BS = valid_BT[:, :s_len]

  def step(carry, i):
    start = i * block
    q_BQNH = jax.lax.dynamic_slice_in_dim(q_BTNH, start, block, axis=1)
    rows_Q = start + jnp.arange(block)
    qv_BQ = jax.lax.dynamic_slice_in_dim(valid_BT, start, block, axis=1)
    q_BKGQH = einops.rearrange(q_BQNH, "B Q (K G) H -> B K G Q H", K=kh)
    raw = jnp.einsum("BKGQH,BKSH->BKGQS", q_BKGQH, k_BKSH, preferred_element_type=jnp.float32)
    raw = raw * scale
    mask_BQS = (rows_Q[:, None] >= slots[None, :])[None] & kvalid_BS[:, None, :]
    s = jnp.where(mask_BQS[:, None, None], raw, MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    inv_BKGQ = 1.0 / l[..., 0]  # p = e / l is never built: every use of p is an einsum of e
    o_BKGQH = jnp.einsum("BKGQS,BKSH->BKGQH", e.astype(v_BKSH.dtype), v_BKSH)
    o_BKGQH = o_BKGQH * inv_BKGQ[..., None].astype(o_BKGQH.dtype)
    out = einops.rearrange(o_BKGQH, "B K G Q H -> B Q (K G) H")
    new = dict(carry)
    # XLA CPU: einsums run as fast matmuls; reductions of a materialised S-wide array re-read it
    # from memory, and fused multiply-reduce (sum(p * x)) is slower still. So every statistic
    # below is an einsum of e (the column sum costs ~5% of the block instead of ~40%).
    if spec.colsum:  # padding queries weigh 0 (their outputs are never used)
      w_BKGQ = jnp.where(qv_BQ[:, None, None, :], inv_BKGQ, 0.0)
      cs = jnp.einsum("BKGQS,BKGQ->BKGS", e, w_BKGQ)
      new["colsum"] = carry["colsum"] + einops.rearrange(cs, "B K G S -> B (K G) S")
    if spec.entropy:  # row entropy = lse - sum_s p s (no log of every p)
      ps = jnp.einsum("BKGQS,BKGQS->BKGQ", e, s) * inv_BKGQ
      ent_BKGQ = m[..., 0] + jnp.log(l[..., 0]) - ps
      ent_BN = einops.rearrange(
        jnp.einsum("BKGQ,BQ->BKG", ent_BKGQ, qv_BQ.astype(jnp.float32)), "B K G -> B (K G)"
      )
      new["entropy"] = carry["entropy"] + ent_BN
    return new, out

  carry = {}
  if spec.colsum:
    carry["colsum"] = jnp.zeros((b, n, s_len), jnp.float32)
  if spec.entropy:
    carry["entropy"] = jnp.zeros((b, n), jnp.float32)
  carry, out_CBQNH = jax.lax.scan(step, carry, jnp.arange(first, end))
  return einops.rearrange(out_CBQNH, "C B Q N H -> B (C Q) N H"), carry


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
    return causal_attention(q_BTNH, k_BKTH, v_BKTH, valid_BT, t, t)
  padded = _pad_tokens(-t % FLASH_KEY_BLOCK, q_BTNH, k_BKTH, v_BKTH, valid_BT)
  return causal_attention(*padded, FLASH_QUERY_BLOCK, FLASH_KEY_BLOCK)[:, :t]


def attention(
  q_BTNH: Array,
  k_BKTH: Array,
  v_BKTH: Array,
  valid_BT: Array,
  modality_BT: Array,
  spec: StatsSpec = NONE,
  block: int = 128,
  segments: int = 8,
) -> tuple[Array, Stats]:
  """Causal GQA attention of the prompt (keys at slots <= the query's slot, padding masked).

  Without column sums or row entropies (``spec``), the attention is flash style
  (`jmmkv.kernels.flash_attention`). With them, query blocks run in up to ``segments`` consecutive
  groups, each scoring only the keys up to its last block (`_segments`), with exact softmax rows
  whose normalised probabilities the statistics sum; the masked pairs are not computed.
  Returns the output ``[B, T, N, H]`` and the requested `Stats` (others None).
  """
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

  outs, carry = [], {}
  if not (spec.colsum or spec.entropy):  # no statistic of every query: flash attention
    outs.append(_flash(q_BTNH, k_BKTH, v_BKTH, valid_BT))
  else:
    for first, end in _segments(t // block, segments):
      keys = end * block
      out, part = _run(
        q_BTNH, k_BKTH[:, :, :keys], v_BKTH[:, :, :keys], valid_BT, first, end, block, spec
      )
      outs.append(out)
      for name, x in part.items():  # column sums: the keys after this run's got nothing from it
        x = jnp.pad(x, ((0, 0), (0, 0), (0, t - keys))) if name == "colsum" else x
        carry[name] = carry[name] + x if name in carry else x
  out_BTNH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
  if "entropy" in carry:
    carry["entropy"] = carry["entropy"] / jnp.maximum(valid_BT.sum(1), 1)[:, None]
  if spec.cross:
    carry["cross"] = cross_entropies(
      q_BTNH, k_BKTH, is_text, is_vis, spec.cross_text or t, spec.cross_visual or t, block
    )
    counts = jnp.stack([is_text.sum(1), is_vis.sum(1)], axis=-1)
    both = (is_text.any(1) & is_vis.any(1))[:, None]
    carry["cross"] = jnp.where(both, carry["cross"] / jnp.maximum(counts, 1), 0.0)
  if spec.window:
    carry["window"] = window_sums(q_BTNH, k_BKTH, valid_BT, spec.window)
  if pad:
    out_BTNH = out_BTNH[:, :t_in]
    carry = {k: v[..., :t_in] if v.ndim == 3 else v for k, v in carry.items()}
  return out_BTNH, Stats(**carry)
