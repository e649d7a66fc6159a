"""What the allocation policies that wrap a scorer share (AdaKV: heads, PyramidKV: layers)."""

from __future__ import annotations

import dataclasses

from jmmkv.cache.policies.base import Base, Scorer
from jmmkv.cache.policies.snapkv import SnapKV


def scorer_from(name: str, kwargs: dict) -> Scorer:
  """The scorer a wrapper's ``scorer=`` setting names (a registered policy with ``scores``)."""
  from jmmkv.cache import policies  # the registry imports the wrappers

  scorer = policies.get(name, **kwargs)
  if not isinstance(scorer, Scorer):
    raise ValueError(f"scorer must name a scoring policy (one with scores()), got {name!r}")
  return scorer


class Wrapper(Base):
  """A policy around a `Scorer` (its ``scorer`` field; SnapKV by default). Its settings are its
  own fields, ``scorer`` (a registered scorer's name) and the scorer's settings."""

  @classmethod
  def settings(cls) -> tuple[str, ...]:
    own = [f.name for f in dataclasses.fields(cls) if f.name != "scorer"]
    return (*own, "scorer", *(f.name for f in dataclasses.fields(SnapKV)))

  @classmethod
  def from_kwargs(cls, scorer="snapkv", **kwargs):
    """``get("adakv", window=8, alpha_safeguard=0.5)``: its own settings to it, the rest to the
    scorer (built by name)."""
    own = {f.name for f in dataclasses.fields(cls)} - {"scorer"}
    mine = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
    if isinstance(scorer, str):
      scorer = scorer_from(scorer, kwargs)
    return cls(scorer=scorer, **mine)

  @property
  def stats(self):
    return self.scorer.stats

  def check_scorer(self) -> None:
    if not isinstance(self.scorer, Scorer):
      raise ValueError(f"{self.name} needs a scorer (a policy with scores()), got {self.scorer!r}")
