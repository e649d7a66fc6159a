"""Prefill attention over query blocks, with the statistics policies ask for, in float32.

Each block of ``block`` queries attends to all T keys (exact softmax rows), so nothing of size
T x T is ever built: extra memory is O(B * N * block * T). Statistics, when requested by a
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

from jmmkv.models.attention import MASK_VALUE
from jmmkv.typing import IMAGE, TEXT, VIDEO, Array


@dataclasses.dataclass(frozen=True)
class StatsSpec:
  """Which prefill statistics to compute (static under jit); the default computes none."""

  window: int = 0
  colsum: bool = False
  entropy: bool = False
  cross: bool = False

  def __post_init__(self):
    if self.window < 0:
      raise ValueError(f"window must be >= 0, got {self.window}")

  def __or__(self, other: "StatsSpec") -> "StatsSpec":
    return StatsSpec(
      max(self.window, other.window),
      self.colsum or other.colsum,
      self.entropy or other.entropy,
      self.cross or other.cross,
    )


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
  rows_BW = _last_valid_slots(valid_BT, w)  # [B, W] slots, -1 where the row is shorter
  q_BWNH = jnp.take_along_axis(q_BTNH, jnp.maximum(rows_BW, 0)[:, :, None, None], axis=1)
  q_BKGWH = einops.rearrange(q_BWNH, "B W (K G) H -> B K G W H", K=kh)
  s = jnp.einsum("BKGWH,BKSH->BKGWS", q_BKGWH, k_BKTH, preferred_element_type=jnp.float32) * h**-0.5
  mask_BWS = (rows_BW[:, :, None] >= jnp.arange(t)[None, None, :]) & valid_BT[:, None, :]
  p = jax.nn.softmax(jnp.where(mask_BWS[:, None, None], s, MASK_VALUE), axis=-1)
  p = jnp.where((rows_BW >= 0)[:, None, None, :, None], p, 0.0)
  return einops.rearrange(p.sum(axis=3), "B K G S -> B (K G) S")


def _last_valid_slots(valid_BT: Array, w: int) -> Array:
  """``[B, w]``: the slots of each row's last w valid tokens (ascending), -1 for missing ones."""
  t = valid_BT.shape[1]
  in_window = _window_rows(valid_BT, w)
  slots = jnp.where(in_window, jnp.arange(t)[None], t)
  first = jnp.sort(slots, axis=1)[:, :w]
  return jnp.where(first >= t, -1, first)


def _cross_block(raw_BKGQS, text_BQ, vis_BQ, text_BS, vis_BS) -> Array:
  """``[B, 2]``: summed entropies of the head-averaged, non-causal text->visual rows (text
  queries, softmax over visual keys) and visual->text rows. One exp pass: each key is shifted by
  its own modality's row max, so both softmaxes come out of the same exponentials."""
  s = einops.rearrange(raw_BKGQS, "B K G Q S -> B (K G) Q S")
  n = s.shape[1]
  vis_key, text_key = vis_BS[:, None, None, :], text_BS[:, None, None, :]
  m_vis = jnp.max(jnp.where(vis_key, s, MASK_VALUE), axis=-1)  # [B, N, Q]
  m_text = jnp.max(jnp.where(text_key, s, MASK_VALUE), axis=-1)
  e = jnp.exp(s - jnp.where(vis_key, m_vis[..., None], m_text[..., None]))
  e = jnp.where(vis_key | text_key, e, 0.0)
  z_vis = jnp.einsum("BNQS,BS->BNQ", e, vis_BS.astype(jnp.float32))
  z_text = jnp.einsum("BNQS,BS->BNQ", e, text_BS.astype(jnp.float32))
  inv = lambda z: jnp.where(z > 0, 1.0 / jnp.where(z > 0, z, 1.0), 0.0) / n
  # Head-averaged probabilities: visual columns hold text->visual rows, text columns the reverse.
  pbar_vis = jnp.einsum("BNQS,BNQ->BQS", e, inv(z_vis))
  pbar_text = jnp.einsum("BNQS,BNQ->BQS", e, inv(z_text))
  pbar = jnp.where(vis_BS[:, None, :], pbar_vis, jnp.where(text_BS[:, None, :], pbar_text, 0.0))
  plogp = pbar * jnp.log(jnp.where(pbar > 0, pbar, 1.0))  # 0 log 0 = 0
  ent_tv = -jnp.einsum("BQS,BS->BQ", plogp, vis_BS.astype(jnp.float32))
  ent_vt = -jnp.einsum("BQS,BS->BQ", plogp, text_BS.astype(jnp.float32))
  f32 = lambda x: x.astype(jnp.float32)
  return jnp.stack(
    [jnp.einsum("BQ,BQ->B", ent_tv, f32(text_BQ)), jnp.einsum("BQ,BQ->B", ent_vt, f32(vis_BQ))], -1
  )


