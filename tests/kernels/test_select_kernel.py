"""The sort-free top-n selection (`jmmkv.kernels.select`): the Pallas kernel in interpret mode and
the cumsum + binary-search compaction against their sort-based references, exactly."""

import functools

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest

from jmmkv.cache import select
from jmmkv.kernels import select as ks

SEEDS = (0, 1, 2)
keep_interpret = jax.jit(functools.partial(ks.keep_mask, interpret=True))
keep_reference = jax.jit(ks.keep_mask_reference)
compact = jax.jit(ks.compact, static_argnums=1)
compact_reference = jax.jit(ks.compact_reference, static_argnums=1)

# Few distinct values, so ties are common: -inf (duplicated), +-0, negative and positive scores.
SCORES = np.array([-np.inf, -np.inf, -3.5, -1.0, -0.0, 0.0, 0.25, 2.0, 7.0], np.float32)


def case(seed: int, r: int, t: int, extreme: bool = False):
  """Random (score, level, valid, n) ``[R, T]`` x3 and ``[R]``: ties, empty rows, n = 0 and
  n >= count(valid). ``extreme``: continuous scores and int32-range levels instead."""
  rng = np.random.default_rng(seed)
  if extreme:
    score = rng.standard_normal((r, t)).astype(np.float32) * 10.0 ** rng.integers(-30, 30, (r, t))
    score[rng.random((r, t)) < 0.1] = -np.inf
    lv = np.array([-(2**31), -7, -1, 0, 3, 2**31 - 1], np.int64)
    level = rng.choice(lv, (r, t)).astype(np.int32)
  else:
    score = rng.choice(SCORES, (r, t))
    level = rng.integers(0, 3, (r, t)).astype(np.int32)
  valid = rng.random((r, t)) < 0.7
  if r > 1:
    valid[1] = False  # a row with no candidates
  n = rng.integers(0, t + 1, r)
  n[0] = 0
  n[-1] = t + 2  # n >= count(valid)
  if r > 2:
    n[2] = valid[2].sum()
  return score, level, valid, n.astype(np.int32)


@pytest.mark.parametrize("r,t", [(1, 1), (3, 7), (10, 33), (3, 130), (1, 257)])
def test_keep_mask_matches_reference(r, t):
  for seed in SEEDS:
    args = case(seed, r, t)
    want = keep_reference(*args)
    np.testing.assert_array_equal(keep_interpret(*args), want, err_msg=f"seed {seed}")
    counts = np.minimum(np.maximum(args[3], 0), args[2].sum(-1))
    np.testing.assert_array_equal(np.asarray(want).sum(-1), counts)
    for c in (5, t + 3):
      np.testing.assert_array_equal(compact(want, c), compact_reference(want, c))


def test_keep_mask_extreme_levels_and_scores():
  """Levels over the whole int32 range (sign phase), scores from 1e-30 to 1e30 and -inf."""
  for seed in SEEDS:
    args = case(seed, 10, 130, extreme=True)
    np.testing.assert_array_equal(keep_interpret(*args), keep_reference(*args))


def test_keep_mask_other_block_rows():
  args = case(3, 10, 33)
  got = ks.keep_mask(*args, block=ks.SelectBlocks(rows=16), interpret=True)
  np.testing.assert_array_equal(got, keep_reference(*args))


def test_compact_first_capacity_and_empty_rows():
  rng = np.random.default_rng(0)
  keep = rng.random((10, 33)) < 0.5
  keep[1] = False
  keep[2] = True
  for c in (1, 5, 33, 40):
    got = np.asarray(compact(keep, c))
    np.testing.assert_array_equal(got, compact_reference(keep, c))
    assert got.shape == (10, c)
    want2 = np.pad(np.arange(33), (0, max(0, c - 33)), constant_values=-1)[:c]
    np.testing.assert_array_equal(got[2], want2)
    assert (got[1] == -1).all()


