"""Policy registry: ``get(name, **hyperparameters)`` builds any policy; ``NAMES`` lists them;
``register(name, cls)`` adds one of your own (docs/adding_a_policy.md); ``from_spec`` parses a
command-line spec such as ``"lookm:keep_all_text=false:merge=average"``."""

from __future__ import annotations

import ast

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
NAMES = tuple(POLICIES)  # the built-in policies


def register(name: str, cls, *, replace: bool = False):
  """Makes ``get(name)`` build ``cls`` (a frozen dataclass with ``stats``, ``capacity`` and
  ``compress``; see `jmmkv.cache.policies.base`). Returns ``cls``, so it works as a decorator
  factory's target: ``register("mine", Mine)``."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"a policy name must be a non-empty string, got {name!r}")
  if name in POLICIES and not replace:
    raise ValueError(f"policy {name!r} already exists; pass replace=True to override it")
  missing = [a for a in ("stats", "capacity", "compress") if not hasattr(cls, a)]
  if missing:
    raise TypeError(f"{getattr(cls, '__name__', cls)} lacks {', '.join(missing)}: not a policy")
  params = getattr(cls, "__dataclass_params__", None)
  if params is None or not params.frozen:
    raise TypeError(f"{cls.__name__} must be a frozen dataclass (policies are static under jit)")
  POLICIES[name] = cls
  return cls


def get(name: str, **hyperparameters):
  """Builds the policy ``name`` with the given hyperparameters (the paper defaults otherwise)."""
  if name not in POLICIES:
    raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
  cls = POLICIES[name]
  build = getattr(cls, "from_kwargs", cls)  # wrappers route their scorer's settings
  return build(**hyperparameters)


def _value(text: str):
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  if text.lower() == "none":
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word: a string


def spec_kwargs(spec: str) -> tuple[str, dict]:
  """``"name:key=value:key=value"`` -> (name, hyperparameters); values are Python literals,
  ``true`` / ``false`` / ``none``, or bare words (strings)."""
  name, *items = spec.strip().split(":")
  kwargs = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"policy spec {spec!r}: expected key=value after ':', got {item!r}")
    kwargs[key.strip()] = _value(text.strip())
  return name.strip(), kwargs


def from_spec(spec: str, **defaults):
  """The policy a spec names (`spec_kwargs`); the spec's values override ``defaults``."""
  name, kwargs = spec_kwargs(spec)
  try:
    return get(name, **(defaults | kwargs))
  except TypeError as e:  # an unknown hyperparameter
    raise ValueError(f"policy spec {spec!r}: {e}") from None
