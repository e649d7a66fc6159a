import pytest

import jmmkv
from jmmkv.cache.budget import Budget


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(), "exactly one"),
    (dict(ratio=0.5, tokens=4), "exactly one"),
    (dict(ratio=0.0), r"\(0, 1\]"),
    (dict(ratio=1.2), r"\(0, 1\]"),
    (dict(ratio=-0.1), r"\(0, 1\]"),
    (dict(tokens=0), "positive"),
    (dict(tokens=2.5), "positive"),
    (dict(tokens=True), "positive"),
    (dict(ratio=float("nan")), r"\(0, 1\]"),
    (dict(ratio="0.2"), "number"),
    (dict(ratio=True), "number"),
  ],
)
def test_budget_out_of_range(kw, match):
  with pytest.raises(ValueError, match=match):
    Budget(**kw)


@pytest.mark.parametrize(
  "budget, n, want",
  [
    (Budget(ratio=0.2), 100, 20),
    (Budget(ratio=0.2), 101, 21),
    (Budget(ratio=1.0), 37, 37),
    (Budget(ratio=0.001), 50, 1),
    (Budget(tokens=64), 100, 64),
    (Budget(tokens=64), 10, 10),
  ],
)
def test_budget_kept(budget, n, want):
  assert budget.kept(n) == want


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ratio_kept_is_ceil_of_the_decimal_on_host_and_under_jit(seed):
  """ceil(r T) with r read as the decimal it prints as (exact rational arithmetic), for ratios
  with up to 4 decimals, tiny ones included, and prompts long enough that T * p overflows int32."""
  import jax
  import numpy as np
  from fractions import Fraction

  rng = np.random.default_rng(seed)
  ratios = [0.0004, 0.2501, 0.9999, 0.05, 0.2] + [
    int(x) / 10_000 for x in rng.integers(1, 10_001, 5)
  ]
  lengths = np.concatenate([[1, 7, 2500, 99_991, 1 << 20], rng.integers(1, 1 << 21, 11)])
  for r in ratios:
    want = [
      min(t, max(1, -(-t * Fraction(str(r)).numerator // Fraction(str(r)).denominator)))
      for t in lengths
    ]
    b = Budget(ratio=r)
    assert [b.kept(int(t)) for t in lengths] == want, r
    got = jax.jit(b.kept_B)(np.asarray(lengths, np.int32))
    assert got.tolist() == want, r


def test_numpy_scalars_are_read_as_python_numbers():
  import numpy as np

  assert type(Budget(ratio=np.float32(0.2)).ratio) is float
  assert Budget(ratio=np.float32(0.2)).kept(1000) == 200  # the float32 0.2 reads as 1/5
  assert Budget(tokens=np.int64(64)).kept(100) == 64
  assert Budget(ratio=1 / 3).kept(3000) == 1000


def test_unknown_policy_lists_valid_names():
  with pytest.raises(ValueError, match=r"unknown policy 'snapkvv'.*valid policies: .*full"):
    jmmkv.policies.get("snapkvv")


def test_full_ignores_budget_and_keeps_everything():
  import numpy as np
  from jmmkv.models.configs import tiny_decoder

  cfg = tiny_decoder(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
  )
  model = jmmkv.random_model(cfg, seed=3)
  batch = model.prepare(input_ids=[np.random.default_rng(0).integers(3, 256, 40)])
  a = jmmkv.generate(
    model, batch, jmmkv.policies.get("full"), Budget(ratio=0.1), max_new_tokens=5, eos_token_id=[]
  )
  b = jmmkv.generate(model, batch, max_new_tokens=5, eos_token_id=[])
  assert a.tokens == b.tokens and a.stats["kept_fraction"] == 1.0
