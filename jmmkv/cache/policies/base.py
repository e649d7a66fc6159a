"""What every policy sees (`PromptKV`: the prompt K/V after prefill) and returns (`Prefix`: a
static-capacity prefix), both defined in `jmmkv.cache.prompt`, and helpers policies share.

A policy is a frozen, hashable dataclass (static under jit) with a ``stats`` attribute (the
`StatsSpec` of prefill statistics it scores with) and two pure methods:
``capacity(budget, prompt_len) -> C`` on the host, and ``compress(prompt, budget, C) -> Prefix``
under jit.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax.numpy as jnp

from jmmkv.cache.prompt import Prefix, PromptKV  # noqa: F401 (policies import them from here)


def uniform_capacity(budget, prompt_len: int, name: str) -> int:
  """Static prefix capacity C of a policy that keeps the same count in every layer and head."""
  if budget is None:
    raise ValueError(
      f"policy {name!r} needs a budget: jmmkv.Budget(ratio=...) or Budget(tokens=...)"
    )
  return budget.kept(prompt_len)


def kept_counts(budget, prompt: PromptKV):
  """Per (layer, row, KV head) kept counts ``[L, B, K]`` of a uniform budget (row-dependent)."""
  l, b, kh = prompt.k.shape[:3]
  return jnp.broadcast_to(budget.kept_B(prompt.lengths_B)[None, :, None], (l, b, kh))


_KINDS = {
  "bool": ("true or false", lambda x: isinstance(x, bool)),
  "int": ("an integer", lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool)),
  "float": (
    "a finite number",
    lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x),
  ),
  "str": ("a string", lambda x: isinstance(x, str)),
  "tuple": ("a tuple", lambda x: isinstance(x, tuple)),
}


def check_fields(policy) -> None:
  """Raises a clear ValueError when a setting of ``policy`` (a dataclass whose annotations are
  strings such as ``"int"`` or ``"str | None"``) has the wrong type: a string or 1 for a bool, a
  float or bool for an int, NaN or infinity for a float. A list given for a tuple becomes one
  (``meda:split=[1,1]``). Settings of other types (e.g. a wrapped scorer) are not checked."""
  for f in dataclasses.fields(policy):
    kinds = str(f.type).replace(" ", "").split("|")
    value = getattr(policy, f.name)
    kind = kinds[0].split("[")[0]
    if kind not in _KINDS or (value is None and "None" in kinds):
      continue
    if kind == "tuple" and isinstance(value, list):
      value = tuple(value)
      object.__setattr__(policy, f.name, value)
    what, ok = _KINDS[kind]
    if not ok(value):
      none = " or None" if "None" in kinds else ""
      raise ValueError(f"{policy.name}: {f.name} must be {what}{none}, got {value!r}")
