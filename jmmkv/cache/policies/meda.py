"""MEDA: layer budgets from multimodal attention entropy, text-prior selection, average merging.

Based on "MEDA: Dynamic KV Cache Allocation for Efficient Multimodal Long-Context Inference" (Wan
et al., NAACL 2025, arXiv 2502.17599); readings as tests/references/meda_ref.py specifies:
1. Entropy E_l: "paper" = H_TV + H_VT, the mean row entropies of the head-averaged, non-causal
   text->visual and visual->text attention (0 for a direction without rows or keys); "code" (the
   released code) = the head mean of the mean causal row entropy.
2. alpha_l = clip(rho * softmax(E)_l * L, lo, 1) with rho = n / T, lo = min(alpha_min, rho);
   ``renormalise`` instead scales softmax(E) * L by the c that makes mean alpha = rho exactly
   (water-filling). n >= T keeps everything.
3. S_l = alpha_l * T, rounded by largest remainder to floor(sum + 1/2), then at least 1.
4. M_l = min(S_l, floor(S_l b1 / (b1 + b2) + 1/2)) recent, N_l = S_l - M_l important; split 3:1
   ("paper") or 1:1 ("code").
5. LOOK-M's text-prior selection per layer with (M_l, N_l) on H2O column-sum scores; every text
   token is kept (S_l can overrun) unless ``keep_all_text=False`` (exactly S_l kept).
6. Merge evicted into kept: average rule ("paper"), or the released code's filtered and misaligned
   average ("code"); ``merge=False`` evicts only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jmmkv.cache import merge as merging
from jmmkv.cache import select
from jmmkv.cache.policies.base import (
  Base,
  Context,
  HostPrompt,
  Plan,
  PromptKV,
  check_fields,
)
from jmmkv.cache.policies.lookm import bound_with_text, finish, split_recent, text_prior_keep
from jmmkv.cache.stats import StatsSpec, spec
from jmmkv.cache.statistics import ColumnSums, CrossEntropy, RowEntropy
from jmmkv.typing import Array


def water_fill(p_LB: Array, rho_B: Array, lo_B: Array) -> Array:
  """alpha = clip(c p, lo, 1) with the c making mean_l alpha = rho (g(c) is piecewise linear)."""
  l = p_LB.shape[0]
  brk = jnp.sort(jnp.concatenate([lo_B[None] / p_LB, 1.0 / p_LB]), axis=0)  # [2L, B]
  g = jnp.clip(brk[:, None, :] * p_LB[None], lo_B[None, None], 1.0).sum(1)  # [2L, B]
  target = l * rho_B
  j = jnp.clip(jnp.sum(g < target[None], axis=0), 1, 2 * l - 1)  # first breakpoint with g >= target
  c0, c1 = jnp.take_along_axis(brk, (j - 1)[None], 0)[0], jnp.take_along_axis(brk, j[None], 0)[0]
  g0, g1 = jnp.take_along_axis(g, (j - 1)[None], 0)[0], jnp.take_along_axis(g, j[None], 0)[0]
  c = jnp.where(g1 > g0, c0 + (target - g0) * (c1 - c0) / jnp.where(g1 > g0, g1 - g0, 1.0), c1)
  c = jnp.where(target <= g[0], brk[0], c)
  return jnp.clip(c[None] * p_LB, lo_B[None], 1.0)


@dataclasses.dataclass(frozen=True)
class MEDA(Base):
  variant: str = "paper"
  split: tuple[int, int] | None = None  # (recent, important); default 3:1 paper, 1:1 code
  alpha_min: float = 0.01
  renormalise: bool = False
  merge: bool = True
  keep_all_text: bool = True  # the paper; False: each layer keeps exactly S_l

  name = "meda"

  def __post_init__(self):
    check_fields(self)
    if self.variant not in ("paper", "code"):
      raise ValueError(f"variant must be 'paper' or 'code', got {self.variant!r}")
    if self.split is not None and (
      len(self.split) != 2 or min(self.split) < 0 or sum(self.split) <= 0
    ):
      raise ValueError(
        f"split must be two non-negative numbers with a positive sum, got {self.split}"
      )
    if not 0.0 <= self.alpha_min <= 1.0:
      raise ValueError(f"alpha_min must be in [0, 1], got {self.alpha_min}")

  stats = spec(ColumnSums())

  @property
  def survey(self) -> StatsSpec:
    """Every layer's entropy is needed before the first layer is compressed: a first prefill
    pass computes them and keeps no K/V. It asks for the row entropies in either variant, so
    that its attention runs the same exact pass as the second one's first step (flash style
    with online hooks; the column sums' second scoring does not touch the output): its hidden
    states, hence its entropies and layer budgets, are then bit-identical to a single pass's."""
    by_variant = CrossEntropy() if self.variant == "paper" else RowEntropy()
    return spec(RowEntropy(), by_variant)

  @property
  def recent_important(self) -> tuple[int, int]:
    return self.split if self.split is not None else ((3, 1) if self.variant == "paper" else (1, 1))

  def entropies(self, survey) -> Array:
    """E ``[L, B]`` from the survey's statistics."""
    if self.variant == "paper":
      return survey[CrossEntropy.name].sum(-1)
    return survey[RowEntropy.name].mean(-1)

  def layer_budgets(self, entropy_LB: Array, n_B: Array, t_B: Array) -> tuple[Array, Array]:
    """(alpha ``[L, B]``, S ``[L, B]``)."""
    l = entropy_LB.shape[0]
    t = t_B.astype(jnp.float32)
    rho = n_B / t
    lo = jnp.minimum(self.alpha_min, rho)
    p = jax.nn.softmax(entropy_LB, axis=0) * l
    alpha = water_fill(p, rho, lo) if self.renormalise else jnp.clip(rho[None] * p, lo[None], 1.0)
    alpha = jnp.where((n_B >= t_B)[None], 1.0, alpha)
    x = alpha * t[None]
    total = jnp.floor(x.sum(0) + 0.5).astype(jnp.int32)
    budgets = jnp.maximum(select.largest_remainder(x, total), 1)
    return alpha, budgets

  def start(self, ctx: Context) -> Array:
    return self.layer_budgets(self.entropies(ctx.survey), ctx.kept_B, ctx.lengths_B)[1]  # S [L, B]

  def plan(self, host: HostPrompt) -> Plan:
    """From the survey: S_l per layer and row, plus the row's text when all text is kept."""
    s_LB = np.asarray(self.start(Context(host.kept_B, host.lengths_B, host.survey, 0)))
    if self.keep_all_text:
      text_B = host.text_beside_visual_B()
      s_LB = np.minimum(host.lengths_B, bound_with_text(s_LB, text_B, *self.recent_important))
    return Plan(int(s_LB.max(initial=1)), int(host.num_kv_heads * s_LB.sum()))

  def compress_layer(self, layer: PromptKV, index: int, ctx: Context, capacity: int, s_LB):
    b1, b2 = self.recent_important
    recent_B, important_B = split_recent(s_LB[index], b1, b2)
    score = select.reduce_heads(layer.stats[ColumnSums.name], layer.k.shape[2], "mean")
    keep = text_prior_keep(
      layer, score, recent_B[None], important_B[None], True, self.keep_all_text
    )
    rule = "average" if self.variant == "paper" else merging.CODE_COMPAT
    return finish(layer, keep, rule if self.merge else None, capacity), s_LB
