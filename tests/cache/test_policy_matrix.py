"""Invariants every policy must hold, on random models and random prompts (text and multimodal)."""

import numpy as np
import pytest

import jmmkv
from jmmkv.models.configs import tiny_decoder

CFG = tiny_decoder(
  vocab_size=512,
  hidden_size=64,
  intermediate_size=128,
  num_layers=3,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
)
COMPRESSING = [n for n in jmmkv.policies.NAMES if n != "full"]
pytestmark = pytest.mark.usefixtures("dense_store")  # suite time: see conftest
SMALL = {"snapkv": dict(window=8), "pyramidkv": dict(window=8), "adakv": dict(window=8)}


def _policy(name):
  return jmmkv.policies.get(name, **SMALL.get(name, {}))


@pytest.fixture(scope="module")
def model():
  return jmmkv.random_model(CFG, seed=3)


def _prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, CFG.vocab_size, n) for n in lengths]


@pytest.mark.parametrize("name", COMPRESSING)
def test_budget_at_least_prompt_is_a_no_op(model, name):
  batch = model.prepare(input_ids=_prompts(0, [37, 20]))
  full = jmmkv.generate(model, batch, max_new_tokens=6, eos_token_id=[], output_scores=True)
  for budget in (jmmkv.Budget(ratio=1.0), jmmkv.Budget(tokens=37), jmmkv.Budget(tokens=500)):
    out = jmmkv.generate(
      model, batch, _policy(name), budget, max_new_tokens=6, eos_token_id=[], output_scores=True
    )
    assert out.tokens == full.tokens
    np.testing.assert_array_equal(out.scores, full.scores)
    assert out.stats["kept_fraction"] == 1.0


@pytest.mark.parametrize("name", COMPRESSING)
@pytest.mark.parametrize("seed", [0, 1])
def test_row_in_padded_batch_keeps_what_it_keeps_alone(model, name, seed):
  prompts = _prompts(seed, [61, 34, 33])  # alone, each a batch of one in the same bucket (64)
  budget = jmmkv.Budget(ratio=0.3)
  together = jmmkv.compress(model, model.prepare(input_ids=prompts), _policy(name), budget)
  for b, p in enumerate(prompts):
    alone = jmmkv.compress(model, model.prepare(input_ids=[p]), _policy(name), budget)
    pos_t, pos_a = np.asarray(together.positions)[:, b], np.asarray(alone.positions)[:, 0]
    for l in range(CFG.num_layers):
      for k in range(CFG.num_kv_heads):
        np.testing.assert_array_equal(pos_t[l, k][pos_t[l, k] >= 0], pos_a[l, k][pos_a[l, k] >= 0])
    np.testing.assert_allclose(
      np.asarray(together.k)[:, b][pos_t >= 0],
      np.asarray(alone.k)[:, 0][pos_a >= 0],
      atol=1e-5,
      rtol=1e-5,
    )


@pytest.mark.parametrize("name", COMPRESSING)
@pytest.mark.parametrize(
  "budget", [jmmkv.Budget(ratio=0.2), jmmkv.Budget(ratio=0.5), jmmkv.Budget(tokens=7)]
)
def test_kept_slots_are_valid_sorted_and_within_budget(model, name, budget):
  prompts = _prompts(5, [50, 23])
  cache = jmmkv.compress(model, model.prepare(input_ids=prompts), _policy(name), budget)
  pos = np.asarray(cache.positions)
  for b, p in enumerate(prompts):
    kept = (pos[:, b] >= 0).sum(-1)  # [L, K]
    n = budget.kept(len(p))
    total = CFG.num_layers * CFG.num_kv_heads * n
    assert kept.sum() == total  # total budget respected exactly (MadaKV's reading C included)
    for l in range(CFG.num_layers):
      for k in range(CFG.num_kv_heads):
        row = pos[l, b, k]
        live = row[row >= 0]
        assert np.all(np.diff(live) > 0) and live.max() < len(p)
        assert np.all(row[len(live) :] == -1)  # empty slots last
  mod = np.asarray(cache.modality)
  np.testing.assert_array_equal(mod[pos >= 0], 1)
  np.testing.assert_array_equal(mod[pos < 0], 0)


@pytest.mark.parametrize("name", COMPRESSING)
def test_compressing_policy_needs_a_budget(model, name):
  with pytest.raises(ValueError, match="needs a budget"):
    jmmkv.compress(model, model.prepare(input_ids=[[5, 6, 7]]), _policy(name), None)


@pytest.mark.parametrize(
  "name, kw, match",
  [
    ("streaming", dict(sinks=-1), "sinks"),
    ("h2o", dict(recent_fraction=1.5), "recent_fraction"),
    ("h2o", dict(gqa="median"), "gqa"),
    ("snapkv", dict(kernel=4), "kernel"),
    ("snapkv", dict(window=0), "window"),
    ("snapkv", dict(pooling="sum"), "pooling"),
    ("snapkv", dict(nonsense=1), "nonsense"),
    ("pyramidkv", dict(beta=0.5), "beta"),
    ("adakv", dict(alpha_safeguard=1.5), "alpha_safeguard"),
    ("adakv", dict(kernel=2), "kernel"),
    ("lookm", dict(merge="median"), "merge"),
    ("lookm", dict(recent_ratio=0, important_ratio=0), "important_ratio"),
    ("meda", dict(variant="both"), "variant"),
    ("meda", dict(split=(0, 0)), "split"),
    ("meda", dict(alpha_min=2.0), "alpha_min"),
    ("madakv", dict(theta=0), "theta"),
    ("madakv", dict(reading="D"), "reading"),
    ("madakv", dict(hcc_units="per_token"), "hcc_units"),
    ("madakv", dict(proxy_window=0), "proxy_window"),
  ],
)
def test_hyperparameters_out_of_range(name, kw, match):
  with pytest.raises((ValueError, TypeError), match=match):
    jmmkv.policies.get(name, **kw)
