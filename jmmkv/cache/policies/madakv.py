"""MadaKV: modality preference adaptation (MPA) + hierarchical compression compensation (HCC).

Based on "MadaKV: Adaptive Modality-Perception KV Cache Eviction for Efficient Multimodal Long-
Context Inference" (Li et al., ACL 2025, arXiv 2506.15724). No official code exists; this follows
ALGORITHMS.md 2.2-2.5 with the readings spelled out in tests/references/madakv_ref.py (the
executable spec), per row, in slots per KV head (proxy window included):

- psi(i) = sum over the last p = min(proxy_window, T) queries of their attention to i, per query
  head, then the GQA mean. Candidates are the positions before the proxy window. ``kernel`` > 1
  (not in the paper; default 1) first average-pools the candidates' psi per query head as SnapKV
  does (window unpooled).
- Demand of modality m (visual = image or video, text = the rest): the fewest top-psi candidates
  covering theta of the modality's psi mass; a head needs d = p + k_v + k_t slots (reading C
  with mpa=False: d = p + k_a, the same count over all candidates).
- Reading "C" (default, budget-conserving). Derivation: the paper's update phi^{l+1} = phi^l -
  K^l / (L - l) with K^l = sum_h (k^{l,h} - phi^l) conserves the budget only in consistent units
  (K^l per head, i.e. divided by the Kh heads) and only if layer l really keeps what K^l counts.
  So a layer keeps S^l = max(D^l, share^l) slots: its heads' total demand D^l, or its equal share
  share^l = floor(R^l / (L-l)) of the R^l slots left, whichever is larger (capped so every later
  head keeps b_min); R^{l+1} = R^l - S^l, which is the per-head HCC update in conserving form.
  An over-spending layer is paid for by the later ones, a frugal one passes its saving on, and
  the last layer keeps what remains: the kept total is exactly L Kh n whenever the prompt allows
  it. Inside the layer, S^l - Kh b_min is split over heads in proportion to d - b_min (water-
  filling, capped at T; largest remainders), so a head keeps exactly d when S^l = D^l.
  Why the default: the paper's efficiency table shows memory that tracks the budget (0.41 GiB at
  20%, 0.16 GiB at 5% of 1.63 GiB), and the two literal readings miss it in opposite directions
  on sink-heavy attention (B keeps its tiny demand, A's later layers grow until clamped).
- Readings "A" and "B" (selectable): phi^0 = n; phi^{l+1} = floor((Kh (r+1) phi^l - X^l) /
  (Kh r)) ("per_head"; r = L-1-l) or floor(((r+Kh) phi^l - X^l) / r) ("layer_total"), clamped
  to [1, T]; X^l sums the heads' demand (A) or their kept slots (B). A head keeps phi^l (A) or
  clip(d, b_min, cap^l) with cap^l = clip((L-l) phi^l - b_min (L-1-l), b_min, T) (B, pool_cap).
- hcc=False (any reading): every head keeps n.
- A head keeps the top min(b, p) proxy tokens by psi, then c = b - p candidates: in readings B
  and C, when b == d, the top k_v visual and k_t text; otherwise split by MPA, c_v = clip(floor(c
  f + 1/2), max(0, c - n_t), min(c, n_v)) with f = w_v / (w_v + w_t), c_t = c - c_v; mpa=False
  keeps the top c candidates of either modality. Ties: psi desc, then lower position.
The paper's ablation rows: both (default), mpa=False ("HCC only"), hcc=False ("MPA only"), both
off (uniform window + top-k by psi). Defaults (ALGORITHMS.md's suggested starting values):
proxy_window 32, theta 0.9.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jmmkv.cache import select
from jmmkv.cache.policies.base import (
  Base,
  Context,
  HostPrompt,
  Kept,
  Plan,
  PromptKV,
  check_fields,
)
from jmmkv.cache.policies.snapkv import pool
from jmmkv.cache.stats import StatsSpec, spec
from jmmkv.cache.statistics import WindowSums
from jmmkv.typing import IMAGE, VIDEO


READINGS = ("A", "B", "C")


def _demand(psi, members, theta):
  """Fewest top-psi members whose psi sum reaches theta of the members' total ``[L, B, K]``."""
  desc = -jnp.sort(-jnp.where(members, psi, 0.0), axis=-1)
  before = jnp.cumsum(desc, axis=-1) - desc  # S(j): sum of the j largest, j = 0 .. T-1
  total = jnp.sum(jnp.where(members, psi, 0.0), axis=-1, keepdims=True)
  count = members.sum(-1, keepdims=True)
  j = jnp.arange(psi.shape[-1])
  return jnp.sum((before < theta * total) & (j < count) & (total > 0), axis=-1)


