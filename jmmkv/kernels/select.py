"""Top-n selection per row without a full sort (Pallas), beside its sort-based reference.

Selection order (the one of `jmmkv.cache.select`): the candidates of a row are its positions with
``valid``; they are ordered by (level desc, score desc, position asc) and the first ``n`` are kept.
Rows are independent. ``R`` rows of ``T`` positions, ``C`` kept capacity.

The kernel is a threshold (radix) select that only compares, selects, sums and shifts, so it
lowers on Mosaic TPU (and, with power-of-two blocks, on Triton): scores become order-preserving
int32 keys, then three phases each find, by a most-significant-bit-first search, the largest
``t`` with ``count(member & key >= t) >= need``: the level threshold among the candidates, the
score threshold among those tied at it, and the position threshold among those tied at both
(positions are distinct, so the result is exact). Scores may be ``-inf`` (below every finite
score) and ``-0.0 == 0.0``; NaN scores (of either sign) rank below ``-inf``, as in the
reference's sort.

`compact` turns a keep mask into ascending kept positions with a cumulative sum and a per-row
binary search (no sort). `top_positions` is the dispatcher (`jmmkv.kernels.mode`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jmmkv.kernels import mode
from jmmkv.typing import Array

_INT32_MIN = -(2**31)
_SMALLEST_VMEM = 16 << 20  # TPU v2-v4 per TensorCore (v5e/v6e: 128 MiB, v5p: 64 MiB)


@dataclasses.dataclass(frozen=True)
class SelectBlocks:
  """Block sizes of `keep_mask`: ``rows`` rows (whole rows of T) per grid step; a multiple of 8
  on TPU, a power of two on GPU."""

  rows: int = 8

  def __post_init__(self):
    if self.rows < 1:
      raise ValueError(f"SelectBlocks.rows must be >= 1, got {self.rows}")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _count(mask: Array) -> Array:
  """``[rows, T]`` bool -> ``[rows, 1]`` int32 count per row."""
  return jnp.sum(mask.astype(jnp.int32), axis=1, keepdims=True, dtype=jnp.int32)  # also x64


def _threshold(key: Array, member: Array, need: Array, high_bit: int, signed: bool) -> Array:
  """Largest ``t`` ``[rows, 1]`` with ``count(member & key >= t) >= need`` (need >= 1 and at
  most the member count; otherwise the value is meaningless and must be masked by the caller).

  Bits are decided from ``high_bit`` down; with ``signed`` the sign is decided first (within
  each sign, int32 order is the order of the low 31 bits), otherwise keys are known >= 0."""
  if signed:
    t = jnp.where(_count(member & (key >= 0)) >= need, 0, _INT32_MIN).astype(jnp.int32)
  else:
    t = jnp.zeros_like(need)

  def step(i, t):
    trial = t | jnp.left_shift(jnp.int32(1), high_bit - i)
    return jnp.where(_count(member & (key >= trial)) >= need, trial, t)

  return lax.fori_loop(jnp.int32(0), jnp.int32(high_bit + 1), step, t)  # int32 under x64 too


def _active(need: Array, shape) -> Array:
  """``[rows, T]`` bool: the row still needs positions (an int32 lane broadcast, then a compare:
  Mosaic-friendlier than broadcasting a ``[rows, 1]`` mask)."""
  return jnp.broadcast_to(need, shape) > 0


def _phase(key, member, need, high_bit, signed):
  """(members strictly above the threshold, members at it, need left for those at it); nothing
  where ``need <= 0``."""
  t = _threshold(key, member, jnp.maximum(need, 1), high_bit, signed)
  member = member & _active(need, key.shape)
  above = member & (key > t)
  tied = member & (key == t)
  return above, tied, jnp.where(need > 0, need - _count(above), 0)


def _keep_kernel(score_ref, level_ref, valid_ref, n_ref, keep_ref):
  """One block of rows: ``[rows, Tp]`` score/level/valid, ``[rows, 1]`` n -> ``[rows, Tp]``."""
  rows, tp = score_ref.shape
  score = score_ref[...]
  score = jnp.where(score == 0.0, 0.0, score)  # -0.0 ties with 0.0, as in lax.sort
  bits = lax.bitcast_convert_type(score, jnp.int32)
  skey = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)  # int order == float order
  # NaN (either sign) below -inf, whose key is INT32_MIN + 2^23 - 1
  skey = jnp.where(score != score, _INT32_MIN, skey)
  cand = valid_ref[...] != 0
  need = jnp.clip(n_ref[...], 0, _count(cand))
  above1, tied1, need = _phase(level_ref[...], cand, need, 30, True)
  above2, tied2, need = _phase(skey, tied1, need, 30, True)
  # Lower positions first: key (tp - 1 - pos) >= 0, distinct, so the threshold is exact.
  pkey = (tp - 1) - lax.broadcasted_iota(jnp.int32, (rows, tp), 1)
  t = _threshold(pkey, tied2, jnp.maximum(need, 1), (tp - 1).bit_length() - 1, False)
  keep = above1 | above2 | (tied2 & (pkey >= t) & _active(need, pkey.shape))
  keep_ref[...] = keep.astype(jnp.int32)


def _vmem_capacity() -> int:
  """VMEM bytes per TensorCore of the TPU in use; the smallest TPU's when there is none (lowering
  for a TPU target from another host)."""
  from jax.experimental.pallas import tpu as pltpu

  try:
    return pltpu.get_tpu_info().vmem_capacity_bytes
  except ValueError:  # "Unsupported TPU device kind": not running on a TPU
    return _SMALLEST_VMEM


def vmem_need(t: int, rows: int) -> int:
  """Bytes of VMEM a TPU block of ``rows`` rows of ``T`` takes: about 16 live ``[rows, Tp]``
  int32 arrays (double-buffered blocks and temporaries)."""
  return 16 * rows * _round_up(t, 128) * 4


def _usable_vmem() -> int:
  """The VMEM `keep_mask` may take: 3/4 of the TPU's (the rest for Mosaic's own scratch)."""
  return _vmem_capacity() * 3 // 4


def fits_tpu(t: int, rows: int = SelectBlocks().rows) -> bool:
  """Whether `keep_mask` fits the TPU's usable VMEM for blocks of ``rows`` rows of ``T``."""
  return vmem_need(t, rows) <= _usable_vmem()


