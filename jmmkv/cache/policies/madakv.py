"""MadaKV: modality preference adaptation (MPA) + hierarchical compression compensation (HCC).

Based on "MadaKV: Adaptive Modality-Perception KV Cache Eviction for Efficient Multimodal Long-
Context Inference" (Li et al., ACL 2025, arXiv 2506.15724). No official code exists; this follows
ALGORITHMS.md 2.2-2.3 with the readings spelled out in tests/references/madakv_ref.py (the
executable spec), per row, in slots per KV head (proxy window included):

- psi(i) = sum over the last p = min(proxy_window, T) queries of their attention to i, per query
  head, then the GQA mean. Candidates are the positions before the proxy window.
- Demand of modality m (visual = image or video, text = the rest): the fewest top-psi candidates
  covering theta of the modality's psi mass; a head needs d = p + k_v + k_t slots.
- HCC: phi^0 = n; phi^{l+1} = floor((Kh (r+1) phi^l - X^l) / (Kh r)) ("per_head"; r = L-1-l) or
  floor(((r+Kh) phi^l - X^l) / r) ("layer_total"), clamped to [1, T]; X^l sums the heads' demand
  (reading A) or their kept slots (reading B).
- Slots b of a head: phi^l (reading A, or hcc=False); reading B: clip(d, b_min, cap^l) with
  cap^l = clip((L-l) phi^l - b_min (L-1-l), b_min, T) (pool_cap) or T.
- A head keeps the top min(b, p) proxy tokens by psi, then c = b - p candidates: in reading B,
  when b == d, the top k_v visual and k_t text; otherwise split by MPA, c_v = clip(floor(c f +
  1/2), max(0, c - n_t), min(c, n_v)) with f = w_v / (w_v + w_t), c_t = c - c_v; mpa=False keeps
  the top c candidates of either modality. Ties: psi desc, then lower position.
Defaults (ALGORITHMS.md's suggested starting values): proxy_window 32, theta 0.9, reading "B".
"""

from __future__ import annotations

import dataclasses

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
from jmmkv.cache.stats import StatsSpec, spec
from jmmkv.cache.statistics import WindowSums
from jmmkv.typing import IMAGE, VIDEO


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
  theta: float = 0.9
  reading: str = "B"
  hcc_units: str = "per_head"
  mpa: bool = True
  hcc: bool = True
  b_min: int = 1
  pool_cap: bool = True

  name = "madakv"

  def __post_init__(self):
    check_fields(self)
    if self.proxy_window < 1:
      raise ValueError(f"proxy_window must be a positive integer, got {self.proxy_window}")
    if not 0.0 < self.theta <= 1.0:
      raise ValueError(f"theta must be in (0, 1], got {self.theta}")
    if self.reading not in ("A", "B"):
      raise ValueError(f"reading must be 'A' or 'B', got {self.reading!r}")
    if self.hcc_units not in ("per_head", "layer_total"):
      raise ValueError(f"hcc_units must be 'per_head' or 'layer_total', got {self.hcc_units!r}")
    if self.b_min < 1:
      raise ValueError(f"b_min must be a positive integer, got {self.b_min}")

  @property
  def stats(self) -> StatsSpec:
    return spec(WindowSums(self.proxy_window))

  def plan(self, host: HostPrompt) -> Plan:
    """Without HCC every head keeps n. With reading B's pool cap a layer never takes what the
    later layers need, so the kept total stays within L K n (b_min when larger); reading A's
    budgets and the "layer_total" units have no such bound (a dense prefix of the prompt)."""
    n, t = host.kept_B, host.bucket
    if not self.hcc:
      return Plan(int(n.max(initial=1)))
    if self.reading == "B" and self.pool_cap and self.hcc_units == "per_head":
      per_row = np.where(n >= host.lengths_B, host.lengths_B, np.maximum(n, self.b_min))
      return Plan(t, int(host.num_layers * host.num_kv_heads * per_row.sum()))
    return Plan(t)

  def start(self, ctx: Context):
    return ctx.kept_B  # phi^0 = n

  def layer_slots(self, d_BK, phi_B, n_B, t_B, index: int, num_layers: int):
    """One step of the HCC recurrence: layer ``index``'s slots b ``[B, K]`` and phi of the next."""
    kh = d_BK.shape[-1]
    r = num_layers - 1 - index
    if self.reading == "B" and self.hcc:
      cap = jnp.clip((r + 1) * phi_B - self.b_min * r, self.b_min, t_B) if self.pool_cap else t_B
      b = jnp.clip(d_BK, self.b_min, cap[:, None])
    else:
      b = jnp.broadcast_to(phi_B[:, None], d_BK.shape)
    b = jnp.where((n_B >= t_B)[:, None], t_B[:, None], b)  # n == T: keep everything
    if self.hcc and r > 0:
      x = (d_BK if self.reading == "A" else b).sum(-1)
      if self.hcc_units == "per_head":
        nxt = (kh * (r + 1) * phi_B - x) // (kh * r)
      else:
        nxt = ((r + kh) * phi_B - x) // r
      phi_B = jnp.clip(nxt, 1, t_B)
    return b, phi_B

  def compress_layer(self, layer: PromptKV, index: int, ctx: Context, capacity: int, phi_B):
    kh = layer.k.shape[2]
    psi = select.reduce_heads(layer.stats[WindowSums.name], kh, "mean")  # [L, B, K, T]
    valid = layer.valid_BT[None, :, None, :]
    p_B = jnp.minimum(self.proxy_window, layer.lengths_B)
    proxy = select.recent_rows(layer.valid_BT, p_B)[None, :, None, :]
    cand = valid & ~proxy
    mod = layer.modality_BT[None, :, None, :]
    vis = cand & ((mod == IMAGE) | (mod == VIDEO))
    txt = cand & ~vis
    k_v, k_t = _demand(psi, vis, self.theta), _demand(psi, txt, self.theta)
    d = p_B[None, :, None] + k_v + k_t
    b_BK, phi_B = self.layer_slots(d[0], phi_B, ctx.kept_B, layer.lengths_B, index, ctx.num_layers)
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
    if self.reading == "B" and self.hcc:
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
