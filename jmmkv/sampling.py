"""Token sampling: greedy, temperature, top-k and top-p (applied in that order, as transformers)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmmkv.typing import Array


@dataclasses.dataclass(frozen=True)
class Sampling:
  """``temperature=0`` is greedy (argmax, ties to the lower id); otherwise a categorical draw from
  ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits and then to the
  smallest set whose probability reaches ``top_p``."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
      raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
      raise ValueError("top_k/top_p need temperature > 0 (temperature=0 means greedy)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def filter(self, logits_BV: Array) -> Array:
    """Temperature-scaled float32 logits with filtered-out tokens set to -inf."""
    x = logits_BV.astype(jnp.float32) / self.temperature
    if self.top_k is not None and self.top_k < x.shape[-1]:
      kth_B1 = jax.lax.top_k(x, self.top_k)[0][:, -1:]
      x = jnp.where(x < kth_B1, -jnp.inf, x)
    if self.top_p is not None and self.top_p < 1.0:
      order_BV = jnp.argsort(-x, axis=-1)
      p_sorted = jax.nn.softmax(jnp.take_along_axis(x, order_BV, axis=-1), axis=-1)
      # Keep a token while the mass strictly before it is < top_p (the first is always kept).
      keep_sorted = (jnp.cumsum(p_sorted, axis=-1) - p_sorted) < self.top_p
      keep = (
        jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order_BV].set(keep_sorted)
      )
      x = jnp.where(keep, x, -jnp.inf)
    return x

  def __call__(self, logits_BV: Array, key: Array) -> Array:
    """Next token ids ``[B]`` (int32)."""
    if self.greedy:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, self.filter(logits_BV), axis=-1).astype(jnp.int32)
