"""LOOK-M: text-prior selection of the prompt KV, then merging of what is evicted (one shot).

Based on "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context
Inference" (Wan et al., EMNLP 2024 Findings, arXiv 2406.18139); the readings are those of
tests/references/lookm_ref.py (the executable spec). Per row, with n the budget:
  M = min(n, floor(n * a1 / (a1 + a2) + 1/2)) recent tokens, N = n - M important ones;
  score = column sums of the prompt attention over all queries (GQA mean);
  keep the last M tokens, then every text token before them, then the top visual tokens until
  M + max(N, #text before the window) tokens are kept (all text is kept: the budget can overrun);
  (``keep_all_text=False`` reads eq. 8 literally: the same order, but exactly M + N are kept, so
  the budget holds and surplus text is ranked by score like the rest);
  merge each evicted token into its key-cosine nearest kept token (``merge``, below).
``merge`` (jmmkv.cache.merge has the rules): the paper's, every evicted token merged: "pivot"
(P-Merge, the default; the released code's too), "average" (A-Merge), "weighted" (W-Merge); the
released code's, which merge only the evicted tokens whose max-cosine, averaged over the row's KV
heads at the same evicted rank, is >= its mean over all heads and ranks of the layer:
"average-code" (TextAVGMerge: A-Merge with the code's index misalignment, as MEDA "code") and
"weighted-code" (TextWeightedMerge: W-Merge, aligned); None only evicts.
A row without image / video tokens (or text_prior=False) has no text priority: H2O's selection
with the same split, then the same merge. Defaults: a1 = a2 = 0.1 (recent 10% + important 10%).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jmmkv.cache import merge as merging
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
from jmmkv.cache.stats import spec
from jmmkv.cache.statistics import ColumnSums
from jmmkv.typing import IMAGE, VIDEO, Array


def split_recent(n, a1: float, a2: float):
  """(recent M, important N) of n kept tokens in the proportion a1 : a2 (M rounds half up)."""
  recent = jnp.minimum(n, jnp.floor(n * (a1 / (a1 + a2)) + 0.5).astype(jnp.int32))
  return recent, n - recent


def bound_with_text(n, text_B, a1: float, a2: float) -> np.ndarray:
  """The most `text_prior_keep` keeps of a budget of ``n`` tokens split a1 : a2 when every text
  token is kept (host): the recent M plus max(N, text), ``text_B`` bounding the row's text."""
  important = np.asarray(split_recent(jnp.asarray(n), a1, a2)[1])
  return np.asarray(n) + np.maximum(0, text_B - important)


def text_prior_keep(
  prompt: PromptKV,
  score_LBKT: Array,
  recent_LB: Array,
  important_LB: Array,
  text_prior: bool,
  keep_all_text: bool = True,
) -> Array:
  """Keep mask ``[L, B, K, T]``: the last M tokens, every earlier text token (when the row has
  visual tokens and ``text_prior``), then the best-scored tokens up to M + max(N, #text);
  ``keep_all_text=False``: the same order, cut at M + N (text beyond N ranked by score)."""
  valid = prompt.valid_1BKT
  mod = prompt.modality_1BKT
  visual = (mod == IMAGE) | (mod == VIDEO)
  has_visual = (visual & valid).any(-1, keepdims=True)
  recent = jnp.concatenate([select.recent_slots(valid, m) for m in recent_LB])
  prior = valid & ~recent & ~visual & has_visual if text_prior else jnp.zeros_like(recent)
  level = 2 * recent + prior
  n_text = prior.sum(-1)  # [L, B, 1]
  important = important_LB[..., None]
  counts = recent_LB[..., None] + (jnp.maximum(important, n_text) if keep_all_text else important)
  counts = jnp.broadcast_to(counts, score_LBKT.shape[:3])
  rank = select.own_rank(score_LBKT, jnp.broadcast_to(level, score_LBKT.shape), valid)
  return valid & (rank < counts[..., None])


@dataclasses.dataclass(frozen=True)
class LookM(Base):
  recent_ratio: float = 0.1
  important_ratio: float = 0.1
  merge: str | None = "pivot"
  text_prior: bool = True
  keep_all_text: bool = True  # the paper; False: the budget holds (text first, then visual)

  name = "lookm"
  stats = spec(ColumnSums())

  def __post_init__(self):
    check_fields(self)
    if (
      self.recent_ratio < 0
      or self.important_ratio < 0
      or self.recent_ratio + self.important_ratio <= 0
    ):
      raise ValueError(
        f"recent_ratio and important_ratio must be >= 0 with a positive sum, got "
        f"{self.recent_ratio}, {self.important_ratio}"
      )
    rules = merging.RULES + merging.CODE_RULES
    if self.merge is not None and self.merge not in rules:
      raise ValueError(f"merge must be None or one of {', '.join(rules)}, got {self.merge!r}")

  def plan(self, host: HostPrompt) -> Plan:
    """At most n, or with every text token kept the recent M plus max(N, the row's text)."""
    n = host.kept_B
    if self.keep_all_text and self.text_prior:
      text_B = host.text_beside_visual_B()
      n = np.minimum(
        host.lengths_B, bound_with_text(n, text_B, self.recent_ratio, self.important_ratio)
      )
    return Plan(int(n.max(initial=1)))

  def compress_layer(self, layer: PromptKV, index: int, ctx: Context, capacity: int, carry):
    score = select.reduce_heads(layer.stats[ColumnSums.name], layer.k.shape[2], "mean")
    recent_B, important_B = split_recent(ctx.kept_B, self.recent_ratio, self.important_ratio)
    keep = text_prior_keep(
      layer, score, recent_B[None], important_B[None], self.text_prior, self.keep_all_text
    )
    return finish(layer, keep, self.merge, capacity), carry


def finish(layer: PromptKV, keep_1BKT: Array, rule: str | None, capacity: int) -> Kept:
  """The kept positions of one layer and, with a merge ``rule``, the kept slots' K/V with the
  evicted tokens merged into them (``rule`` None: evict only; see `merging.merge_kept`)."""
  positions = select.positions_from_mask(keep_1BKT, capacity)
  if rule is None:
    return Kept(positions)
  evict = layer.valid_1BKT & ~keep_1BKT
  return Kept(positions, *merging.merge_kept(layer.k, layer.v, keep_1BKT, evict, rule, positions))