def keep_mask(
  score_RT: Array,
  level_RT: Array,
  valid_RT: Array,
  n_R: Array,
  *,
  block: SelectBlocks = SelectBlocks(),
  interpret: bool = False,
  platform: str | None = None,
) -> Array:
  """``[R, T]`` bool: the first ``n_R[r]`` candidates of row r by (level desc, score desc,
  position asc), as a Pallas kernel (whole rows per block, ``block.rows`` rows per grid step).

  ``platform`` (``"tpu"``/``"gpu"``, default: the default backend) picks the block padding and
  compiler parameters: TPU pads T to a multiple of 128, GPU (Triton) to a power of two. A block
  holds whole rows, so VMEM bounds T: about 16 arrays of ``rows * T`` int32 (T = 32k: 16 MiB);
  a TPU whose VMEM cannot hold that (`fits_tpu`) raises ValueError (the dispatcher then sorts)."""
  r, t = score_RT.shape
  platform = platform or jax.default_backend()
  rows = block.rows
  if platform == "gpu":
    from jax.experimental.pallas import triton as pltriton

    tp = max(pl.next_power_of_2(t), 128)
    params = pltriton.CompilerParams(num_warps=8)
  else:
    from jax.experimental.pallas import tpu as pltpu

    tp = _round_up(t, 128)
    # Raise the scoped VMEM limit past its default (16 MiB, 32 on v6e) when needed, within the
    # chip's VMEM.
    need, usable = vmem_need(t, rows), _usable_vmem()
    if not interpret and need > usable:
      raise ValueError(
        f"keep_mask: rows of T={t} need {need >> 20} MiB of VMEM, over the {usable >> 20} MiB "
        "usable (3/4 of this TPU's); use fewer block rows or keep_mask_reference"
      )
    limit = min(need + (4 << 20), usable) if need > (12 << 20) else None
    params = pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=limit)
  rp = _round_up(r, rows)
  pad = ((0, rp - r), (0, tp - t))
  score = jnp.pad(score_RT.astype(jnp.float32), pad)
  level = jnp.pad(level_RT.astype(jnp.int32), pad)
  valid = jnp.pad(valid_RT.astype(jnp.int32), pad)  # padding: never a candidate
  n = jnp.pad(n_R.astype(jnp.int32), (0, rp - r))[:, None]
  spec = pl.BlockSpec((rows, tp), lambda i: (i, 0))
  keep = pl.pallas_call(
    _keep_kernel,
    out_shape=jax.ShapeDtypeStruct((rp, tp), jnp.int32),
    grid=(rp // rows,),
    in_specs=[spec, spec, spec, pl.BlockSpec((rows, 1), lambda i: (i, 0))],
    out_specs=spec,
    compiler_params=params,
    interpret=interpret,
    name="jmmkv_keep_mask",
  )(score, level, valid, n)
  return keep[:r, :t] != 0


def keep_mask_reference(
  score_RT: Array,
  level_RT: Array,
  valid_RT: Array,
  n_R: Array,
  *,
  block: SelectBlocks = SelectBlocks(),
  interpret: bool = False,
  platform: str | None = None,
) -> Array:
  """`keep_mask` with a sort (``block``, ``interpret``, ``platform`` are ignored)."""
  del block, interpret, platform
  t = score_RT.shape[-1]
  valid = valid_RT.astype(bool)
  # Candidates only: invalid positions get the lowest level and score, and, for exactness with
  # levels < 0 too, a leading key that puts them last.
  level = jnp.where(valid, level_RT.astype(jnp.int32), _INT32_MIN)
  score = jnp.where(valid, score_RT.astype(jnp.float32), -jnp.inf)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), score.shape)
  keys = ((~valid).astype(jnp.int32), ~level, -score, pos)  # ~x: order-reversing, no overflow
  *_, order = lax.sort(keys, dimension=-1, num_keys=4)
  rank = jnp.argsort(order, axis=-1)
  return valid & (rank < n_R[:, None])


