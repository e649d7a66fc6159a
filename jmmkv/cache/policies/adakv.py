"""AdaKV: head-adaptive budgets over any scorer (joint top over a layer's KV heads).

Based on "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference" (Feng et al., arXiv 2407.11550), with kvpress 0.5.5's ``AdaKVPress`` rule: per layer and
row, each KV head first secures its own top ``max(1, floor(n * alpha_safeguard))`` tokens; then the
layer keeps ``K * n`` (head, position) pairs in total, ordered by (secured, the scorer's level,
score, lower position, lower head). Per-head counts vary; the layer total equals the uniform one.
Wraps any `Scorer` (``AdaKV(H2O())``; default SnapKV with its own defaults, window 32, kernel 5,
avg pooling, as kvpress wraps its SnapKV press, so that AdaKV and SnapKV differ only in the budget
split; the AdaKV repository scores with kernel 7 and max pooling: ``get("adakv", kernel=7,
pooling="max")``; another scorer by name: ``get("adakv", scorer="h2o")``).
Defaults: alpha_safeguard 0.2 (the AdaKV LongBench setting and kvpress' default).
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp

from jmmkv.cache import select
from jmmkv.cache.policies.base import (
  Context,
  HostPrompt,
  Plan,
  PromptKV,
  Scorer,
  check_fields,
  keep_best,
)
from jmmkv.cache.policies.snapkv import SnapKV
from jmmkv.cache.policies.wrapper import Wrapper
from jmmkv.typing import Array


@dataclasses.dataclass(frozen=True)
class AdaKV(Wrapper):
  scorer: Scorer = SnapKV()
  alpha_safeguard: float = 0.2

  name = "adakv"

  def __post_init__(self):
    check_fields(self)
    if not 0.0 <= self.alpha_safeguard <= 1.0:
      raise ValueError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard}")
    self.check_scorer()

  def plan(self, host: HostPrompt) -> Plan:
    n = host.kept_B
    layer_total = int(host.num_layers * host.num_kv_heads * n.sum())
    return Plan(int(min(host.bucket, host.num_kv_heads * n.max(initial=1))), layer_total)

  def head_counts(self, score: Array, level: Array, valid_1BKT: Array, n_B: Array) -> Array:
    """Kept tokens per (layer, row, KV head) ``[L, B, K]`` by the joint rule (``valid``: per
    head, `PromptKV.valid_1BKT`)."""
    l, b, kh, t = score.shape
    safe_B = jnp.maximum(1, jnp.floor(n_B * self.alpha_safeguard)).astype(jnp.int32)
    secured = select.own_rank(score, level, valid_1BKT) < safe_B[None, :, None, None]
    valid = jnp.broadcast_to(valid_1BKT, score.shape)
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

  def compress_layer(self, layer: PromptKV, index: int, ctx: Context, capacity: int, carry):
    score, level = self.scorer.scores(layer, ctx.kept_B)
    n_1BK = self.head_counts(score, level, layer.valid_1BKT, ctx.kept_B)
    return keep_best(layer, score, level, n_1BK, capacity), carry
