"""GQA decode attention over the prefix + append buffers (prefill: `jmmkv.cache.stats.attention`).

KV heads are never repeated: queries are viewed as [.., K, G, ..] and each group reads its KV head.
Scores and softmax run in float32 whatever the activation dtype.
"""

from __future__ import annotations

import einops
import jax.numpy as jnp

from jmmkv.kernels import decode_attention as paged_kernel
from jmmkv.typing import MASK_VALUE, Array


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


def ring_decode_attention(q_BNH: Array, k_BKRH: Array, v_BKRH: Array, valid_BKR: Array) -> Array:
  """One query token over a sliding-window layer's ring (`jmmkv.cache.kv_cache.ring_of`; the
  token itself is in it). Returns ``[B, N, H]``."""
  q_BKGH = einops.rearrange(q_BNH, "B (K G) H -> B K G H", K=k_BKRH.shape[1])
  o_BKGH, _, l_BKG = _partial(q_BKGH, k_BKRH, v_BKRH, valid_BKR)
  o_BKGH = o_BKGH / l_BKG[..., None]
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
