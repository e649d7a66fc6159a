"""MEDA vs its independent reference (tests/references/meda_ref.py): kept sets, per-layer counts,
merged K/V, for the paper and released-code variants, on tiny LLaVA and Qwen2-VL."""

import numpy as np
import pytest

import jmmkv
from policy_harness import assert_same_kept, mm_setup, text_setup
from references.meda_ref import meda

VARIANTS = [
  dict(),
  dict(renormalise=True),
  dict(merge=False),
  dict(variant="code"),
  dict(variant="code", renormalise=True),
  dict(split=(1, 1), alpha_min=0.05),
  dict(keep_all_text=False),
  dict(variant="code", keep_all_text=False),
]


def _check(setup, kw, ratio):
  cache = jmmkv.compress(
    setup.model, setup.batch, jmmkv.policies.get("meda", **kw), jmmkv.Budget(ratio=ratio)
  )
  k, v = np.asarray(cache.k), np.asarray(cache.v)
  for b, row in enumerate(setup.rows):
    ref = meda(
      row["attn"],
      row["keys"],
      row["values"],
      row["modality"],
      queries=row["queries"],
      scaling=row["scaling"],
      ratio=ratio,
      **kw,
    )
    assert_same_kept(cache, b, ref["kept"], f"{kw} row {b}")
    np.testing.assert_array_equal((np.asarray(cache.positions)[:, b] >= 0).sum(-1), ref["counts"])
    for l, kept_l in enumerate(ref["kept"]):
      for h, kept in enumerate(kept_l):
        c = len(kept)
        np.testing.assert_allclose(k[l, b, h, :c], ref["k"][l][h, :c], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(v[l, b, h, :c], ref["v"][l][h, :c], atol=1e-5, rtol=1e-5)
  return ref


@pytest.fixture(scope="module", params=[("llava", 0), ("qwen2_vl", 0)], ids=str)
def setup(request, tmp_path_factory):
  family, seed = request.param
  return mm_setup(tmp_path_factory.mktemp("meda"), seed, family)


@pytest.fixture(scope="module")
def other_seed(tmp_path_factory):
  """Another random LLaVA, for the main readings (every variant runs on the two above)."""
  return mm_setup(tmp_path_factory.mktemp("meda"), 1, "llava")


# Every variant at 20%; at 50% the two scoring variants and the two readings of the budget.
CASES = [(kw, 0.2) for kw in VARIANTS] + [
  (kw, 0.5) for kw in (VARIANTS[0], VARIANTS[2], VARIANTS[3], VARIANTS[6])
]


@pytest.mark.parametrize("kw, ratio", CASES, ids=str)
def test_multimodal(setup, kw, ratio):
  _check(setup, kw, ratio)


@pytest.mark.parametrize("kw", [dict(), dict(variant="code", keep_all_text=False)], ids=str)
def test_multimodal_another_seed(other_seed, kw):
  _check(other_seed, kw, 0.2)


def test_layer_budgets_follow_the_entropy_softmax(setup):
  ref = _check(setup, dict(renormalise=True), 0.3)
  alpha = np.asarray(ref["layer_fractions"])
  np.testing.assert_allclose(alpha.mean(), ref["rho"], rtol=1e-9)
  e = np.asarray(ref["entropies"])
  order = np.argsort(e)
  assert np.all(np.diff(alpha[order]) >= -1e-12)  # more entropy, more budget


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_text_only_prompt(tmp_path, variant):
  _check(text_setup(tmp_path, 0, [66, 31]), dict(variant=variant), 0.3)


def test_keep_all_text_false_keeps_exactly_the_layer_budgets(setup):
  paper = _check(setup, dict(), 0.1)
  strict = _check(setup, dict(keep_all_text=False), 0.1)
  assert (paper["overrun"] > 0).any()  # text overruns S_l in the paper reading here
  np.testing.assert_array_equal(
    strict["counts"], np.broadcast_to(strict["layer_budgets"][:, None], strict["counts"].shape)
  )
