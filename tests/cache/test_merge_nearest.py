"""merge.nearest (blocked evicted x kept search) and merge.merge_kept's released-code rules vs the
float64 references merge_ref.nearest and merge_ref.merge_code_compat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmmkv.cache import merge
from references import merge_ref


def _keys(rng, r, t, h, distinct):
  """Keys drawn from ``distinct`` random vectors (exact copies: real ties), some zero rows."""
  base = rng.standard_normal((distinct, h)).astype(np.float32)
  k = base[rng.integers(0, distinct, (r, t))]
  k[rng.random((r, t)) < 0.05] = 0.0
  return k


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
  "t,block,distinct,groups", [(37, 8, 5, 1), (64, 16, 1000, 1), (50, 128, 3, 1), (37, 8, 5, 3)]
)
# None: the slot search; "fine" / "whole": the sub-block search with the smallest sub-block that
# divides the block, or one sub-block per block
@pytest.mark.parametrize("sub", [None, "fine", "whole"])
def test_nearest_matches_reference(seed, t, block, distinct, groups, sub):
  rng = np.random.default_rng(seed)
  r, h = 6, 7
  k = _keys(rng, r, t, h, distinct)
  u = rng.random((r, t))
  keep = u < rng.uniform(0.1, 0.6, (r, 1))  # a different kept count per row
  keep[0] = False  # a row with nothing kept: no targets
  keep[1, : t // 2] = True
  evict = ~keep & (rng.random((r, t)) < 0.9)  # some positions neither kept nor evicted
  run_block = min(block * (2 if groups > 1 else 1), t)  # the block each search step uses
  size = {"fine": min(d for d in range(2, run_block + 1) if run_block % d == 0), "whole": run_block}
  paths = {} if sub is None else dict(sub=size[sub], sub_from=0)
  target, cos = merge.nearest(
    jnp.asarray(k), jnp.asarray(keep), jnp.asarray(evict), block, groups=groups, **paths
  )
  target, cos = np.asarray(target), np.asarray(cos)
  for row in range(r):
    kept, ev = np.flatnonzero(keep[row]), np.flatnonzero(evict[row])
    idx, best = merge_ref.nearest(k[row], kept, ev)
    want = np.full(t, -1)
    want_cos = np.zeros(t)
    if len(kept):
      want[ev], want_cos[ev] = kept[idx], best
    np.testing.assert_array_equal(target[row], want, err_msg=f"row {row}")
    np.testing.assert_allclose(cos[row], want_cos, rtol=1e-5, atol=1e-6, err_msg=f"row {row}")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rule", merge.CODE_RULES)
def test_code_merges_match_reference(seed, rule):
  """The released code's filtered merges (the paper rules: tests/cache/test_lookm.py) on random
  [L, B, K, T, H] K/V, rows of two lengths (padding neither kept nor evicted), a different kept
  set per head but one count per (layer, row), as the filter needs; it drops some tokens."""
  rng = np.random.default_rng(seed)
  l, b, kh, t, h = 2, 2, 3, 40, 8
  k = rng.standard_normal((l, b, kh, t, h)).astype(np.float32)
  k[rng.random((l, b, kh, t)) < 0.05] = 0.0
  v = rng.standard_normal((l, b, kh, t, h)).astype(np.float32)
  lengths = [t, 29]
  keep = np.zeros((l, b, kh, t), bool)
  for i, j in np.ndindex(l, b):
    count = rng.integers(2, lengths[j] // 2)
    for g in range(kh):
      keep[i, j, g, rng.choice(lengths[j], count, replace=False)] = True
  evict = (np.arange(t) < np.array(lengths)[:, None])[None, :, None] & ~keep
  positions = np.full((l, b, kh, t // 2), -1, np.int32)  # one shape for every seed: one compile
  for idx in np.ndindex(l, b, kh):
    p = np.flatnonzero(keep[idx])
    positions[idx][: len(p)] = p
  run = jax.jit(merge.merge_kept, static_argnums=4)
  got = run(*map(jnp.asarray, (k, v, keep, evict)), rule, jnp.asarray(positions))
  dropped = False
  for i, j in np.ndindex(l, b):
    kept, ev = [np.flatnonzero(x) for x in keep[i, j]], [np.flatnonzero(x) for x in evict[i, j]]
    want = merge_ref.merge_code_compat(k[i, j], v[i, j], kept, ev, rule.removesuffix("-code"))
    for x, name in zip(got, "kv"):
      c = want[name].shape[1]
      np.testing.assert_allclose(x[i, j, :, :c], want[name], rtol=1e-5, atol=1e-5)
      assert not np.asarray(x[i, j, :, c:]).any()
    dropped |= any((x == -1).any() for x in want["target"])
  assert dropped
