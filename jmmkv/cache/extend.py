"""New tokens written into one layer's dense prefix, after each (row, KV head)'s kept slots: a
conversation's next turn (`jmmkv.turns`), an answer folded in (`jmmkv.cache.fold`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmmkv.typing import Array


def append_tokens(
  layer: tuple[Array, Array, Array, Array],
  k_BKTH: Array,
  v_BKTH: Array,
  positions_BT: Array,
  modality_BT: Array,
  count_B: Array,
  capacity: int,
) -> tuple[Array, Array, Array, Array]:
  """``layer`` = (k, v ``[B, K, C, H]``, positions, modality ``[B, K, C]``), its kept slots
  first (as every prefix stores them), widened to ``capacity`` slots with row b's first
  ``count_B[b]`` new tokens (``k_BKTH``, ``v_BKTH``, sequence ``positions_BT``, ``modality_BT``)
  in the slots after its kept ones, in every KV head. ``capacity`` must hold them; tokens that
  would land past it are dropped."""
  k_BKCH, v_BKCH, pos_BKC, mod_BKC = layer
  b, kh, c = pos_BKC.shape
  t = k_BKTH.shape[2]
  kept_BK = (pos_BKC >= 0).sum(-1)
  new_T = jnp.arange(t)
  dest_BKT = jnp.where(
    (new_T[None] < count_B[:, None])[:, None], kept_BK[..., None] + new_T, capacity
  )
  per_head = lambda x_BT: jnp.broadcast_to(x_BT[:, None], (b, kh, t))

  def put(x, fill, new):
    """``new`` written at ``dest`` of each (row, KV head): a scatter whose row and head are
    batch dimensions (vmapped), so that under a mesh each device writes its own rows and heads
    (explicit row and head indices made XLA gather the new tokens to every device)."""
    widths = [(0, 0), (0, 0), (0, capacity - c)] + [(0, 0)] * (x.ndim - 3)
    one = lambda x_C, dest_T, new_T: x_C.at[dest_T].set(new_T, mode="drop")
    return jax.vmap(jax.vmap(one))(jnp.pad(x, widths, constant_values=fill), dest_BKT, new)

  return (
    put(k_BKCH, 0, k_BKTH.astype(k_BKCH.dtype)),
    put(v_BKCH, 0, v_BKTH.astype(v_BKCH.dtype)),
    put(pos_BKC, -1, per_head(positions_BT).astype(pos_BKC.dtype)),
    put(mod_BKC, 0, per_head(modality_BT).astype(mod_BKC.dtype)),
  )
