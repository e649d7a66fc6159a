"""Split-K decode attention over a paged prefix: per-page partials (Pallas kernel), per-owner combine.

Layout (`jmmkv.cache.paged`): one layer's prefix is ``P`` pages of ``S`` slots, k/v ``[P, S, H]``,
slot validity ``[P, S]`` and ``owner_P = b * K + kv_head``. Pages of one owner are contiguous and
owners ascend; padding pages (owner ``-1`` or ``>= O``, with ``O = B * K``) come after all real
pages. Queries are grouped per KV head, ``q_OGH``. Nothing is normalised here: the caller merges
``(o, m, l)`` with the append buffer's partial by log-sum-exp and divides once.

Partials of one page and query row (``s = scale * q.k`` over the page's slots, fp32):
``m = max_valid s``, ``p = exp(s - m)`` on valid slots and 0 elsewhere, ``l = sum p``,
``o = sum p * v``. A page with no valid slot has ``m = MASK_VALUE``, ``l = 0`` and ``o = 0``, so it
adds nothing to a combine whatever its weight.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jmmkv import kernels
from jmmkv.typing import MASK_VALUE, Array

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PageBlocks:
  """Tiling of `page_partials`: ``pages`` pages per grid step."""

  pages: int = 8

  def __post_init__(self):
    if self.pages < 1:
      raise ValueError(f"PageBlocks.pages must be >= 1, got {self.pages}")


def page_partials_reference(
  q_PGH: Array,
  k_PSH: Array,
  v_PSH: Array,
  valid_PS: Array,
  *,
  scale: float,
  block: PageBlocks = PageBlocks(),
  interpret: bool = False,
  platform: str | None = None,
) -> tuple[Array, Array, Array]:
  """Plain-jnp `page_partials` (``block``, ``interpret`` and ``platform`` are ignored)."""
  del block, interpret, platform
  s_PGS = jnp.einsum("PGH,PSH->PGS", q_PGH, k_PSH, preferred_element_type=f32) * scale
  valid_P1S = valid_PS[:, None, :]
  s_PGS = jnp.where(valid_P1S, s_PGS, MASK_VALUE)
  m_PG = jnp.max(s_PGS, axis=-1)
  p_PGS = jnp.where(valid_P1S, jnp.exp(s_PGS - m_PG[..., None]), 0.0)
  o_PGH = jnp.einsum("PGS,PSH->PGH", p_PGS, v_PSH.astype(f32), preferred_element_type=f32)
  return o_PGH, m_PG, jnp.sum(p_PGS, axis=-1)


def _page_partials_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, m_ref, l_ref, *, scale, mask):
  """One block of pages. Refs: q ``[p, G, H]``, k/v ``[p, S, H]``, valid ``[p, 1, S]`` int32;
  out o ``[p, G, H]``, m/l ``[p, 1, G]`` (all f32).

  Pages are unrolled with 2-D dots only: Triton has no batched dot, and 2-D ``q k^T`` / ``p v`` is
  the form Mosaic's own paged-attention kernel uses."""
  qk_dims = (((1,), (1,)), ((), ()))  # [G, H] x [S, H] -> [G, S]
  pv_dims = (((1,), (0,)), ((), ()))  # [G, S] x [S, H] -> [G, H]
  for i in range(q_ref.shape[0]):
    q_GH, k_SH = q_ref[i], k_ref[i]
    if q_GH.dtype != k_SH.dtype:
      q_GH, k_SH = q_GH.astype(f32), k_SH.astype(f32)
    s_GS = lax.dot_general(q_GH, k_SH, qk_dims, preferred_element_type=f32) * scale
    valid_1S = valid_ref[i] != 0
    s_GS = jnp.where(valid_1S, s_GS, mask)
    m_G1 = jnp.max(s_GS, axis=1, keepdims=True)
    p_GS = jnp.where(valid_1S, jnp.exp(s_GS - m_G1), 0.0)
    v_SH = v_ref[i].astype(f32)
    o_ref[i] = lax.dot_general(p_GS, v_SH, pv_dims, preferred_element_type=f32)
    m_ref[i] = m_G1.T  # lane-dense rows: [P, 1, G] tiles (1, 128) on TPU, (G, 1) would pad
    l_ref[i] = jnp.sum(p_GS, axis=1, keepdims=True).T


def _compiler_params(backend: str | None):
  """TPU: Mosaic, page blocks independent (megacore may split them). GPU: Triton, whose 2-D
  ``dot`` the kernel uses (the default Mosaic GPU lowering has no ``dot_general`` here)."""
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel",))
  if backend == "gpu":
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)
  return None


