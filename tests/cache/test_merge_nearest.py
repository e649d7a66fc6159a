"""merge.nearest (blocked evicted x kept search) vs the float64 reference merge_ref.nearest."""

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
