"""StreamingLLM, H2O, SnapKV, PyramidKV and AdaKV vs their independent NumPy references, on the
dense attention of tiny transformers models (text Llama and LLaVA with images), batch 2."""

import jax.numpy as jnp
import numpy as np
import pytest

import jmmkv
from policy_harness import assert_same_kept, mm_setup, text_setup
from references.adakv_ref import adakv
from references.h2o_ref import h2o
from references.pyramidkv_ref import layer_budgets, pyramidkv
from references.snapkv_ref import snapkv
from references.streaming_ref import streaming

pytestmark = pytest.mark.usefixtures("dense_store")  # suite time: see conftest

CASES = [
  ("streaming", streaming, dict()),
  ("streaming", streaming, dict(sinks=2)),
  ("h2o", h2o, dict()),
  ("h2o", h2o, dict(recent_fraction=0.25)),
  ("snapkv", snapkv, dict(window=8)),
  ("snapkv", snapkv, dict(window=8, kernel=3, pooling="max")),
  ("snapkv", snapkv, dict(window=4, kernel=1)),
  ("pyramidkv", pyramidkv, dict(window=8)),
  ("pyramidkv", pyramidkv, dict(window=4, beta=5.0)),
  ("adakv", adakv, dict(window=8)),
  ("adakv", adakv, dict(window=8, alpha_safeguard=0.5, pooling="max", kernel=3)),
]


def _case_id(x) -> str:  # stable across processes (no function addresses): pytest-xdist
  return x if isinstance(x, str) else getattr(x, "__name__", None) or str(x)


BUDGETS = [dict(ratio=0.2), dict(ratio=0.5), dict(tokens=6)]


def _check(setup, name, ref_fn, kw, budget):
  cache = jmmkv.compress(
    setup.model, setup.batch, jmmkv.policies.get(name, **kw), jmmkv.Budget(**budget)
  )
  k, v = np.asarray(cache.k), np.asarray(cache.v)
  for b, row in enumerate(setup.rows):
    ref = ref_fn(row["attn"], row["keys"], row["values"], row["modality"], **budget, **kw)
    assert_same_kept(cache, b, ref["kept"], f"{name} {kw} {budget} row {b}")
    np.testing.assert_array_equal((np.asarray(cache.positions)[:, b] >= 0).sum(-1), ref["counts"])
    for l in range(len(ref["kept"])):
      for h, kept in enumerate(ref["kept"][l]):
        np.testing.assert_allclose(
          k[l, b, h, : len(kept)], ref["k"][l][h, : len(kept)], atol=1e-5, rtol=1e-5
        )
        np.testing.assert_allclose(
          v[l, b, h, : len(kept)], ref["v"][l][h, : len(kept)], atol=1e-5, rtol=1e-5
        )


@pytest.fixture(scope="module", params=[0, 1, 2])
def text(request, tmp_path_factory):
  return text_setup(tmp_path_factory.mktemp("text"), request.param, [70, 29])


@pytest.fixture(scope="module", params=[("llava", 0), ("llava", 1), ("qwen2_vl", 0)], ids=str)
def llava(request, tmp_path_factory):
  family, seed = request.param
  return mm_setup(tmp_path_factory.mktemp(family), seed, family)


@pytest.mark.parametrize("name, ref_fn, kw", CASES, ids=_case_id)
@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_text_model(text, name, ref_fn, kw, budget):
  _check(text, name, ref_fn, kw, budget)


@pytest.mark.parametrize("name, ref_fn, kw", CASES, ids=_case_id)
def test_llava_with_images(llava, name, ref_fn, kw):
  _check(llava, name, ref_fn, kw, dict(ratio=0.25))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pyramidkv_layer_counts_match_the_reference(seed):
  """Per-layer counts over random prompt lengths, budgets, windows, betas and depths (one layer,
  the clamped ramp and the short-prompt fallback to SnapKV included)."""
  rng = np.random.default_rng(seed)
  for _ in range(40):
    lengths = rng.integers(1, 400, 3)
    layers, window = int(rng.integers(1, 9)), int(rng.choice([1, 4, 8, 32]))
    beta = float(rng.choice([1.5, 5.0, 20.0]))
    budget = jmmkv.Budget(ratio=float(rng.integers(1, 101)) / 100)
    policy = jmmkv.policies.get("pyramidkv", window=window, beta=beta)
    lengths_B = jnp.asarray(lengths, jnp.int32)
    got = np.asarray(policy.layer_counts(budget.kept_B(lengths_B), lengths_B, layers))
    for b, t in enumerate(lengths):
      want = layer_budgets(int(t), budget.kept(int(t)), layers, window, beta)
      np.testing.assert_array_equal(got[:, b], want, f"T={t} {budget} L={layers} w={window}")