@functools.partial(jax.jit, static_argnames=("scale", "block", "interpret", "platform"))
def page_partials(
  q_PGH: Array,
  k_PSH: Array,
  v_PSH: Array,
  valid_PS: Array,
  *,
  scale: float,
  block: PageBlocks = PageBlocks(),
  interpret: bool = False,
  platform: str | None = None,
) -> tuple[Array, Array, Array]:
  """Per-page unnormalised attention partials (Pallas). ``q_PGH`` holds each page's owner's
  queries. Returns ``o_PGH``, ``m_PG``, ``l_PG`` (f32), see the module docstring.

  The grid walks blocks of ``block.pages`` pages (``P`` is padded with empty pages). S and H are
  full dims of every block; validity travels as ``[P, 1, S]`` int32 and m/l as ``[P, 1, G]``, so
  the last two dims of every block are full (TPU-legal for any ``block.pages``). On GPU (Triton,
  whose arrays must have power-of-two sizes) the query rows are padded to a power of two >= 16,
  as JAX's own GPU decode kernels do for ``tl.dot``, S and H are zero-padded to powers of two
  (exact: padded slots are invalid, padded H columns add 0 to q.k and are cut from o), and
  ``block.pages`` must be a power of two. A page's K and V (``S x H``, f32 for the p.v product)
  sit in a GPU block's shared memory, so GPU layouts use pages of at most
  `jmmkv.cache.paged.MAX_PAGE_SIZE_GPU` slots. ``platform`` (``"tpu"``/``"gpu"``, default: the
  default backend) picks the lowering's parameters."""
  p, g, h = q_PGH.shape
  s = k_PSH.shape[1]
  # The padding follows the target (``platform`` also in interpret mode, to test the GPU path).
  backend = platform or (None if interpret else jax.default_backend())
  bp = block.pages
  if backend == "gpu":
    if bp & (bp - 1):
      raise ValueError(f"on GPU PageBlocks.pages must be a power of two, got {bp}")
    gp, sp, hp = max(16, pl.next_power_of_2(g)), pl.next_power_of_2(s), pl.next_power_of_2(h)
  else:
    gp, sp, hp = g, s, h
  pp = p + (-p % bp)
  q = jnp.pad(q_PGH, [(0, pp - p), (0, gp - g), (0, hp - h)])
  k, v = (jnp.pad(x, [(0, pp - p), (0, sp - s), (0, hp - h)]) for x in (k_PSH, v_PSH))
  valid = jnp.pad(valid_PS.astype(jnp.int32), [(0, pp - p), (0, sp - s)]).reshape(pp, 1, sp)
  page_spec = lambda *dims: pl.BlockSpec((bp, *dims), lambda i: (i,) + (0,) * len(dims))
  o, m, l = pl.pallas_call(
    functools.partial(_page_partials_kernel, scale=float(scale), mask=MASK_VALUE),
    grid=(pp // bp,),
    in_specs=[page_spec(gp, hp), page_spec(sp, hp), page_spec(sp, hp), page_spec(1, sp)],
    out_specs=[page_spec(gp, hp), page_spec(1, gp), page_spec(1, gp)],
    out_shape=[
      jax.ShapeDtypeStruct((pp, gp, hp), f32),
      jax.ShapeDtypeStruct((pp, 1, gp), f32),
      jax.ShapeDtypeStruct((pp, 1, gp), f32),
    ],
    interpret=interpret,
    name="jmmkv_page_partials",
    compiler_params=None if interpret else _compiler_params(backend),
  )(q, k, v, valid)
  return o[:p, :g, :h], m[:p, 0, :g], l[:p, 0, :g]


def combine(
  o_PGH: Array, m_PG: Array, l_PG: Array, owner_P: Array, num_owners: int
) -> tuple[Array, Array, Array]:
  """Merge page partials per owner: ``(o_OGH, m_OG, l_OG)``, still unnormalised.

  Pages with owner ``< 0`` or ``>= num_owners`` go to a dummy segment that is dropped; they must
  come after the real pages (segment ids stay sorted). Owners without pages get
  ``m = MASK_VALUE``, ``l = 0``, ``o = 0``."""
  n = num_owners
  seg_P = jnp.where((owner_P >= 0) & (owner_P < n), owner_P, n)
  sorted_segments = dict(segment_ids=seg_P, num_segments=n + 1, indices_are_sorted=True)
  m_OG = jax.ops.segment_max(m_PG, **sorted_segments)  # -inf where an owner has no page
  m_OG = jnp.maximum(m_OG, MASK_VALUE)
  alpha_PG = jnp.exp(m_PG - m_OG[seg_P])
  o_OGH = jax.ops.segment_sum(o_PGH * alpha_PG[..., None], **sorted_segments)
  l_OG = jax.ops.segment_sum(l_PG * alpha_PG, **sorted_segments)
  return o_OGH[:n], m_OG[:n], l_OG[:n]


def paged_partials(
  q_OGH: Array, k_PSH: Array, v_PSH: Array, valid_PS: Array, owner_P: Array, *, scale: float
) -> tuple[Array, Array, Array]:
  """Attention partials of every owner over its pages: ``(o_OGH, m_OG, l_OG)``, unnormalised.

  Gathers each page's owner's queries (padding pages read a clamped owner's; dropped later), runs
  `page_partials` as `kernels.mode()` says, then `combine`."""
  num_owners = q_OGH.shape[0]
  q_PGH = q_OGH[jnp.clip(owner_P, 0, num_owners - 1)]
  impl = kernels.mode()
  if impl == "reference":
    parts = page_partials_reference(q_PGH, k_PSH, v_PSH, valid_PS, scale=scale)
  else:
    parts = page_partials(q_PGH, k_PSH, v_PSH, valid_PS, scale=scale, interpret=impl == "interpret")
  return combine(*parts, owner_P, num_owners)
