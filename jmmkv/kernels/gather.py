"""Gather of the kept K/V rows into the prefix buffer (Pallas TPU), beside its jnp reference.

``out[r, c] = x[r, idx[r, c]]`` for ``x`` in (K, V) ``[R, T, H]`` and ``idx`` ``[R, C]``, zeros
where ``idx < 0``. The TPU kernel leaves K/V in HBM and moves only the kept rows: a grid over
(row, block of ``slots`` slots) reads the indices from SMEM (scalar prefetch) and starts one async
DMA per kept row straight into the output VMEM block, all in flight at once, then waits for them
and zeroes the empty slots (from a small ``[slots, 1]`` mask block). Rows travel as 32-bit words
(16- and 8-bit dtypes are viewed as int32 along H), so every DMA moves 32-bit rows.

SMEM is small (about 1 MiB), so the indices go in chunks of whole rows, at most
``GatherBlocks.prefetch`` entries per `pallas_call`; later calls write their rows into the same
output buffers (input/output aliasing), so nothing is concatenated. The first row of a chunk is a
scalar-prefetch argument too, so the chunks share one kernel body.

The dispatcher (`gather`) runs the kernel on TPU only for 32-bit K/V with rows of at most 128
words (H <= 128 in float32): one-row DMAs at any token offset rely on Mosaic reading such an
array as one row per tile, and a 16-bit array packs pairs of *tokens* into a word on TPU, so the
word view along H would first copy the whole prompt K/V. bfloat16 K/V therefore use XLA's gather
there (not yet measured against the kernel on a TPU). On GPU the dispatcher uses the reference:
XLA's gather is already one memory-bound pass there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jmmkv.kernels import mode
from jmmkv.typing import Array


@dataclasses.dataclass(frozen=True)
class GatherBlocks:
  """``slots`` output slots per grid step (a multiple of 8; C is padded to a multiple of it) and
  at most ``prefetch`` indices in SMEM per `pallas_call`."""

  slots: int = 128
  prefetch: int = 1 << 16

  def __post_init__(self):
    if self.slots < 1 or self.slots % 8:
      raise ValueError(f"GatherBlocks.slots must be a positive multiple of 8, got {self.slots}")


def _to_words(x_RTH: Array) -> Array:
  """``[R, T, H]`` -> ``[R, T, W]`` int32 words holding the same bytes."""
  r, t, h = x_RTH.shape
  size = x_RTH.dtype.itemsize
  if size == 4:
    return lax.bitcast_convert_type(x_RTH, jnp.int32)
  if size < 4:
    if (h * size) % 4:
      raise ValueError(
        f"gather_kv needs H * itemsize to be a multiple of 4, got H={h} {x_RTH.dtype}"
      )
    return lax.bitcast_convert_type(x_RTH.reshape(r, t, h * size // 4, 4 // size), jnp.int32)
  return lax.bitcast_convert_type(x_RTH, jnp.int32).reshape(r, t, h * size // 4)


def _from_words(w_RCW: Array, dtype, h: int) -> Array:
  """Inverse of `_to_words`."""
  r, c, _ = w_RCW.shape
  size = jnp.dtype(dtype).itemsize
  if size == 4:
    return lax.bitcast_convert_type(w_RCW, dtype)
  if size < 4:
    return lax.bitcast_convert_type(w_RCW, dtype).reshape(r, c, h)
  return lax.bitcast_convert_type(w_RCW.reshape(r, c, h, size // 4), dtype)


_I0, _I1 = np.int32(0), np.int32(1)  # int32 indices under x64 too (Mosaic has no i64)


def _gather_kernel(cp, slots, idx_ref, row0_ref, empty_ref, k_hbm, v_hbm, *refs):
  """Grid step (i, j): slots ``j*slots ...`` of row ``row0 + i``. ``idx_ref``: this call's
  indices, flat ``[rows * Cp]``, and ``row0_ref`` ``[1]``, in SMEM; ``empty_ref``
  ``[1, slots, 1]``; K/V ``[R, T, W]`` in HBM; outputs ``[1, slots, W]`` in VMEM (refs may start
  with the aliased, unread outputs)."""
  ko_ref, vo_ref, sem = refs[-3:]
  i, j = pl.program_id(0), pl.program_id(1)
  base = i * cp + j * slots
  row = row0_ref[0] + i

  def copies(s):
    pos = idx_ref[base + s]
    src = pl.ds(jnp.maximum(pos, 0), 1)
    dst = pl.ds(s, 1)
    ck = pltpu.make_async_copy(k_hbm.at[row, src], ko_ref.at[_I0, dst], sem.at[_I0])
    cv = pltpu.make_async_copy(v_hbm.at[row, src], vo_ref.at[_I0, dst], sem.at[_I1])
    return pos >= 0, ck, cv

  def start(s, carry):
    kept, ck, cv = copies(s)

    @pl.when(kept)
    def _():
      ck.start()
      cv.start()

    return carry

  def wait(s, carry):
    kept, ck, cv = copies(s)

    @pl.when(kept)
    def _():
      ck.wait()
      cv.wait()

    return carry

  zero, n = jnp.int32(0), jnp.int32(slots)  # int32 loop indices under x64 too
  lax.fori_loop(zero, n, start, zero)  # every kept row of the block in flight
  lax.fori_loop(zero, n, wait, zero)
  w = ko_ref.shape[-1]
  empty = jnp.broadcast_to(empty_ref[0], (slots, w)) != 0  # [slots, W]; empty rows: no DMA
  ko_ref[0] = jnp.where(empty, 0, ko_ref[0])
  vo_ref[0] = jnp.where(empty, 0, vo_ref[0])


def _gather_call(idx_flat, empty, k, v, prev, *, row0, rows, cp, slots, interpret):
  """One `pallas_call` over rows ``row0 .. row0 + rows`` of the ``[R, Cp, W]`` outputs."""
  r, _, w = k.shape
  out_spec = pl.BlockSpec((1, slots, w), lambda i, j, idx, row0: (row0[0] + i, j, 0))
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  in_specs = [pl.BlockSpec((1, slots, 1), lambda i, j, idx, row0: (row0[0] + i, j, 0)), hbm, hbm]
  args = [idx_flat, jnp.full((1,), row0, jnp.int32), empty, k, v]
  aliases = {}
  if prev is not None:  # earlier chunks' rows: aliased to the outputs, never read
    in_specs += [hbm, hbm]
    args += list(prev)
    aliases = {5: 0, 6: 1}
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(rows, cp // slots),
    in_specs=in_specs,
    out_specs=[out_spec, out_spec],
    scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
  )
  out = jax.ShapeDtypeStruct((r, cp, w), jnp.int32)
  return pl.pallas_call(
    functools.partial(_gather_kernel, cp, slots),
    out_shape=[out, out],
    grid_spec=grid_spec,
    input_output_aliases=aliases,
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
    interpret=pltpu.InterpretParams() if interpret else False,
    name="jmmkv_gather_kv",
  )(*args)


def gather_kv(
  k_RTH: Array,
  v_RTH: Array,
  idx_RC: Array,
  *,
  block: GatherBlocks = GatherBlocks(),
  interpret: bool = False,
) -> tuple[Array, Array]:
  """``(k_RCH, v_RCH)``: rows ``idx`` of K and V, zeros where ``idx < 0`` (Pallas TPU kernel;
  ``interpret`` runs it in TPU interpret mode, which works on CPU). Indices must be < T."""
  r, _, h = k_RTH.shape
  c = idx_RC.shape[1]
  if c == 0 or r == 0:
    return tuple(jnp.zeros((r, c, h), x.dtype) for x in (k_RTH, v_RTH))
  slots = block.slots
  cp = -(-c // slots) * slots
  idx = jnp.pad(idx_RC.astype(jnp.int32), ((0, 0), (0, cp - c)), constant_values=-1)
  empty = (idx < 0).astype(jnp.int32)[..., None]  # [R, Cp, 1]
  k, v = _to_words(k_RTH), _to_words(v_RTH)
  per_call = max(1, block.prefetch // cp)
  out = None
  for row0 in range(0, r, per_call):
    rows = min(per_call, r - row0)
    chunk = idx[row0 : row0 + rows].reshape(-1)
    out = _gather_call(
      chunk, empty, k, v, out, row0=row0, rows=rows, cp=cp, slots=slots, interpret=interpret
    )
  ko, vo = (x[:, :c] for x in out)
  return _from_words(ko, k_RTH.dtype, h), _from_words(vo, v_RTH.dtype, h)


def gather_kv_reference(
  k_RTH: Array,
  v_RTH: Array,
  idx_RC: Array,
  *,
  block: GatherBlocks = GatherBlocks(),
  interpret: bool = False,
) -> tuple[Array, Array]:
  """`gather_kv` with ``take_along_axis`` (``block`` and ``interpret`` are ignored)."""
  del block, interpret
  safe = jnp.maximum(idx_RC, 0)[..., None]
  empty = (idx_RC < 0)[..., None]

  def take(x):
    return jnp.where(empty, jnp.zeros((), x.dtype), jnp.take_along_axis(x, safe, axis=1))

  return take(k_RTH), take(v_RTH)


def tpu_kernel_ok(k: Array, v: Array) -> bool:
  """Whether the dispatcher uses the kernel on a TPU for K/V like these (module docstring):
  32-bit dtypes and rows of at most 128 words."""
  return all(x.dtype.itemsize == 4 and x.shape[-1] <= 128 for x in (k, v))


def gather(k: Array, v: Array, idx: Array) -> tuple[Array, Array]:
  """Dispatcher: K/V ``[..., T, H]`` and ``idx`` ``[..., C]`` -> ``[..., C, H]`` each. The kernel
  runs on TPU when `tpu_kernel_ok`, and in interpret mode whenever a row is whole 32-bit words
  (16-bit dtypes included, to test that path); otherwise, and on GPU and CPU, the reference."""
  t, h = k.shape[-2:]
  lead, c = idx.shape[:-1], idx.shape[-1]
  args = k.reshape(-1, t, h), v.reshape(-1, t, h), idx.reshape(-1, c)
  m = mode()
  words = all((h * x.dtype.itemsize) % 4 == 0 for x in (k, v))  # rows move as 32-bit words
  if m == "interpret" and words:
    ko, vo = gather_kv(*args, interpret=True)
  elif m == "pallas" and jax.default_backend() == "tpu" and tpu_kernel_ok(k, v):
    ko, vo = gather_kv(*args)
  else:
    ko, vo = gather_kv_reference(*args)
  return ko.reshape(lead + (c, h)), vo.reshape(lead + (c, h))
