"""Policy registry: ``get(name, **hyperparameters)`` builds any policy; ``NAMES`` lists them."""

from __future__ import annotations

from jmmkv.cache.policies.adakv import AdaKV
from jmmkv.cache.policies.full import Full
from jmmkv.cache.policies.h2o import H2O
from jmmkv.cache.policies.lookm import LookM
from jmmkv.cache.policies.madakv import MadaKV
from jmmkv.cache.policies.meda import MEDA
from jmmkv.cache.policies.pyramidkv import PyramidKV
from jmmkv.cache.policies.snapkv import SnapKV
from jmmkv.cache.policies.streaming import StreamingLLM

POLICIES = {
  "full": Full,
  "streaming": StreamingLLM,
  "h2o": H2O,
  "snapkv": SnapKV,
  "pyramidkv": PyramidKV,
  "adakv": AdaKV,
  "lookm": LookM,
  "meda": MEDA,
  "madakv": MadaKV,
}
NAMES = tuple(POLICIES)


def get(name: str, **hyperparameters):
  """Builds the policy ``name`` with the given hyperparameters (the paper defaults otherwise)."""
  if name not in POLICIES:
    raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(NAMES)}")
  cls = POLICIES[name]
  build = getattr(cls, "from_kwargs", cls)  # wrappers route their scorer's settings
  return build(**hyperparameters)
