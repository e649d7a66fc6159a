"""LOOK-M vs its independent reference (tests/references/lookm_ref.py): kept sets, merged K/V."""

import numpy as np
import pytest

import jmmkv
from policy_harness import assert_same_kept, mm_setup, text_setup
from references.lookm_ref import lookm

VARIANTS = [
  dict(),
  dict(merge="average"),
  dict(merge="weighted"),
  dict(merge=None),
  dict(text_prior=False),
  dict(keep_all_text=False),
  dict(keep_all_text=False, merge="average", recent_ratio=0.05, important_ratio=0.15),
  dict(recent_ratio=0.3, important_ratio=0.1),
]


def _check(setup, kw, budget):
  """Compares with the reference; returns the cache and the references of the rows."""
  cache = jmmkv.compress(
    setup.model, setup.batch, jmmkv.policies.get("lookm", **kw), jmmkv.Budget(**budget)
  )
  k, v = np.asarray(cache.k), np.asarray(cache.v)
  refs = []
  for b, row in enumerate(setup.rows):
    ref = lookm(row["attn"], row["keys"], row["values"], row["modality"], **budget, **kw)
    refs.append(ref)
    assert_same_kept(cache, b, ref["kept"], f"{kw} row {b}")
    for l, kept_l in enumerate(ref["kept"]):
      for h, kept in enumerate(kept_l):
        c = len(kept)
        np.testing.assert_allclose(k[l, b, h, :c], ref["k"][l][h, :c], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(v[l, b, h, :c], ref["v"][l][h, :c], atol=1e-5, rtol=1e-5)
  return cache, refs


@pytest.fixture(scope="module", params=[("llava", 0), ("qwen2_vl", 0)], ids=str)
def llava(request, tmp_path_factory):
  family, seed = request.param
  return mm_setup(tmp_path_factory.mktemp(family), seed, family)


@pytest.fixture(scope="module", params=[1, 2])
def other_seed(request, tmp_path_factory):
  """More random LLaVAs, for the main readings (every variant runs on the two above)."""
  return mm_setup(tmp_path_factory.mktemp("llava"), request.param, "llava")


# Every variant at 20%; at 60% the ones whose split of the budget changes with its size.
CASES = [(kw, dict(ratio=0.2)) for kw in VARIANTS] + [
  (kw, dict(ratio=0.6)) for kw in (VARIANTS[0], VARIANTS[5], VARIANTS[7])
]


@pytest.mark.parametrize("kw, budget", CASES, ids=str)
def test_llava_with_images(llava, kw, budget):
  _check(llava, kw, budget)


@pytest.mark.parametrize("kw", [dict(), dict(merge="weighted", keep_all_text=False)], ids=str)
def test_llava_with_images_more_seeds(other_seed, kw):
  _check(other_seed, kw, dict(ratio=0.2))


@pytest.mark.parametrize("merge", ["average-code", "weighted-code"])
def test_released_code_merges(llava, merge):
  """The released code's filtered merges (merge_ref.merge_code_compat); the similarity filter
  drops some evicted tokens (every evicted token has a nearest kept one: the recent window)."""
  _, refs = _check(llava, dict(merge=merge), dict(ratio=0.2))
  assert any((t == -1).any() for ref in refs for layer in ref["target"] for t in layer)


@pytest.mark.parametrize("seed", [0, 1])
def test_text_only_prompt_falls_back_to_h2o_selection(tmp_path, seed):
  _check(text_setup(tmp_path, seed, [64, 27]), dict(), dict(ratio=0.3))


@pytest.mark.parametrize("ratio", [0.05, 0.2])
def test_keep_all_text_false_holds_the_budget(llava, ratio):
  """The paper reading overruns the budget when text before the window exceeds N; the literal
  eq. 8 reading keeps exactly n (and, like the reference, the best-scored text tokens)."""
  paper = _check(llava, dict(), dict(ratio=ratio))[1][-1]
  cache, (*_, strict) = _check(llava, dict(keep_all_text=False), dict(ratio=ratio))
  assert (paper["overrun"] > 0).any()  # the case where the two readings differ is exercised
  assert (strict["overrun"] == 0).all()
  kept_LBK = np.asarray(cache.kept_LBK())
  for b, n in enumerate(llava.batch.lengths):
    assert (kept_LBK[:, b] == jmmkv.Budget(ratio=ratio).kept(int(n))).all()
