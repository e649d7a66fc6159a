"""GQA attention: a prompt's causal attention without statistics (`causal_attention`; with them:
`jmmkv.cache.stats.attention`) and decode attention over the prefix + append buffers.

KV heads are never repeated: queries are viewed as [.., K, G, ..] and each group reads its KV head.
Scores and softmax run in float32 whatever the activation dtype.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp

from jmmkv.kernels import decode_attention as paged_kernel
from jmmkv.typing import Array

# A finite "minus infinity": fully masked rows stay NaN-free and vanish when blocks are merged.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _partial(q_BKGH: Array, k_BKSH: Array, v_BKSH: Array, valid_BKS: Array):
  """Unnormalised attention over one block: (output sum, row max, exp-sum)."""
  scale = q_BKGH.shape[-1] ** -0.5
  s_BKGS = jnp.einsum("BKGH,BKSH->BKGS", q_BKGH, k_BKSH, preferred_element_type=jnp.float32) * scale
  s_BKGS = jnp.where(valid_BKS[:, :, None, :], s_BKGS, MASK_VALUE)
  m_BKG = jnp.max(s_BKGS, axis=-1)
  p_BKGS = jnp.exp(s_BKGS - m_BKG[..., None])
  o_BKGH = jnp.einsum("BKGS,BKSH->BKGH", p_BKGS, v_BKSH.astype(jnp.float32))
  return o_BKGH, m_BKG, jnp.sum(p_BKGS, axis=-1)


def _merge(o1, m1, l1, o2, m2, l2):
  m = jnp.maximum(m1, m2)
  a1, a2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
  return (o1 * a1[..., None] + o2 * a2[..., None]) / (l1 * a1 + l2 * a2)[..., None]


def causal_attention(
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

  def query_step(_, i):
    q_BQNH = jax.lax.dynamic_slice_in_dim(q_BTNH, i * query_block, query_block, axis=1)
    q_BKGQH = einops.rearrange(q_BQNH, "B Q (K G) H -> B K G Q H", K=kh) * h**-0.5
    rows_Q = i * query_block + jnp.arange(query_block)

    def key_step(j, carry):
      o_BKGQH, m_BKGQ, l_BKGQ = carry
      tile = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, j * key_block, key_block, axis)
      k_BKSH, v_BKSH, kvalid_BS = tile(k_BKTH, 2), tile(v_BKTH, 2), tile(valid_BT, 1)
      s = jnp.einsum("BKGQH,BKSH->BKGQS", q_BKGQH, k_BKSH, preferred_element_type=jnp.float32)
      cols_S = j * key_block + jnp.arange(key_block)
      mask_BQS = (rows_Q[:, None] >= cols_S[None, :])[None] & kvalid_BS[:, None, :]
      s = jnp.where(mask_BQS[:, None, None], s, MASK_VALUE)
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
    return None, einops.rearrange(o_BKGQH, "B K G Q H -> B Q (K G) H").astype(q_BTNH.dtype)

  _, out_CBQNH = jax.lax.scan(query_step, None, jnp.arange(t // query_block))
  return einops.rearrange(out_CBQNH, "C B Q N H -> B (C Q) N H")


def decode_attention(
  q_BNH: Array,
  prefix_k_BKCH: Array,
  prefix_v_BKCH: Array,
  prefix_valid_BKC: Array,
  append_k_BKMH: Array,
  append_v_BKMH: Array,
  append_valid_BKM: Array,
) -> Array:
  """One query token over the compressed prefix and the append buffer. Returns ``[B, N, H]``."""
  q_BKGH = einops.rearrange(q_BNH, "B (K G) H -> B K G H", K=prefix_k_BKCH.shape[1])
  o1, m1, l1 = _partial(q_BKGH, prefix_k_BKCH, prefix_v_BKCH, prefix_valid_BKC)
  o2, m2, l2 = _partial(q_BKGH, append_k_BKMH, append_v_BKMH, append_valid_BKM)
  o_BKGH = _merge(o1, m1, l1, o2, m2, l2)
  return einops.rearrange(o_BKGH, "B K G H -> B (K G) H").astype(q_BNH.dtype)


def paged_decode_attention(
  q_BNH: Array,
  k_PSH: Array,
  v_PSH: Array,
  valid_PS: Array,
  owner_P: Array,
  append_k_BKMH: Array,
  append_v_BKMH: Array,
  append_valid_BKM: Array,
) -> Array:
  """One query token over a paged prefix (pages owned by ``b * K + kv_head``, see
  `jmmkv.cache.paged`) and the dense append buffer. Reads only the stored pages. ``[B, N, H]``."""
  b, kh = append_k_BKMH.shape[:2]
  q_BKGH = einops.rearrange(q_BNH, "B (K G) H -> B K G H", K=kh)
  o_OGH, m_OG, l_OG = paged_kernel.paged_partials(
    einops.rearrange(q_BKGH, "B K G H -> (B K) G H"),
    k_PSH,
    v_PSH,
    valid_PS,
    owner_P,
    scale=q_BNH.shape[-1] ** -0.5,
  )
  split = lambda x: x.reshape(b, kh, *x.shape[1:])
  o2, m2, l2 = _partial(q_BKGH, append_k_BKMH, append_v_BKMH, append_valid_BKM)
  o_BKGH = _merge(split(o_OGH), split(m_OG), split(l_OG), o2, m2, l2)
  return einops.rearrange(o_BKGH, "B K G H -> B (K G) H").astype(q_BNH.dtype)