def compact(keep_RT: Array, capacity: int) -> Array:
  """Kept positions ``[R, C]`` in ascending order, -1 in unused slots, without a sort: slot j
  holds the first position whose running count of kept positions reaches j + 1. A row keeping
  more than C returns its first C."""
  t = keep_RT.shape[-1]
  running = jnp.cumsum(keep_RT.astype(jnp.int32), axis=-1)  # [R, T], non-decreasing
  targets = jnp.arange(1, capacity + 1, dtype=jnp.int32)
  search = functools.partial(jnp.searchsorted, side="left", method="scan")
  pos = jax.vmap(lambda row: search(row, targets))(running)  # T where the row has too few
  return jnp.where(pos >= t, -1, pos).astype(jnp.int32)


def compact_reference(keep_RT: Array, capacity: int) -> Array:
  """`compact` with a sort (``jmmkv.cache.select.positions_from_mask`` as it was)."""
  t = keep_RT.shape[-1]
  pos = jnp.where(keep_RT, jnp.arange(t, dtype=jnp.int32), t)
  first = jnp.sort(pos, axis=-1)[..., :capacity]
  if capacity > t:
    first = jnp.pad(first, ((0, 0), (0, capacity - t)), constant_values=t)
  return jnp.where(first >= t, -1, first).astype(jnp.int32)


def positions(keep: Array, capacity: int) -> Array:
  """Dispatcher of `compact` over ``[..., T]`` -> ``[..., C]``."""
  t = keep.shape[-1]
  fn = compact_reference if mode() == "reference" else compact
  return fn(keep.reshape(-1, t), capacity).reshape(keep.shape[:-1] + (capacity,))


def top_positions(score: Array, level: Array, valid: Array, n: Array, capacity: int) -> Array:
  """Dispatcher: ``[..., T]`` score/level/valid and ``[...]`` n -> kept positions ``[..., C]``
  (ascending, -1 last); the kernel path (`keep_mask` + `compact`) is sort-free."""
  shape = score.shape
  t = shape[-1]
  flat = lambda x: jnp.broadcast_to(x, shape).reshape(-1, t)
  args = flat(score), flat(level), flat(valid), jnp.broadcast_to(n, shape[:-1]).reshape(-1)
  m = mode()
  on_tpu = m == "pallas" and jax.default_backend() == "tpu"
  if m == "reference" or (on_tpu and not fits_tpu(t)):  # too long a row for VMEM: sort
    idx = compact_reference(keep_mask_reference(*args), capacity)
  else:  # Triton: one row per program keeps the per-program tensors small
    block = SelectBlocks(rows=1) if jax.default_backend() == "gpu" else SelectBlocks()
    idx = compact(keep_mask(*args, block=block, interpret=m == "interpret"), capacity)
  return idx.reshape(shape[:-1] + (capacity,))
