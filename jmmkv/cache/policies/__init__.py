"""Policy registry: ``get(name, **hyperparameters)`` builds any policy; ``NAMES`` lists them;
``register(name, cls)`` adds one of your own (docs/adding_a_policy.md); ``from_spec`` parses a
command-line spec such as ``"lookm:keep_all_text=false,merge=average"`` (settings after the
name's colon, separated by commas or colons); ``spec_list`` a comma-separated list of them;
``settings(name)`` what a policy takes; ``as_policy`` turns what users pass into a policy."""

from __future__ import annotations

import ast
import dataclasses
import json
import re

from jmmkv.cache.policies.adakv import AdaKV
from jmmkv.cache.policies.base import Policy
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


def _protocol_gaps(obj) -> list[str]:
  """The members of the `Policy` protocol that ``obj`` (a class or an instance) lacks."""
  members = dict.fromkeys([*Policy.__annotations__, *(m for m in vars(Policy) if m[0] != "_")])
  return [m for m in members if not hasattr(obj, m)]


def register(name: str, cls, *, replace: bool = False):
  """Makes ``get(name)`` build ``cls``: a frozen dataclass that satisfies
  `jmmkv.cache.policies.base.Policy` (most simply a `Scorer` subclass with a ``scores``
  method). Returns ``cls``: ``register("mine", Mine)``."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"a policy name must be a non-empty string, got {name!r}")
  if name in POLICIES and not replace:
    raise ValueError(f"policy {name!r} already exists; pass replace=True to override it")
  missing = _protocol_gaps(cls)
  if missing:
    raise TypeError(f"{getattr(cls, '__name__', cls)} lacks {', '.join(missing)}: not a policy")
  params = getattr(cls, "__dataclass_params__", None)
  if params is None or not params.frozen:
    raise TypeError(f"{cls.__name__} must be a frozen dataclass (policies are static under jit)")
  POLICIES[name] = cls
  return cls


def settings(name: str) -> tuple[str, ...]:
  """The hyperparameters policy ``name`` takes: its dataclass fields, or what its ``settings()``
  class method lists (wrappers such as AdaKV, whose ``from_kwargs`` routes its scorer's)."""
  if name not in POLICIES:
    raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
  cls = POLICIES[name]
  if hasattr(cls, "settings"):
    return tuple(cls.settings())
  return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def get(name: str, **hyperparameters):
  """Builds the policy ``name`` with the given hyperparameters (the paper defaults otherwise).
  An unknown hyperparameter is a ValueError listing the policy's `settings`."""
  valid = settings(name)
  unknown = [k for k in hyperparameters if k not in valid]
  if unknown:
    takes = f"its settings: {', '.join(valid)}" if valid else "it takes none"
    raise ValueError(f"policy {name!r} has no setting {unknown[0]!r}; {takes}")
  cls = POLICIES[name]
  build = getattr(cls, "from_kwargs", cls)  # wrappers route their scorer's settings
  return build(**hyperparameters)


KEYWORDS = {"true": True, "false": False, "none": None, "null": None}


def setting(item: str, where: str) -> tuple[str, object]:
  """``"key=value"`` -> (key, value): ``true`` / ``false`` / ``none`` / ``null`` (any case), else
  JSON, else a Python literal (a tuple such as ``(1, 1)``), else the bare word as a string.
  ``where`` names the argument in the error."""
  key, sep, text = item.partition("=")
  key, text = key.strip(), text.strip()
  if not sep or not key:
    raise ValueError(
      f"{where}: expected key=value, got {item!r} (settings: name:key=value,key=value; a tuple "
      "in brackets: split=(1,1))"
    )
  if text.lower() in KEYWORDS:
    return key, KEYWORDS[text.lower()]
  try:
    return key, json.loads(text)
  except json.JSONDecodeError:
    pass
  try:
    return key, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return key, text


# Commas (and colons) outside brackets: "split=(1,1)" stays whole.
_SEPARATORS = {",": r",(?![^(\[]*[)\]])", ":,": r"[:,](?![^(\[]*[)\]])"}


def spec_kwargs(spec: str) -> tuple[str, dict]:
  """``"name:key=value,key=value"`` (or ``name:key=value:key=value``) -> (name, hyperparameters),
  values read as `setting` reads them; a tuple value is written in brackets: ``split=(1,1)``."""
  name, _, rest = spec.strip().partition(":")
  items = [s for s in re.split(_SEPARATORS[":,"], rest) if s.strip()]
  return name.strip(), dict(setting(item, f"policy spec {spec!r}") for item in items)


def split_specs(text: str) -> list[str]:
  """A comma-separated list of specs, split at commas outside brackets; an item that is a
  setting (``key=value``, no policy name) belongs to the spec before it:
  ``"full,snapkv:window=8,kernel=5,meda:split=(1,1)"`` ->
  ``["full", "snapkv:window=8,kernel=5", "meda:split=(1,1)"]``."""
  out: list[str] = []
  for item in (s.strip() for s in re.split(_SEPARATORS[","], text)):
    if not item:
      continue
    if "=" in item.partition(":")[0]:  # a setting, not a name
      if not out:
        raise ValueError(f"setting {item!r} comes before any policy name in {text!r}")
      out[-1] += ("," if ":" in out[-1] else ":") + item
    else:
      out.append(item)
  return out


def spec_list(text: str) -> list[str]:
  """The specs of a comma-separated list (`split_specs`), ``all`` standing for every built-in
  name (`NAMES`), each spec once (first occurrence kept). Every spec is built once, so unknown
  names and settings fail here, before any work."""
  specs = split_specs(text)
  if not specs:
    raise ValueError("the list of policies is empty")
  expanded = (n for s in specs for n in (NAMES if s == "all" else [s]))
  out = list(dict.fromkeys(expanded))
  for spec in out:
    from_spec(spec)
  return out


def from_spec(spec: str, **defaults):
  """The policy a spec names (`spec_kwargs`); the spec's values override ``defaults``."""
  name, kwargs = spec_kwargs(spec)
  try:
    return get(name, **(defaults | kwargs))
  except TypeError as e:  # e.g. a policy class that needs an argument
    raise ValueError(f"policy spec {spec!r}: {e}") from None


def as_policy(policy) -> Policy:
  """``policy`` as a policy object: None is `Full`, a string a spec for `from_spec`
  (``"snapkv"``, ``"snapkv:window=8"``); an instance of a `Policy` passes through."""
  if policy is None:
    return Full()
  if isinstance(policy, str):
    return from_spec(policy)
  if isinstance(policy, type):
    raise TypeError(
      f"policy must be a policy instance or a name, got the class {policy.__name__}: "
      f"use {policy.__name__}() or jmmkv.policies.get(name)"
    )
  if not isinstance(policy, Policy):
    gaps = _protocol_gaps(policy)
    lacks = f" (it lacks {', '.join(gaps)})" if gaps else ""
    raise TypeError(
      "policy must be a policy (jmmkv.policies.get(name)), a name or spec string, or None; "
      f"got {type(policy).__name__}{lacks}"
    )
  return policy
