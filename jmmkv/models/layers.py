"""The few shared building blocks: an einsum-owning projection and RMSNorm."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmmkv.typing import Array, DType

# HF ``hidden_act`` names -> functions (exact-erf "gelu", tanh approximations, CLIP's quick_gelu).
ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class Einsum(nn.Module):
  """Owns weight ``w`` (and optional bias ``b``); the equation is written at the call site."""

  shape: Sequence[int]
  bias_shape: Sequence[int] | None = None
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, eqn: str, x: Array, merge_leading: int = 0) -> Array:
    """``merge_leading`` > 1 views the first dims of ``w`` as one (e.g. o_proj's ``[N, H, D]`` as
    ``[N*H, D]``): a row-major reshape, which spares XLA a transposed copy of ``w`` per call."""
    w = self.param("w", nn.initializers.normal(0.02), tuple(self.shape), self.dtype)
    if merge_leading > 1:
      w = w.reshape(-1, *w.shape[merge_leading:])
    y = jnp.einsum(eqn, x, w)
    if self.bias_shape is not None:
      y = y + self.param("b", nn.initializers.normal(0.02), tuple(self.bias_shape), self.dtype)
    return y


class RMSNorm(nn.Module):
  """HF Llama RMSNorm: normalise in float32, cast back, then scale. ``plus_one`` (Gemma): scale
  by ``1 + w`` in float32, then cast."""

  eps: float = 1e-6
  dtype: DType = jnp.float32
  plus_one: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), self.dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
    if self.plus_one:
      return (x32 * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale * x32.astype(x.dtype)
