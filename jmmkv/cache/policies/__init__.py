"""Policy registry: ``get(name, **hyperparameters)`` builds any policy; ``NAMES`` lists them."""

from __future__ import annotations

from jmmkv.cache.policies.full import Full

POLICIES = {"full": Full}
NAMES = tuple(POLICIES)


def get(name: str, **hyperparameters):
  """Builds the policy ``name`` with the given hyperparameters (the paper defaults otherwise)."""
  if name not in POLICIES:
    raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(NAMES)}")
  return POLICIES[name](**hyperparameters)