def attention(
  q_BTNH: Array,
  k_BKTH: Array,
  v_BKTH: Array,
  valid_BT: Array,
  modality_BT: Array,
  spec: StatsSpec = NONE,
  block: int = 128,
) -> tuple[Array, Stats]:
  """Causal GQA attention of the prompt (keys at slots <= the query's slot, padding masked).

  Returns the output ``[B, T, N, H]`` and the requested `Stats` (others None).
  """
  t_in = q_BTNH.shape[1]
  pad = -t_in % min(block, t_in)
  if pad:  # pad to whole blocks with invalid tokens; they are neither queries nor keys
    widths = lambda x, axis: [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)]
    q_BTNH, valid_BT, modality_BT = (
      jnp.pad(x, widths(x, 1)) for x in (q_BTNH, valid_BT, modality_BT)
    )
    k_BKTH, v_BKTH = (jnp.pad(x, widths(x, 2)) for x in (k_BKTH, v_BKTH))
  b, t, n, h = q_BTNH.shape
  kh = k_BKTH.shape[1]
  block = min(block, t)
  scale = h**-0.5
  slots = jnp.arange(t)
  is_text = (modality_BT == TEXT) & valid_BT
  is_vis = ((modality_BT == IMAGE) | (modality_BT == VIDEO)) & valid_BT

  def step(carry, i):
    start = i * block
    q_BQNH = jax.lax.dynamic_slice_in_dim(q_BTNH, start, block, axis=1)
    rows_Q = start + jnp.arange(block)
    take = lambda x_BT: jax.lax.dynamic_slice_in_dim(x_BT, start, block, axis=1)
    q_BKGQH = einops.rearrange(q_BQNH, "B Q (K G) H -> B K G Q H", K=kh)
    raw = jnp.einsum("BKGQH,BKSH->BKGQS", q_BKGQH, k_BKTH, preferred_element_type=jnp.float32)
    raw = raw * scale
    mask_BQS = (rows_Q[:, None] >= slots[None, :])[None] & valid_BT[:, None, :]
    s = jnp.where(mask_BQS[:, None, None], raw, MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    inv_BKGQ = 1.0 / l[..., 0]  # p = e / l is never built: every use of p is an einsum of e
    qv_BQ = take(valid_BT)
    o_BKGQH = jnp.einsum("BKGQS,BKSH->BKGQH", e.astype(v_BKTH.dtype), v_BKTH)
    o_BKGQH = o_BKGQH * inv_BKGQ[..., None].astype(o_BKGQH.dtype)
    out = einops.rearrange(o_BKGQH, "B K G Q H -> B Q (K G) H")
    new = dict(carry)
    # XLA CPU: einsums run as fast matmuls; reductions of a materialised T-wide array re-read it
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
    if spec.cross:
      new["cross"] = carry["cross"] + _cross_block(
        raw, take(is_text), take(is_vis), is_text, is_vis
      )
    return new, out

  zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
  carry = {}
  if spec.colsum:
    carry["colsum"] = zeros(b, n, t)
  if spec.entropy:
    carry["entropy"] = zeros(b, n)
  if spec.cross:
    carry["cross"] = zeros(b, 2)
  carry, out_CBQNH = jax.lax.scan(step, carry, jnp.arange(t // block))
  out_BTNH = einops.rearrange(out_CBQNH, "C B Q N H -> B (C Q) N H")
  if "entropy" in carry:
    carry["entropy"] = carry["entropy"] / jnp.maximum(valid_BT.sum(1), 1)[:, None]
  if "cross" in carry:
    counts = jnp.stack([is_text.sum(1), is_vis.sum(1)], axis=-1)
    both = (is_text.any(1) & is_vis.any(1))[:, None]
    carry["cross"] = jnp.where(both, carry["cross"] / jnp.maximum(counts, 1), 0.0)
  if spec.window:
    carry["window"] = window_sums(q_BTNH, k_BKTH, valid_BT, spec.window)
  if pad:
    out_BTNH = out_BTNH[:, :t_in]
    carry = {k: v[..., :t_in] if v.ndim == 3 else v for k, v in carry.items()}
  return out_BTNH, Stats(**carry)