@dataclasses.dataclass(frozen=True)
class MadaKV(Base):
  proxy_window: int = 32
  kernel: int = 1
  theta: float = 0.9
  reading: str = "C"
  hcc_units: str = "per_head"
  mpa: bool = True
  hcc: bool = True
  b_min: int = 1
  pool_cap: bool = True

  name = "madakv"

  def __post_init__(self):
    check_fields(self)
    if self.kernel < 1 or self.kernel % 2 == 0:
      raise ValueError(f"kernel must be a positive odd integer, got {self.kernel}")
    if self.proxy_window < 1:
      raise ValueError(f"proxy_window must be a positive integer, got {self.proxy_window}")
    if not 0.0 < self.theta <= 1.0:
      raise ValueError(f"theta must be in (0, 1], got {self.theta}")
    if self.reading not in READINGS:
      raise ValueError(f"reading must be one of {', '.join(READINGS)}, got {self.reading!r}")
    if self.hcc_units not in ("per_head", "layer_total"):
      raise ValueError(f"hcc_units must be 'per_head' or 'layer_total', got {self.hcc_units!r}")
    if self.b_min < 1:
      raise ValueError(f"b_min must be a positive integer, got {self.b_min}")

  @property
  def stats(self) -> StatsSpec:
    return spec(WindowSums(self.proxy_window))

  def plan(self, host: HostPrompt) -> Plan:
    """Without HCC every head keeps n. Reading C keeps L K n in all (b_min per head when larger),
    and so does reading B's pool cap at most; reading A's budgets and the "layer_total" units
    have no such bound (a dense prefix of the prompt)."""
    n, t = host.kept_B, host.bucket
    if not self.hcc:
      return Plan(int(n.max(initial=1)))
    if self.reading == "C" or (
      self.reading == "B" and self.pool_cap and self.hcc_units == "per_head"
    ):
      per_row = np.where(n >= host.lengths_B, host.lengths_B, np.maximum(n, self.b_min))
      return Plan(t, int(host.num_layers * host.num_kv_heads * per_row.sum()))
    return Plan(t)

  def start(self, ctx: Context):
    if self.reading == "C" and self.hcc:
      return jnp.zeros_like(ctx.kept_B)  # slots spent so far
    return ctx.kept_B  # phi^0 = n

  def conserving_slots(self, d_BK, spent_B, n_B, t_B, index: int, num_layers: int):
    """Reading C: layer ``index``'s slots b ``[B, K]`` and the slots spent through it."""
    kh = d_BK.shape[-1]
    r = num_layers - 1 - index
    b_min = jnp.minimum(self.b_min, t_B)  # [B]
    left = num_layers * kh * n_B - spent_B  # R^l
    hi = jnp.minimum(kh * t_B, left - r * kh * b_min)
    want = jnp.maximum(d_BK.sum(-1), left // (r + 1))
    s = jnp.maximum(kh * b_min, jnp.minimum(want, hi))
    b = b_min[:, None] + allocate(
      s - kh * b_min, jnp.maximum(d_BK - b_min[:, None], 0), t_B - b_min
    )
    return b, spent_B + b.sum(-1)

  def layer_slots(self, d_BK, phi_B, n_B, t_B, index: int, num_layers: int):
    """One step of the HCC recurrence: layer ``index``'s slots b ``[B, K]`` and phi of the next."""
    kh = d_BK.shape[-1]
    r = num_layers - 1 - index
    if self.reading == "B" and self.hcc:
      cap = jnp.clip((r + 1) * phi_B - self.b_min * r, self.b_min, t_B) if self.pool_cap else t_B
      b = jnp.clip(d_BK, self.b_min, cap[:, None])
    else:
      b = jnp.broadcast_to(phi_B[:, None], d_BK.shape)
    if self.hcc and r > 0:
      x = (d_BK if self.reading == "A" else b).sum(-1)
      if self.hcc_units == "per_head":
        nxt = (kh * (r + 1) * phi_B - x) // (kh * r)
      else:
        nxt = ((r + kh) * phi_B - x) // r
      phi_B = jnp.clip(nxt, 1, t_B)
    return b, phi_B

  def compress_layer(self, layer: PromptKV, index: int, ctx: Context, capacity: int, phi_B):
    """Layer ``index``'s kept positions; the carry is phi (readings A, B) or the slots spent
    (reading C), ``[B]``."""
    kh = layer.k.shape[2]
    psi_N = layer.stats[WindowSums.name]  # [L, B, N, T]
    valid = layer.valid_1BKT
    p_B = jnp.minimum(self.proxy_window, layer.lengths_B)
    proxy = select.recent_slots(valid, p_B)
    if self.kernel > 1:  # SnapKV's average pooling over the candidates; the window unpooled
      n = psi_N.shape[2]
      pooled = pool(psi_N, select.per_query_head(valid & ~proxy, n), self.kernel, "avg")
      psi_N = jnp.where(select.per_query_head(proxy, n), psi_N, pooled)
    psi = select.reduce_heads(psi_N, kh, "mean")  # [L, B, K, T]
    cand = valid & ~proxy
    mod = layer.modality_1BKT
    vis = cand & ((mod == IMAGE) | (mod == VIDEO))
    txt = cand & ~vis
    k_v, k_t = _demand(psi, vis, self.theta), _demand(psi, txt, self.theta)
    d = p_B[None, :, None] + k_v + k_t
    if self.reading == "C" and self.hcc:
      if not self.mpa:  # "HCC only": a modality-blind demand
        d = p_B[None, :, None] + _demand(psi, cand, self.theta)
      slots_of = self.conserving_slots
    else:
      slots_of = self.layer_slots
    b_BK, phi_B = slots_of(d[0], phi_B, ctx.kept_B, layer.lengths_B, index, ctx.num_layers)
    whole = (ctx.kept_B >= layer.lengths_B)[:, None]  # n == T: keep everything (any carry)
    b_BK = jnp.where(whole, layer.lengths_B[:, None], b_BK)
    slots = b_BK[None]
    p = p_B[None, :, None]
    c = jnp.maximum(0, slots - p)
    n_v, n_t = vis.sum(-1), txt.sum(-1)
    w_v = jnp.sum(jnp.where(vis, psi, 0.0), -1)
    w_t = jnp.sum(jnp.where(txt, psi, 0.0), -1)
    f = jnp.where(w_v + w_t > 0, w_v / jnp.where(w_v + w_t > 0, w_v + w_t, 1.0), 0.0)
    c_v = jnp.clip(
      jnp.floor(c * f + 0.5).astype(jnp.int32), jnp.maximum(0, c - n_t), jnp.minimum(c, n_v)
    )
    if self.reading in ("B", "C") and self.hcc:
      exact = slots == d
      c_v = jnp.where(exact, k_v, c_v)
    c_t = c - c_v
    keep = proxy & (select.rank_within(psi, proxy) < jnp.minimum(slots, p)[..., None])
    if self.mpa:
      keep |= vis & (select.rank_within(psi, vis) < c_v[..., None])
      keep |= txt & (select.rank_within(psi, txt) < c_t[..., None])
    else:
      keep |= cand & (select.rank_within(psi, cand) < c[..., None])
    return Kept(select.positions_from_mask(keep & valid, capacity)), phi_B


def allocate(extra_B, weight_BK, cap_B):
  """``[B, K]`` int32 shares of ``extra_B`` slots in proportion to ``weight_BK`` (equal when all
  weights are 0), each at most ``cap_B``, summing to ``extra_B`` (when ``K cap`` allows):
  water-filling over the capped heads, then float32 quotas rounded by largest remainder (ties to
  the lower head). The reference's item 6C.b."""
  kh = weight_BK.shape[-1]

  def quotas(capped):
    free = ~capped
    left = extra_B - cap_B * capped.sum(-1)
    total = jnp.where(free, weight_BK, 0).sum(-1)
    count = jnp.maximum(free.sum(-1), 1)
    f32 = lambda x: x.astype(jnp.float32)
    by_weight = f32(left)[:, None] * f32(weight_BK) / f32(jnp.maximum(total, 1))[:, None]
    q = jnp.where((total > 0)[:, None], by_weight, (f32(left) / f32(count))[:, None])
    return free, left, q

  def more_capped(_, capped):
    free, _, q = quotas(capped)
    return capped | (free & (q > cap_B[:, None].astype(jnp.float32)))

  capped = jax.lax.fori_loop(0, kh, more_capped, jnp.zeros(weight_BK.shape, bool))  # fixed point
  free, left, q = quotas(capped)
  whole = jnp.floor(q)
  floors = jnp.where(free, whole, 0).astype(jnp.int32)
  over = left - floors.sum(-1)  # the leftover, [B]; below 0 only from float32 rounding
  frac = q - whole
  ahead = (frac[:, None, :] > frac[:, :, None]) | (  # [B, k, j]: head j ranks before head k
    (frac[:, None, :] == frac[:, :, None]) & (jnp.arange(kh)[None, :] < jnp.arange(kh)[:, None])
  )
  rank = (ahead & free[:, None, :]).sum(-1)
  n_free = free.sum(-1)
  adjust = (rank < over[:, None]).astype(jnp.int32) - (rank >= (n_free + over)[:, None])
  return jnp.where(capped, cap_B[:, None], floors + adjust)
