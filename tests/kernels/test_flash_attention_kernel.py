"""Causal prompt attention: the Pallas flash kernel in interpret mode (its TPU and its GPU form)
against the jnp reference and a dense NumPy softmax, its lowering for TPU and GPU, and the
dispatch (the reference on CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import kernel_calls, lowered

from jmmkv import kernels
from jmmkv.kernels import flash_attention as fa


def _prompt(seed, t, n, kh, h, dtype, left, right):
  """Random q/k/v (never zeros) of a batch of 2: row 0 left-padded by ``left`` slots, row 1
  right-padded by ``right``. Padding slots hold random data too (only the mask hides them)."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((2, t, n, h)) + 0.1
  k, v = (rng.standard_normal((2, kh, t, h)) + 0.1 for _ in range(2))
  valid = np.ones((2, t), bool)
  valid[0, :left] = False
  valid[1, t - right :] = False
  return *(jnp.asarray(x, dtype) for x in (q, k, v)), valid


def _has_key(valid):
  """``[B, T]``: rows with a valid key at or before them (all but left padding)."""
  return np.cumsum(valid, axis=1) > 0


def _check(got, want, valid, rtol):
  """``got`` equals ``want`` on the rows with a key (right padding included) and is 0 on the
  others (left padding)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.isfinite(got).all()
  rows = _has_key(valid)
  assert rows.any() and (~rows).any()
  np.testing.assert_allclose(got[rows], want[rows], rtol=rtol, atol=rtol * np.abs(want).max())
  assert (got[~rows] == 0).all()


F32, BF16 = jnp.float32, jnp.bfloat16
KERNEL_CASES = [  # platform, T, N, K, H, dtype, seed, left, right, kernel tiles
  (None, 256, 4, 2, 32, F32, 0, 37, 70, (64, 128)),  # G=2: 4 query blocks, 2 key tiles
  (None, 256, 2, 2, 16, F32, 1, 130, 5, (32, 128)),  # MHA; key tile 0 all padding in row 0
  (None, 200, 6, 2, 64, F32, 2, 9, 64, (None, None)),  # G=3, T padded, default tiles (shrunk)
  (None, 256, 4, 1, 32, BF16, 3, 20, 100, (64, 128)),  # G=4
  ("gpu", 96, 4, 2, 24, F32, 4, 17, 40, (16, 32)),  # H 24 -> 32; 6 query blocks, 3 key tiles
  ("gpu", 70, 3, 1, 40, F32, 5, 3, 9, (32, 16)),  # H 40 -> 64, T 70 -> 96, key tiles < query's
  ("gpu", 128, 4, 2, 48, BF16, 6, 50, 1, (None, None)),  # default tiles, H 48 -> 64
]


@pytest.mark.parametrize("platform,t,n,kh,h,dtype,seed,left,right,tiles", KERNEL_CASES)
def test_kernel_matches_reference(platform, t, n, kh, h, dtype, seed, left, right, tiles):
  q, k, v, valid = _prompt(seed, t, n, kh, h, dtype, left, right)
  got = fa.causal_attention_pallas(q, k, v, valid, *tiles, interpret=True, platform=platform)
  assert got.shape == q.shape and got.dtype == dtype
  want = fa.causal_attention_reference(q, k, v, jnp.asarray(valid), t, t)
  _check(got, want, valid, rtol=1e-5 if dtype == F32 else 1e-2)


def _dense(q, k, v, valid):
  """From the definition, in float64: row r of head n is the softmax over the keys c <= r with
  ``valid[c]`` of ``q . k / sqrt(H)`` (KV head ``n // G``), times v; NaN without such a key."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  g = n // k.shape[1]
  out = np.full(q.shape, np.nan)
  for bi in range(b):
    for head in range(n):
      kv = head // g
      for r in range(t):
        keys = np.flatnonzero(valid[bi, : r + 1])
        if keys.size:
          s = k[bi, kv, keys] @ q[bi, r, head] / np.sqrt(h)
          e = np.exp(s - s.max())
          out[bi, r, head] = e @ v[bi, kv, keys] / e.sum()
  return out


@pytest.mark.parametrize("platform,tiles", [(None, (32, 128)), ("gpu", (16, 32))])
def test_kernel_matches_dense_softmax(platform, tiles):
  q, k, v, valid = _prompt(7, 128, 4, 2, 24, F32, 21, 33)
  got = fa.causal_attention_pallas(q, k, v, valid, *tiles, interpret=True, platform=platform)
  _check(got, np.nan_to_num(_dense(q, k, v, valid)), valid, rtol=1e-5)


@pytest.mark.parametrize("platform,tiles", [(None, (64, 128)), ("gpu", (32, 64))])
def test_tiles_past_the_diagonal_are_never_read(platform, tiles):
  """NaN keys and values in the last key tile: the query blocks before it stay exact (a read of
  the tile, masked or not, makes them NaN, as it does the rows that need it)."""
  t = 256
  q, k, v, valid = _prompt(8, t, 4, 2, 16, F32, 5, 7)
  want = np.asarray(fa.causal_attention_reference(q, k, v, jnp.asarray(valid), t, t))
  first = t - tiles[1]  # the last key tile's first slot
  k, v = (x.at[:, :, first:].set(jnp.nan) for x in (k, v))
  got = np.asarray(
    fa.causal_attention_pallas(q, k, v, valid, *tiles, interpret=True, platform=platform)
  )
  _check(got[:, :first], want[:, :first], valid[:, :first], rtol=1e-5)
  assert np.isnan(got[:, first:]).all()


@pytest.mark.parametrize("qb,sb", [(64, 128), (256, 128), (128, 384)])
def test_tpu_grid_fetches_no_key_tile_past_the_diagonal(qb, sb):
  """Walking the TPU grid (query blocks, then key tiles) of one batch row and KV head: every step
  at or below the diagonal sees its own K/V tile, and the tile index changes (a DMA) no more often
  than over those steps alone (so the skipped steps fetch nothing)."""
  t = 768
  walk, needed = [], []
  for i in range(t // qb):
    for j in range(t // sb):
      walk.append(int(fa._kv_tile(jnp.int32(i), jnp.int32(j), qb, sb)))
      if j * sb <= (i + 1) * qb - 1:
        assert walk[-1] == j
        needed.append(j)
  fetches = lambda tiles: 1 + sum(a != b for a, b in zip(tiles, tiles[1:]))
  assert len(needed) < len(walk) and fetches(walk) == fetches(needed)


@pytest.mark.parametrize("platform,target", [("tpu", "tpu"), ("gpu", "cuda")])
@pytest.mark.parametrize("dtype,t,h,x64", [(F32, 256, 64, False), (BF16, 200, 96, True)])
def test_kernel_lowers(platform, target, dtype, t, h, x64):
  """Lowering for a TPU (Mosaic) or GPU (Triton) target from the CPU host (no compile), with the
  default tiles; T = 200 is padded, H = 96 is not a power of two (padded on GPU), and x64."""
  q, k, v, valid = _prompt(0, t, 8, 2, h, dtype, 3, 4)
  fn = jax.jit(functools.partial(fa.causal_attention_pallas, platform=platform))
  assert kernel_calls(lowered(fn, q, k, v, valid, target=target, x64=x64), target) == 1


def test_kernel_tiles_are_checked():
  q, k, v, valid = _prompt(0, 64, 2, 1, 16, F32, 0, 0)
  with pytest.raises(ValueError, match="power of two"):
    fa.causal_attention_pallas(q, k, v, valid, 48, 32, platform="gpu")
  with pytest.raises(ValueError, match="multiple"):
    fa.causal_attention_pallas(q, k, v, valid, 16, 64, platform="tpu")
  assert fa.kernel_tiles(37, 64, F32, None, None, "tpu") == (128, 128, 128)
  assert fa.kernel_tiles(700, 64, F32, None, None, "tpu") == (128, 512, 1024)
  assert fa.kernel_tiles(37, 64, F32, None, None, "gpu") == (64, 64, 64)
  assert fa.kernel_tiles(300, 128, F32, None, None, "gpu") == (64, 32, 320)


def test_dispatch_runs_the_reference_on_cpu(monkeypatch):
  q, k, v, valid = _prompt(9, 64, 4, 2, 16, F32, 6, 10)
  args = (q, k, v, jnp.asarray(valid), 16, 32)
  # A new function each time: a traced function's jaxpr is cached, whatever JMMKV_KERNELS says.
  jaxpr = lambda: str(jax.make_jaxpr(lambda *a: fa.causal_attention(*a, 16, 32))(*args[:4]))
  want = fa.causal_attention_reference(*args)
  monkeypatch.delenv("JMMKV_KERNELS", raising=False)
  assert jax.default_backend() == "cpu" and kernels.mode() == "reference"
  assert "pallas_call" not in jaxpr()
  np.testing.assert_array_equal(fa.causal_attention(*args), want)
  with pytest.raises(ValueError, match="multiple"):
    fa.causal_attention(*args[:4], 16, 48)
  monkeypatch.setenv("JMMKV_KERNELS", "interpret")  # what TPU/GPU run, in interpret mode
  assert "pallas_call" in jaxpr()
  _check(fa.causal_attention(*args), want, valid, rtol=1e-5)
  with pytest.raises(ValueError, match="multiple"):  # the reference's contract on every backend
    fa.causal_attention(*args[:4], 16, 48)


def _after_cache(seed, c, t, n, kh, h, dtype):
  """A next turn: random q ``[2, T, N, H]`` and keys ``[2, K, C + T, H]`` (a cache's C slots,
  then the T new tokens), with per-KV-head validity ``[2, K, C + T]``: each head keeps its own
  cache slots (at least one); the new tokens are valid in every head but row 1's last 5."""
  rng = np.random.default_rng(seed)
  s = c + t
  q = rng.standard_normal((2, t, n, h)) + 0.1
  k, v = (rng.standard_normal((2, kh, s, h)) + 0.1 for _ in range(2))
  valid = np.zeros((2, kh, s), bool)
  valid[:, :, :c] = rng.random((2, kh, c)) < 0.6
  valid[:, :, 0] = True
  valid[:, :, c:] = True
  valid[1, :, s - 5 :] = False
  return *(jnp.asarray(x, dtype) for x in (q, k, v)), valid


def _dense_after(q, k, v, valid, c):
  """From the definition, in float64: query r (key slot c + r) of head n attends to the keys
  j <= c + r valid in its KV head ``n // G``."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  g = n // k.shape[1]
  out = np.zeros(q.shape)
  for bi in range(b):
    for head in range(n):
      kv = head // g
      for r in range(t):
        keys = np.flatnonzero(valid[bi, kv, : c + r + 1])
        s = k[bi, kv, keys] @ q[bi, r, head] / np.sqrt(h)
        e = np.exp(s - s.max())
        out[bi, r, head] = e @ v[bi, kv, keys] / e.sum()
  return out


AFTER_CASES = [  # platform, C, T, N, K, H, dtype, seed, kernel tiles
  (None, 100, 60, 4, 2, 32, F32, 10, (32, 128)),  # key tile 0 all cache; T padded to 64
  (None, 300, 32, 2, 2, 16, F32, 11, (None, None)),  # default tiles (shrunk); one query block
  (None, 70, 90, 4, 1, 32, BF16, 12, (16, 128)),  # G=4
  ("gpu", 37, 24, 4, 2, 24, F32, 13, (16, 32)),  # H 24 -> 32; keys padded 61 -> 64
  ("gpu", 5, 70, 3, 1, 40, F32, 14, (32, 16)),  # a short cache, key tiles < query's
]


@pytest.mark.parametrize("platform,c,t,n,kh,h,dtype,seed,tiles", AFTER_CASES)
def test_kernel_after_a_cache_matches_reference_and_dense(
  platform, c, t, n, kh, h, dtype, seed, tiles
):
  """Queries at key slots C.. over a cache whose KV heads kept different slots: the kernel
  equals the reference (with the same offset) and a dense float64 softmax."""
  q, k, v, valid = _after_cache(seed, c, t, n, kh, h, dtype)
  got = fa.causal_attention_pallas(
    q, k, v, valid, *tiles, offset=c, interpret=True, platform=platform
  )
  assert got.shape == q.shape and got.dtype == dtype
  rtol = 1e-5 if dtype == F32 else 1e-2
  want = fa.causal_attention_reference(q, k, v, jnp.asarray(valid), t, c + t, offset=c)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
  dense = _dense_after(q, k, v, valid, c)
  np.testing.assert_allclose(got, dense, rtol=rtol, atol=rtol * np.abs(dense).max())


def test_the_cache_slots_a_head_did_not_keep_are_never_keys():
  """NaN K/V at the cache slots KV head 1 did not keep: its outputs stay exact, and marking
  one of them valid makes every query of that head NaN."""
  q, k, v, valid = _after_cache(15, 64, 32, 4, 2, 16, F32)
  dropped = ~valid[:, 1, :64]
  assert dropped.any()
  k = k.at[:, 1, :64].set(jnp.where(jnp.asarray(dropped)[..., None], jnp.nan, k[:, 1, :64]))
  for platform, tiles in ((None, (32, 128)), ("gpu", (16, 32))):
    call = lambda m: np.asarray(
      fa.causal_attention_pallas(q, k, v, m, *tiles, offset=64, interpret=True, platform=platform)
    )
    got = call(valid)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _dense_after(q, k, v, valid, 64), rtol=1e-5, atol=1e-5)
    row, slot = np.argwhere(dropped)[0]
    leaked = valid.copy()
    leaked[row, 1, slot] = True
    assert np.isnan(call(leaked)[row, :, 2:]).all()  # heads 2, 3 read KV head 1


@pytest.mark.parametrize("platform,target", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernel_after_a_cache_lowers(platform, target):
  q, k, v, valid = _after_cache(16, 200, 56, 8, 2, 64, F32)
  fn = jax.jit(functools.partial(fa.causal_attention_pallas, offset=200, platform=platform))
  assert kernel_calls(lowered(fn, q, k, v, valid, target=target), target) == 1


def test_a_next_turn_runs_the_kernel_where_kernels_run(monkeypatch):
  """`causal_attention` with an offset: the reference on CPU, the kernel in interpret mode (what
  TPU/GPU run), with equal outputs."""
  q, k, v, valid = _after_cache(17, 96, 32, 4, 2, 16, F32)
  args = (q, k, v, jnp.asarray(valid), 32, 128)
  jaxpr = lambda: str(
    jax.make_jaxpr(lambda *a: fa.causal_attention(*a, 32, 128, offset=96))(*args[:4])
  )
  monkeypatch.delenv("JMMKV_KERNELS", raising=False)
  assert "pallas_call" not in jaxpr()
  want = np.asarray(fa.causal_attention(*args, offset=96))
  monkeypatch.setenv("JMMKV_KERNELS", "interpret")
  assert "pallas_call" in jaxpr()
  got = np.asarray(fa.causal_attention(*args, offset=96))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  with pytest.raises(ValueError, match="multiple"):
    fa.causal_attention(*args[:4], 32, 96, offset=96)
