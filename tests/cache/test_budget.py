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
