"""`jmmkv.compare.generate_each` against `jmmkv.generate`, pair by pair: the same tokens, logits
of the first step and kept cache, on a tiny LLaVA with images, batch 2 of different lengths, a
prompt over several attention tiles, policies of every kind of statistic (window, column sums
with merging and a survey, a carry with a page pool) and two windows that cannot share a forward."""

import numpy as np
import pytest

import jmmkv
from jmmkv import compare
from jmmkv.cache.paged import PagedKVCache
from mm_models import build_mm_model, make_case

# The tiny LLaVA's max_position_embeddings is 512; the prompt is longer, for several key tiles.
pytestmark = pytest.mark.filterwarnings("ignore:the prompt plus max_new_tokens")

JOBS = [
  ("meda", 0.2),
  ("madakv:proxy_window=8", 0.2),
  ("adakv", 0.25),  # window 32: a second forward (madakv's is 8)
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  hf = build_mm_model("llava", 0)
  path = tmp_path_factory.mktemp("llava_compare")
  hf.save_pretrained(path)
  model = jmmkv.load(path)
  case = make_case(
    model,
    "llava",
    np.random.default_rng(1),
    [[200, "image", 170, "image", 250], [30, "image", 40]],
    images=3,
    side="right",
  )
  return model, model.prepare(input_ids=case.ids, attention_mask=case.mask, **case.arrays)


@pytest.fixture(scope="module")
def each(setup):
  model, batch = setup
  return compare.generate_each(
    model, batch, JOBS, max_new_tokens=3, eos_token_id=[], layout="dense", return_cache=True
  )


def test_groups_split_conflicting_statistics(setup):
  model, batch = setup
  specs = [jmmkv.policies.from_spec(p).stats for p, _ in JOBS]
  got = compare.groups(specs)
  assert [members for members, _ in got] == [[0, 1], [2]]
  assert {x.name for x in got[0][1]} == {"window", "colsum"}


@pytest.mark.parametrize("i", range(len(JOBS)))
def test_equals_generate(setup, each, i):
  model, batch = setup
  policy, budget = JOBS[i]
  want = jmmkv.generate(
    model,
    batch,
    policy,
    budget,
    max_new_tokens=3,
    eos_token_id=[],
    layout="dense",
    return_cache=True,
  )
  got = each[i]
  assert max(batch.lengths) > 512  # several key tiles
  assert got.tokens == want.tokens
  np.testing.assert_array_equal(
    got.stats["kept_tokens_per_layer_head"], want.stats["kept_tokens_per_layer_head"]
  )
  for name in ("positions", "modality", "k", "v"):
    a, b = np.asarray(getattr(got.cache, name)), np.asarray(getattr(want.cache, name))
    np.testing.assert_array_equal(a, b, err_msg=f"{policy}: cache.{name}")
  assert got.stats["kept_fraction"] < 1.0


def test_kept_mask_of_dense_and_paged_layouts(setup, each):
  model, batch = setup
  i = [p for p, _ in JOBS].index("madakv:proxy_window=8")
  paged = jmmkv.generate(
    model, batch, JOBS[i][0], JOBS[i][1], max_new_tokens=2, layout="paged", return_cache=True
  )
  assert isinstance(paged.cache, PagedKVCache)
  t = max(batch.lengths)
  dense = compare.kept_mask(each[i].cache, t)
  np.testing.assert_array_equal(compare.kept_mask(paged.cache, t), dense)
  pos = np.asarray(each[i].cache.positions)  # [L, B, K, C]
  assert dense.sum() == (pos >= 0).sum() and dense.any(-1).all()
  l, b, k = -1, 1, 0
  np.testing.assert_array_equal(
    np.nonzero(dense[l, b, k])[0], np.sort(pos[l, b, k][pos[l, b, k] >= 0])
  )


def test_bad_jobs_fail_before_any_work(setup):
  model, batch = setup
  with pytest.raises(ValueError, match="needs a budget"):
    compare.generate_each(model, batch, [("snapkv", None)])
  with pytest.raises(ValueError, match="unknown policy"):
    compare.generate_each(model, batch, [("snapkvv", 0.2)])
  with pytest.raises(ValueError, match="layout"):
    compare.generate_each(model, batch, [("snapkv", 0.2)], layout="sparse")
  with pytest.raises(TypeError, match="jmmkv Batch"):
    compare.generate_each(model, [[1, 2]], [("snapkv", 0.2)])
