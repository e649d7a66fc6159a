"""The K/V gather (`jmmkv.kernels.gather`): the Pallas TPU DMA kernel in TPU interpret mode
against its take_along_axis reference, bitwise."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmmkv.cache import select
from jmmkv.cache.policies.base import PromptKV
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


def test_gather_lowers_for_tpu():
  """Mosaic lowering from the CPU host (no TPU compile): one kernel per prefetch chunk."""
  args = case(0, 10, 300, 128, 100, jnp.bfloat16)
  fn = jax.jit(functools.partial(kg.gather_kv, block=kg.GatherBlocks(prefetch=512)))
  text = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call(") == 3  # Cp = 128: 4 rows per call


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
