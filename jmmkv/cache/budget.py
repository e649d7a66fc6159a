"""KV budgets: a fraction of each row's prompt (the papers' convention) or a token count."""

from __future__ import annotations

import dataclasses
import math


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

  def kept(self, prompt_len: int) -> int:
    """Tokens kept per layer and KV head for a prompt of ``prompt_len`` tokens."""
    if self.ratio is not None:
      return min(prompt_len, max(1, math.ceil(self.ratio * prompt_len)))
    return min(prompt_len, int(self.tokens))


FULL = Budget(ratio=1.0)
