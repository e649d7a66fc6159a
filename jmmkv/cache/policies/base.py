"""The policy interface: a policy compresses one layer at a time, inside the prefill.

The prefill (`jmmkv.cache.stream`) runs the decoder layer by layer; right after a layer's
attention it hands the policy that layer's prompt K/V and statistics, stores what the policy
keeps, and drops the rest, so that at most one layer's full prompt K/V is alive. The driver turns
the budget into kept counts once (``Context.kept_B``); no policy reads or validates a budget.

A policy is a frozen, hashable dataclass (static under jit) that satisfies `Policy`:

- ``stats``: the `StatsSpec` (a frozenset of `jmmkv.cache.stats.Statistic`) of per-layer
  prefill statistics it scores with, read as ``layer.stats[name]``;
- ``survey``: statistics of *every* layer it needs before compressing the first (MEDA's layer
  entropies; `NONE` for the others): the driver then runs a first pass that keeps no K/V;
- ``plan(host) -> Plan`` (host side): static bounds on what it keeps;
- ``start(ctx) -> carry`` and ``compress_layer(layer, index, ctx, capacity, carry) ->
  (Kept, carry)`` under jit; the carry is any pytree passed from layer to layer (MadaKV's HCC
  budget, MEDA's layer budgets).

Most policies are a **scorer** (`Scorer`: a ``scores(layer, kept_B) -> (score, level)`` method)
and inherit the rest: every (layer, row, KV head) keeps its ``kept_B`` best candidates. AdaKV
(head allocation) and PyramidKV (layer allocation) wrap any scorer. Policies that build a keep
mask themselves (LOOK-M, MEDA, MadaKV) implement ``compress_layer``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import jax.numpy as jnp
import numpy as np

from jmmkv.cache import select
from jmmkv.cache.prompt import Prefix, PromptKV  # noqa: F401 (policies import them from here)
from jmmkv.cache.stats import NONE, Stats, StatsSpec
from jmmkv.typing import IMAGE, VIDEO, Array


class HostPrompt(NamedTuple):
  """What the driver knows on the host before the prefill (NumPy arrays)."""

  lengths_B: np.ndarray  # [B] prompt lengths
  kept_B: np.ndarray  # [B] the budget's kept count per (layer, KV head); the length without one
  valid_BT: np.ndarray  # [B, T] bool (T: the padded bucket)
  modality_BT: np.ndarray  # [B, T] int32
  num_layers: int
  num_kv_heads: int
  survey: Stats = {}  # the survey pass's statistics {name: [L, ...]} (NumPy), when asked for

  @property
  def bucket(self) -> int:  # T
    return self.valid_BT.shape[1]

  def text_beside_visual_B(self) -> np.ndarray:
    """[B] text tokens of the rows that hold image or video tokens (0 in text-only rows): the
    most a text-prior policy (LOOK-M, MEDA) keeps beyond its budget."""
    mod = self.modality_BT
    visual_B = (((mod == IMAGE) | (mod == VIDEO)) & self.valid_BT).sum(1)
    return np.where(visual_B > 0, self.lengths_B - visual_B, 0)


class Plan(NamedTuple):
  """Static bounds on what a policy keeps, from `Policy.plan`."""

  capacity: int  # the most slots any (layer, row, KV head) keeps
  total: int | None = None  # the most slots kept summed over (layer, row, KV head), when far below
  # L * B * K * capacity (per-head or per-layer allocation): the driver may then store the kept
  # slots in a page pool sized by it instead of a dense [B, K, capacity] prefix per layer


class Context(NamedTuple):
  """What every layer's compression shares, under jit."""

  kept_B: Array  # [B] int32: the budget's kept count per (layer, KV head)
  lengths_B: Array  # [B] int32
  survey: Stats  # [L, ...] the survey pass's statistics (empty without one)
  num_layers: int  # static


class Kept(NamedTuple):
  """What a policy keeps of one layer."""

  positions: Array | None  # [1, B, K, C] kept positions, ascending, -1 last; None: every token
  k: Array | None = None  # [1, B, K, C, H] the kept slots' K/V when the policy changed them
  v: Array | None = None  # (merging); None: the layer's own at those positions


@runtime_checkable
class Policy(Protocol):
  """What `jmmkv.generate` needs of a policy (module docstring)."""

  name: ClassVar[str]
  stats: StatsSpec
  survey: StatsSpec
  needs_budget: bool

  def plan(self, host: HostPrompt) -> Plan: ...

  def start(self, ctx: Context) -> Any: ...

  def compress_layer(
    self, layer: PromptKV, index: int, ctx: Context, capacity: int, carry: Any
  ) -> tuple[Kept, Any]: ...


class Base:
  """Defaults for a policy: no survey, needs a budget, no carry, the uniform plan (every (layer,
  row, KV head) keeps at most the budget's count)."""

  stats: ClassVar[StatsSpec] = NONE
  survey: ClassVar[StatsSpec] = NONE
  needs_budget: ClassVar[bool] = True

  def plan(self, host: HostPrompt) -> Plan:
    return Plan(int(host.kept_B.max(initial=1)))

  def start(self, ctx: Context):
    return None


class Scorer(Base):
  """A policy from a score: per (layer, row, KV head) the ``kept_B`` candidates first by (level
  desc, score desc, position asc). Subclasses define ``scores``."""

  def scores(self, layer: PromptKV, kept_B: Array) -> tuple[Array, Array]:
    """(score, level) ``[1, B, K, T]`` of one layer's candidates (``kept_B``: the counts)."""
    raise NotImplementedError

  def compress_layer(self, layer: PromptKV, index: int, ctx: Context, capacity: int, carry):
    score, level = self.scores(layer, ctx.kept_B)
    return keep_best(layer, score, level, ctx.kept_B[None, :, None], capacity), carry


def keep_best(layer: PromptKV, score: Array, level: Array, n: Array, capacity: int) -> Kept:
  """The shared selection: per (layer, row, KV head) the first ``n`` (``[1, B, K]`` or
  broadcastable to it) candidates by (level desc, score desc, position asc); padding is never
  kept."""
  n_1BK = jnp.broadcast_to(n, score.shape[:3])
  return Kept(select.top_positions(score, level, layer.valid_1BKT, n_1BK, capacity))


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