def primitives(jaxpr) -> set[str]:
  """Names of every primitive in a jaxpr and its sub-jaxprs (pallas_call kernels included)."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jcore.ClosedJaxpr):
          names |= primitives(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          names |= primitives(sub)
  return names


def test_kernel_path_is_sort_free():
  score, level, valid, n = case(0, 3, 33)
  kernel = jax.make_jaxpr(lambda *a: ks.compact(ks.keep_mask(*a, interpret=True), 5))
  reference = jax.make_jaxpr(lambda *a: ks.compact_reference(ks.keep_mask_reference(*a), 5))
  got = primitives(kernel(score, level, valid, n).jaxpr)
  assert "pallas_call" in got and "sort" not in got
  assert "sort" in primitives(reference(score, level, valid, n).jaxpr)  # the walker sees sorts
  assert "sort" not in primitives(jax.make_jaxpr(lambda k: ks.compact(k, 40))(valid).jaxpr)


@pytest.mark.parametrize("platform,target", [("tpu", "tpu"), ("gpu", "cuda")])
def test_keep_mask_lowers(platform, target):
  """Lowering for a TPU (Mosaic) or GPU (Triton) target from the CPU host (no compile)."""
  args = case(0, 10, 300)
  fn = jax.jit(functools.partial(ks.keep_mask, platform=platform))
  text = fn.trace(*args).lower(lowering_platforms=(target,)).as_text()
  assert ("tpu_custom_call" if platform == "tpu" else "triton") in text


def test_cache_top_positions_interpret_equals_reference(monkeypatch):
  rng = np.random.default_rng(1)
  l, b, k, t = 2, 2, 3, 33
  score = jnp.asarray(rng.choice(SCORES, (l, b, k, t)))
  level = jnp.asarray(rng.integers(0, 3, (l, b, 1, t)), jnp.int32)  # broadcast over heads
  valid = jnp.asarray(np.arange(t)[None] < np.array([[t], [20]]).reshape(b, 1))
  n = jnp.asarray(rng.integers(0, 25, (l, b, k)), jnp.int32)
  out = {}
  for m in ("reference", "interpret"):
    monkeypatch.setenv("JMMKV_KERNELS", m)
    out[m] = (
      select.top_positions(score, level, valid, n, 12),
      select.positions_from_mask(score > 0, 12),
    )
  for got, want in zip(out["interpret"], out["reference"]):
    assert got.shape == (l, b, k, 12)
    np.testing.assert_array_equal(got, want)


def test_keep_mask_nan_scores_rank_below_minus_inf():
  """NaN of either sign ranks last (below -inf), ties among NaN by position, as the sort does;
  checked against a hand-written order, not only the reference."""
  for seed in SEEDS:
    rng = np.random.default_rng(seed)
    r, t = 4, 37
    score = rng.choice(np.array([np.nan, -np.nan, -np.inf, 0.0, 1.5, -2.0], np.float32), (r, t))
    level = rng.integers(0, 2, (r, t)).astype(np.int32)
    valid = rng.random((r, t)) < 0.8
    n = rng.integers(0, t + 1, r).astype(np.int32)
    got = np.asarray(keep_interpret(score, level, valid, n))
    np.testing.assert_array_equal(got, keep_reference(score, level, valid, n))
    for row in range(r):
      nan = np.isnan(score[row])
      key = [(-level[row, i], nan[i], 0.0 if nan[i] else -score[row, i], i) for i in range(t)]
      order = [i for i in sorted(range(t), key=lambda i: key[i]) if valid[row, i]]
      np.testing.assert_array_equal(np.nonzero(got[row])[0], sorted(order[: n[row]]))


def test_keep_mask_counts_stay_int32_under_x64():
  """With jax_enable_x64 the kernel still lowers for TPU (Mosaic has no 64-bit types)."""
  args = case(0, 10, 300)
  with jax.enable_x64(True):
    fn = jax.jit(functools.partial(ks.keep_mask, platform="tpu"))
    text = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text


def test_rows_too_long_for_the_tpu_vmem_are_refused():
  """Without a TPU the VMEM is taken as the smallest TPU's (16 MiB): rows of 64k do not fit, and
  the dispatcher (`top_positions`) sorts instead on a TPU."""
  assert ks.fits_tpu(16384) and not ks.fits_tpu(65536)
  args = case(0, 2, 65536)
  with pytest.raises(ValueError, match="VMEM"):
    jax.jit(functools.partial(ks.keep_mask, platform="tpu")).trace(*args)
