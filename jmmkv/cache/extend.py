"""New tokens written into one layer's dense prefix, after each (row, KV head)'s kept slots: a
conversation's next turn (`jmmkv.turns`), an answer folded in (`jmmkv.cache.fold`)."""

from __future__ import annotations

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
  rows_BKT = jnp.broadcast_to(jnp.arange(b)[:, None, None], dest_BKT.shape)
  heads_BKT = jnp.broadcast_to(jnp.arange(kh)[None, :, None], dest_BKT.shape)
  at = (rows_BKT, heads_BKT, dest_BKT)
  per_head = lambda x_BT: jnp.broadcast_to(x_BT[:, None], (b, kh, t))

  def widen(x, fill):
    widths = [(0, 0), (0, 0), (0, capacity - c)] + [(0, 0)] * (x.ndim - 3)
    return jnp.pad(x, widths, constant_values=fill)

  return (
    widen(k_BKCH, 0).at[at].set(k_BKTH.astype(k_BKCH.dtype), mode="drop"),
    widen(v_BKCH, 0).at[at].set(v_BKTH.astype(v_BKCH.dtype), mode="drop"),
    widen(pos_BKC, -1).at[at].set(per_head(positions_BT).astype(pos_BKC.dtype), mode="drop"),
    widen(mod_BKC, 0).at[at].set(per_head(modality_BT).astype(mod_BKC.dtype), mode="drop"),
  )
