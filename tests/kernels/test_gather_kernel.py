"""The K/V gather (`jmmkv.kernels.gather`): the Pallas TPU DMA kernel in TPU interpret mode
against its take_along_axis reference, bitwise."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmmkv.cache import select
from jmmkv.cache.prompt import PromptKV
from jmmkv.kernels import gather as kg

SEEDS = (0, 1, 2)
SMALL = kg.GatherBlocks(slots=8)


def case(seed: int, r: int, t: int, h: int, c: int, dtype):
  """Random non-zero K/V ``[R, T, H]`` and indices ``[R, C]`` in [-1, T) (duplicates, -1
  anywhere, a row of only -1)."""
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((r, t, h)) + 3.0
  v = -(rng.random((r, t, h)) + 0.5)
  idx = rng.integers(-1, t, (r, c))
  if r > 1:
    idx[1] = -1
  return jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(idx, jnp.int32)


def assert_bitwise(got, want):
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8))


@functools.cache
def jitted(block: kg.GatherBlocks):
  return jax.jit(functools.partial(kg.gather_kv, block=block, interpret=True))


@pytest.mark.parametrize(
  "r,t,h,c,dtype",
  [
    (1, 1, 8, 1, jnp.float32),
    (3, 7, 8, 12, jnp.bfloat16),  # C > T
    (10, 33, 16, 5, jnp.float32),
    (3, 130, 4, 40, jnp.bfloat16),
    (1, 257, 8, 40, jnp.float16),
  ],
)
def test_gather_matches_reference(r, t, h, c, dtype):
  for seed in SEEDS:
    args = case(seed, r, t, h, c, dtype)
    assert_bitwise(jitted(SMALL)(*args), kg.gather_kv_reference(*args))


def test_gather_default_slots_and_chunked_prefetch():
  """One slot block of 128; and indices split over several pallas_calls (aliased outputs)."""
  args = case(0, 5, 33, 8, 12, jnp.float32)
  want = kg.gather_kv_reference(*args)
  assert_bitwise(jitted(kg.GatherBlocks())(*args), want)
  assert_bitwise(jitted(kg.GatherBlocks(slots=16, prefetch=40))(*args), want)  # 3 calls of 2 rows


@pytest.mark.parametrize("x64", [False, True])
def test_gather_lowers_for_tpu_with_one_body_for_equal_chunks(x64):
  """Mosaic lowering from the CPU host (no TPU compile): one pallas_call per prefetch chunk, and
  chunks of equal size share one kernel body (the chunk's first row is a prefetched scalar, not
  a constant), so a long prompt compiles two kernels, not one per chunk. Also under x64."""
  args = case(0, 16, 300, 128, 100, jnp.bfloat16)
  fn = jax.jit(functools.partial(kg.gather_kv, block=kg.GatherBlocks(prefetch=512)))
  with jax.enable_x64(x64):
    text = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  bodies = re.findall(r'tpu_custom_call\(.*?backend_config = "([^"]*)"', text)
  assert len(bodies) == 4  # Cp = 128: 4 rows per call
  assert len(set(bodies)) == 2  # the first call (no aliased outputs) and the other three


def test_gather_of_no_slots_or_rows():
  for r, c in ((3, 0), (0, 5)):
    args = case(0, max(r, 1), 9, 8, c, jnp.float32)
    args = tuple(x[:r] for x in args)
    got = kg.gather_kv(*args, interpret=True)
    assert_bitwise(got, kg.gather_kv_reference(*args))
    assert got[0].shape == (r, c, 8)


def test_tpu_dispatch_only_for_32_bit_rows_of_at_most_128_words():
  f32, bf16 = jnp.zeros((2, 4, 128), jnp.float32), jnp.zeros((2, 4, 128), jnp.bfloat16)
  assert kg.tpu_kernel_ok(f32, f32)
  assert not kg.tpu_kernel_ok(bf16, bf16)  # the word view would copy all of K/V on a TPU
  assert not kg.tpu_kernel_ok(jnp.zeros((2, 4, 256), jnp.float32), f32)  # > 128 words a row


def test_cache_gather_interpret_equals_reference(monkeypatch):
  rng = np.random.default_rng(2)
  l, b, k, t, h, c = 2, 2, 2, 9, 8, 6
  kv = [jnp.asarray(rng.standard_normal((l, b, k, t, h)) + 1.0, jnp.bfloat16) for _ in range(2)]
  valid = jnp.ones((b, t), bool)
  prompt = PromptKV(
    *kv, valid, jnp.asarray(rng.integers(1, 3, (b, t)), jnp.int32), jnp.full((b,), t, jnp.int32)
  )
  idx = jnp.asarray(np.sort(rng.integers(-1, t, (l, b, k, c)), -1)[..., ::-1], jnp.int32)
  out = {}
  for m in ("reference", "interpret"):
    monkeypatch.setenv("JMMKV_KERNELS", m)
    out[m] = select.gather(prompt, idx)
  for got, want in zip(out["interpret"], out["reference"]):
    assert_bitwise((got,), (want,))
