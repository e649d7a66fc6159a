"""KV budgets: a fraction of each row's prompt (the papers' convention) or a token count."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import jax.numpy as jnp

from jmmkv.typing import Array


@dataclasses.dataclass(frozen=True)
class Budget:
  """How much of the prompt KV to keep: ``ratio`` in (0, 1] or ``tokens`` >= 1 (per layer and KV
  head on average). Exactly one must be given. A budget >= the prompt length keeps everything."""

  ratio: float | None = None
  tokens: int | None = None

  def __post_init__(self):
    if (self.ratio is None) == (self.tokens is None):
      raise ValueError(f"give exactly one of Budget(ratio=...) or Budget(tokens=...), got {self}")
    if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
      raise ValueError(f"Budget ratio must be in (0, 1], got {self.ratio}")
    if self.tokens is not None and (int(self.tokens) != self.tokens or self.tokens < 1):
      raise ValueError(f"Budget tokens must be a positive integer, got {self.tokens}")

  @property
  def fraction(self) -> tuple[int, int]:
    """``ratio`` as an exact fraction p / q (q <= 1000), so that ceil(ratio * T) is integer math."""
    f = Fraction(self.ratio).limit_denominator(1000)
    return f.numerator, f.denominator

  def kept(self, prompt_len: int) -> int:
    """Tokens kept per layer and KV head for a prompt of ``prompt_len`` tokens:
    ``min(T, max(1, ceil(ratio * T)))`` or ``min(T, tokens)``."""
    if self.ratio is not None:
      p, q = self.fraction
      return min(prompt_len, max(1, -(-prompt_len * p // q)))
    return min(prompt_len, int(self.tokens))

  def kept_B(self, lengths_B: Array) -> Array:
    """`kept` for every row of a batch, under jit: ``[B]`` int32."""
    lengths_B = lengths_B.astype(jnp.int32)
    if self.ratio is not None:
      p, q = self.fraction
      return jnp.clip(-(-lengths_B * p // q), 1, lengths_B)
    return jnp.minimum(lengths_B, int(self.tokens))


FULL = Budget(ratio=1.0)
