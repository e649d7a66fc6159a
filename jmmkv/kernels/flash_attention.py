"""Causal prompt attention, flash style: query blocks read only the key tiles at or before them.

`causal_attention` runs the plain-jnp `causal_attention_reference` on every backend for now (a
Pallas kernel for TPU/GPU is to come, beside it, as for the other kernels of this package).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp

from jmmkv.typing import MASK_VALUE, Array


def tile_scores(q_BKGQH, k_BKTH, valid_BT, rows_Q, j, key_block: int) -> Array:
  """Scores ``[B, K, G, Q, S]`` (float32) of (scaled) queries at slots ``rows_Q`` against key
  tile ``j`` of ``key_block`` keys; `MASK_VALUE` where the causal mask or padding hides a key."""
  tile = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, j * key_block, key_block, axis)
  s = jnp.einsum("BKGQH,BKSH->BKGQS", q_BKGQH, tile(k_BKTH, 2), preferred_element_type=jnp.float32)
  cols_S = j * key_block + jnp.arange(key_block)
  mask_BQS = (rows_Q[:, None] >= cols_S[None, :])[None] & tile(valid_BT, 1)[:, None, :]
  return jnp.where(mask_BQS[:, None, None], s, MASK_VALUE)


def causal_attention_reference(
  q_BTNH: Array,
  k_BKTH: Array,
  v_BKTH: Array,
  valid_BT: Array,
  query_block: int = 256,
  key_block: int = 512,
) -> Array:
  """Causal GQA attention of a prompt, flash style: each block of ``query_block`` queries reads
  only the ``key_block``-key tiles at or before its last query, with an online softmax, so the
  pairs the causal mask hides are neither scored nor stored. ``T`` must be a multiple of both
  blocks, and ``key_block`` of ``query_block``. Padding (``valid_BT`` false) is never a key.
  Returns ``[B, T, N, H]``."""
  b, t, n, h = q_BTNH.shape
  kh = k_BKTH.shape[1]
  if t % key_block or key_block % query_block:
    raise ValueError(f"T={t} must be a multiple of {key_block}, a multiple of {query_block}")
  g = n // kh

  def query_step(buf_BTNH, i):  # queries not yet reached, outputs of those done
    q_BQNH = jax.lax.dynamic_slice_in_dim(buf_BTNH, i * query_block, query_block, axis=1)
    q_BKGQH = einops.rearrange(q_BQNH, "B Q (K G) H -> B K G Q H", K=kh) * h**-0.5
    rows_Q = i * query_block + jnp.arange(query_block)

    def key_step(j, carry):
      o_BKGQH, m_BKGQ, l_BKGQ = carry
      s = tile_scores(q_BKGQH, k_BKTH, valid_BT, rows_Q, j, key_block)
      v_BKSH = jax.lax.dynamic_slice_in_dim(v_BKTH, j * key_block, key_block, 2)
      m_new = jnp.maximum(m_BKGQ, jnp.max(s, axis=-1))
      rescale = jnp.exp(m_BKGQ - m_new)
      e = jnp.exp(s - m_new[..., None])
      o_BKGQH = o_BKGQH * rescale[..., None] + jnp.einsum(
        "BKGQS,BKSH->BKGQH", e.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=jnp.float32
      )
      return o_BKGQH, m_new, l_BKGQ * rescale + jnp.sum(e, axis=-1)

    init = (
      jnp.zeros((b, kh, g, query_block, h), jnp.float32),
      jnp.full((b, kh, g, query_block), MASK_VALUE, jnp.float32),
      jnp.zeros((b, kh, g, query_block), jnp.float32),
    )
    tiles = (i * query_block + query_block + key_block - 1) // key_block
    o_BKGQH, _, l_BKGQ = jax.lax.fori_loop(0, tiles, key_step, init)
    o_BKGQH = o_BKGQH / l_BKGQ[..., None]
    o_BQNH = einops.rearrange(o_BKGQH, "B K G Q H -> B Q (K G) H").astype(q_BTNH.dtype)
    return jax.lax.dynamic_update_slice_in_dim(buf_BTNH, o_BQNH, i * query_block, axis=1), None

  # The output overwrites the queries block by block (each block reads its own queries first):
  # no output buffer is allocated, which XLA would otherwise create before the layer runs.
  out_BTNH, _ = jax.lax.scan(query_step, q_BTNH, jnp.arange(t // query_block))
  return out_BTNH


# The only implementation yet, on every backend; a Pallas kernel will be dispatched to here.
causal_attention = causal_attention_reference
