"""AdaKV: head-adaptive budgets over any scoring policy (joint top over a layer's KV heads).

Based on "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference" (Feng et al., arXiv 2407.11550), with kvpress 0.5.5's ``AdaKVPress`` rule: per layer and
row, each KV head first secures its own top ``max(1, floor(n * alpha_safeguard))`` tokens; then the
layer keeps ``K * n`` (head, position) pairs in total, ordered by (secured, the scorer's level,
score, lower position, lower head). Per-head counts vary; the layer total equals the uniform one.
Wraps a scorer with a ``scores(prompt) -> (score, level)`` method (default SnapKV with its own
defaults, window 32, kernel 5, avg pooling, as kvpress wraps its SnapKV press, so that AdaKV and
SnapKV differ only in the budget split; the AdaKV repository scores with kernel 7 and max
pooling: ``get("adakv", kernel=7, pooling="max")``).
Defaults: alpha_safeguard 0.2 (the AdaKV LongBench setting and kvpress' default).
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp

from jmmkv.cache import select
from jmmkv.cache.policies.base import Prefix, PromptKV, check_fields, uniform_capacity
from jmmkv.cache.policies.snapkv import SnapKV


@dataclasses.dataclass(frozen=True)
class AdaKV:
  scorer: SnapKV = SnapKV()
  alpha_safeguard: float = 0.2

  name = "adakv"

  @classmethod
  def settings(cls) -> tuple[str, ...]:
    """What ``from_kwargs`` takes: its own setting and the SnapKV scorer's."""
    return ("alpha_safeguard", *(f.name for f in dataclasses.fields(SnapKV)))

  @classmethod
  def from_kwargs(cls, alpha_safeguard: float = 0.2, **scorer_kwargs) -> "AdaKV":
    """``get("adakv", window=8, alpha_safeguard=0.5)``: scorer settings go to SnapKV."""
    return cls(SnapKV(**scorer_kwargs), alpha_safeguard)

  def __post_init__(self):
    check_fields(self)
    if not 0.0 <= self.alpha_safeguard <= 1.0:
      raise ValueError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard}")
    if not hasattr(self.scorer, "scores"):
      raise ValueError(f"AdaKV needs a scoring policy with a scores() method, got {self.scorer!r}")

  @property
  def stats(self):
    return self.scorer.stats

  def capacity(self, budget, prompt_len: int) -> int:
    uniform_capacity(budget, prompt_len, self.name)
    return prompt_len  # a head may keep up to the whole prompt

  def head_counts(self, score, level, prompt: PromptKV, budget):
    """Kept tokens per (layer, row, KV head) ``[L, B, K]`` by the joint rule."""
    l, b, kh, t = score.shape
    n_B = budget.kept_B(prompt.lengths_B)
    safe_B = jnp.maximum(1, jnp.floor(n_B * self.alpha_safeguard)).astype(jnp.int32)
    secured = select.own_rank(score, level, prompt.valid_BT) < safe_B[None, :, None, None]
    valid = jnp.broadcast_to(prompt.valid_BT[None, :, None, :], score.shape)
    flat = lambda x: einops.rearrange(x, "L B K T -> L B (K T)")
    head = jnp.broadcast_to(jnp.arange(kh)[:, None], (kh, t))
    pos = jnp.broadcast_to(jnp.arange(t)[None, :], (kh, t))
    keys = (
      -flat(jnp.where(valid, secured, -1).astype(jnp.int32)),
      -flat(jnp.where(valid, level.astype(jnp.int32), -1)),
      -flat(jnp.where(valid, score, -jnp.inf)),
      jnp.broadcast_to(pos.reshape(-1), (l, b, kh * t)),
      jnp.broadcast_to(head.reshape(-1), (l, b, kh * t)),
    )
    *_, head_order = jax.lax.sort(keys, dimension=-1, num_keys=5)
    chosen = jnp.arange(kh * t)[None, None, :] < (kh * n_B)[None, :, None]
    return jnp.sum(jax.nn.one_hot(head_order, kh, dtype=jnp.int32) * chosen[..., None], axis=2)

  def compress(self, prompt: PromptKV, budget, capacity: int) -> Prefix:
    score, level = self.scorer.scores(prompt)
    n_LBK = self.head_counts(score, level, prompt, budget)
    idx = select.top_positions(score, level, prompt.valid_BT, n_LBK, capacity)
    return select.gather(prompt, idx)
