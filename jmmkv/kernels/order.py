"""Ordering for XLA's schedule, by data dependence (XLA CPU drops optimisation barriers).

XLA schedules work that nothing later needs as late as it likes, and duplicates cheap
elementwise producers into their consumers. Both can keep large prompt arrays alive longer than
the computation needs: a layer's K/V until the end of the prefill, the pre-RoPE keys beside the
RoPE'd ones. `after` makes an array depend on other values and be a buffer of its own, at the
cost of reading those values once (use small ones, or single elements).
"""

from __future__ import annotations

import jax.numpy as jnp

from jmmkv.typing import Array


def token(*xs: Array | None) -> Array:
  """A finite float32 scalar that depends on every element of ``xs`` (None skipped)."""
  total = sum(jnp.sum(x.astype(jnp.float32)) for x in xs if x is not None)
  return jnp.where(jnp.isfinite(total), total, 0.0)


def after(x: Array, *deps: Array | None) -> Array:
  """``x`` unchanged (``0 * token(deps)`` is added to its first element: exactly +-0), but not
  computable before ``deps``, and materialised (an in-place update of one element)."""
  zero = (token(*deps) * 0.0).astype(x.dtype)
  return x.at[(0,) * x.ndim].add(zero)
