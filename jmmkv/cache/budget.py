"""KV budgets: a fraction of each row's prompt (the papers' convention) or a token count."""

from __future__ import annotations

import dataclasses
import numbers
from fractions import Fraction

import jax.numpy as jnp

from jmmkv.typing import Array

# Largest denominator of a ratio: q * q < 2**31, so ceil(T p / q) is exact int32 math under jit.
MAX_DENOMINATOR = 40_000


@dataclasses.dataclass(frozen=True)
class Budget:
  """How much of the prompt KV to keep: ``ratio`` in (0, 1] or ``tokens`` >= 1 (per layer and KV
  head on average). Exactly one must be given. A budget >= the prompt length keeps everything."""

  ratio: float | None = None
  tokens: int | None = None

  def __post_init__(self):
    if (self.ratio is None) == (self.tokens is None):
      raise ValueError(f"give exactly one of Budget(ratio=...) or Budget(tokens=...), got {self}")
    if self.ratio is not None:
      if not isinstance(self.ratio, numbers.Real) or isinstance(self.ratio, bool):
        raise ValueError(f"Budget ratio must be a number in (0, 1], got {self.ratio!r}")
      if not 0.0 < self.ratio <= 1.0:
        raise ValueError(f"Budget ratio must be in (0, 1], got {self.ratio}")
      object.__setattr__(self, "ratio", float(self.ratio))
    if self.tokens is not None:
      if not isinstance(self.tokens, numbers.Integral) or isinstance(self.tokens, bool):
        raise ValueError(f"Budget tokens must be a positive integer, got {self.tokens!r}")
      if self.tokens < 1:
        raise ValueError(f"Budget tokens must be a positive integer, got {self.tokens}")
      object.__setattr__(self, "tokens", int(self.tokens))

  @property
  def fraction(self) -> tuple[int, int]:
    """``ratio`` as p / q: the decimal it prints as (0.2 is 1/5, 0.0004 is 1/2500), or the
    closest fraction with q <= `MAX_DENOMINATOR` when that needs a larger q (1/3 stays 1/3)."""
    f = Fraction(repr(self.ratio)).limit_denominator(MAX_DENOMINATOR)
    return f.numerator, f.denominator

  def kept(self, prompt_len: int) -> int:
    """Tokens kept per layer and KV head for a prompt of ``prompt_len`` tokens:
    ``min(T, max(1, ceil(ratio * T)))`` or ``min(T, tokens)``."""
    if self.ratio is not None:
      p, q = self.fraction
      return min(prompt_len, max(1, -(-prompt_len * p // q)))
    return min(prompt_len, self.tokens)

  def kept_B(self, lengths_B: Array) -> Array:
    """`kept` for every row of a batch, under jit: ``[B]`` int32."""
    lengths_B = lengths_B.astype(jnp.int32)
    if self.ratio is not None:
      p, q = self.fraction
      whole, rest = lengths_B // q, lengths_B % q  # ceil(T p / q) without overflowing T * p
      return jnp.clip(whole * p - (-rest * p // q), 1, lengths_B)
    return jnp.minimum(lengths_B, self.tokens)


FULL = Budget(ratio=1.0)
