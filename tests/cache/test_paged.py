"""The paged layout stores exactly the kept slots, allocates about their bytes, and decodes like
the dense layout (per-layer/-head budgets)."""

import jax
import jax.monitoring
import numpy as np
import pytest

import jmmkv
from jmmkv.cache import kv_cache, paged
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
POLICIES = {
  "adakv": dict(window=8),
  "pyramidkv": dict(window=8),
  "meda": dict(),
  "madakv": dict(proxy_window=8),
}


@pytest.fixture(scope="module")
def model():
  return jmmkv.random_model(CFG, seed=3)


def _batch(model, seed, lengths=(300, 170)):
  rng = np.random.default_rng(seed)
  return model.prepare(input_ids=[rng.integers(3, 512, n) for n in lengths])


def _slots(cache):
  """{(layer, row, head): sorted [(position, modality, k..., v...)]} from either layout."""
  out = {}
  if isinstance(cache, kv_cache.KVCache):
    pos, mod = np.asarray(cache.positions), np.asarray(cache.modality)
    k, v = np.asarray(cache.k), np.asarray(cache.v)
    for idx in np.argwhere(pos >= 0):
      l, b, h, c = idx
      row = (pos[l, b, h, c], mod[l, b, h, c], *k[l, b, h, c], *v[l, b, h, c])
      out.setdefault((l, b, h), []).append(row)
  else:
    kh = cache.append_k.shape[2]
    for l in range(len(cache.k)):
      pos, mod = np.asarray(cache.positions[l]), np.asarray(cache.modality[l])
      own, k, v = np.asarray(cache.owner[l]), np.asarray(cache.k[l]), np.asarray(cache.v[l])
      for p, s in np.argwhere(pos >= 0):
        row = (pos[p, s], mod[p, s], *k[p, s], *v[p, s])
        out.setdefault((l, own[p] // kh, own[p] % kh), []).append(row)
  return {key: sorted(rows) for key, rows in out.items()}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["adakv", "pyramidkv"])
def test_paged_cache_holds_exactly_the_kept_slots(model, name, seed):
  policy, budget = jmmkv.policies.get(name, **POLICIES[name]), jmmkv.Budget(ratio=0.2)
  batch = _batch(model, seed)
  kw = dict(max_new_tokens=1, return_cache=True)
  dense = jmmkv.generate(model, batch, policy, budget, layout="dense", **kw)
  paged_out = jmmkv.generate(model, batch, policy, budget, layout="paged", **kw)
  d, p = dense.cache, paged_out.cache
  assert isinstance(d, kv_cache.KVCache) and isinstance(p, paged.PagedKVCache)
  np.testing.assert_array_equal(p.kept_LBK(), d.kept_LBK())
  assert _slots(p) == _slots(d)
  # Owners ascend; padding pages (owner B*K) are empty; a page never mixes owners.
  for own, pos in zip(p.owner, p.positions):
    own, pos = np.asarray(own), np.asarray(pos)
    assert np.all(np.diff(own) >= 0)
    assert np.all(pos[own == 2 * CFG.num_kv_heads] < 0)
  # Allocated prefix bytes: the kept slots rounded up to pages, per (layer, row, head), plus the
  # page-count rounding (at most 1/32 of a layer's pages, or one page).
  slot_bytes = 2 * CFG.head_dim * 4
  kept = d.kept_LBK()
  size = p.page_size
  assert size == paged.page_size_for(kept) and size & (size - 1) == 0
  needed = (-(-kept // size)).reshape(len(kept), -1).sum(-1)
  prefix = sum(x.nbytes for x in (*p.k, *p.v))
  assert prefix >= needed.sum() * size * slot_bytes
  assert prefix <= sum(n + max(1, n // 32) for n in needed) * size * slot_bytes
  assert p.kv_bytes_used() == d.kv_bytes_used() == kept.sum() * slot_bytes


@pytest.mark.parametrize("name", list(POLICIES))
def test_paged_decoding_equals_dense(model, name):
  policy, budget = jmmkv.policies.get(name, **POLICIES[name]), jmmkv.Budget(ratio=0.25)
  batch = _batch(model, 7, lengths=(260, 90))
  kw = dict(max_new_tokens=10, eos_token_id=[], output_scores=True)
  dense = jmmkv.generate(model, batch, policy, budget, layout="dense", **kw)
  pag = jmmkv.generate(model, batch, policy, budget, layout="paged", **kw)
  assert pag.tokens == dense.tokens
  np.testing.assert_allclose(pag.scores, dense.scores, atol=2e-5, rtol=1e-5)
  assert pag.stats["kv_bytes_used"] == dense.stats["kv_bytes_used"]
  np.testing.assert_array_equal(
    pag.stats["kept_tokens_per_layer_head"], dense.stats["kept_tokens_per_layer_head"]
  )


def test_auto_layout_picks_the_smaller(model):
  batch = _batch(model, 2, lengths=(500, 260))
  kw = dict(max_new_tokens=2, return_cache=True)
  snap = jmmkv.generate(
    model, batch, jmmkv.policies.get("snapkv", window=8), jmmkv.Budget(ratio=0.2), **kw
  )
  assert isinstance(snap.cache, kv_cache.KVCache)  # uniform counts: dense is already exact
  pyr = jmmkv.generate(
    model, batch, jmmkv.policies.get("pyramidkv", window=8), jmmkv.Budget(ratio=0.2), **kw
  )
  dense = jmmkv.generate(
    model,
    batch,
    jmmkv.policies.get("pyramidkv", window=8),
    jmmkv.Budget(ratio=0.2),
    layout="dense",
    **kw,
  )
  assert isinstance(pyr.cache, paged.PagedKVCache)
  assert pyr.stats["kv_bytes_allocated"] < 0.9 * dense.stats["kv_bytes_allocated"]
  with pytest.raises(ValueError, match="layout must be one of"):
    jmmkv.generate(model, batch, layout="ragged")


def test_paged_decode_does_not_recompile_per_step(model):
  policy, budget = jmmkv.policies.get("pyramidkv", window=8), jmmkv.Budget(ratio=0.2)
  batch = _batch(model, 4)
  kw = dict(eos_token_id=[], layout="paged")
  jmmkv.generate(model, batch, policy, budget, max_new_tokens=4, **kw)  # warm-up: compile
  compiles = []
  listener = lambda event, duration, **_: (
    compiles.append(event) if "backend_compile" in event else None
  )
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    out = jmmkv.generate(model, batch, policy, budget, max_new_tokens=4, **kw)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert out.stats["decode_steps"] == 3 and compiles == []


def test_page_plan_counts():
  kept = np.array([[[0, 33], [64, 1]], [[5, 0], [0, 0]]])  # [L=2, B=2, K=2]
  sources, owners = paged.page_plan(kept, capacity=96, page_size=32)
  # Layer 0: owners 1, 2, 3 need 2, 2, 1 pages (5 in all: below 32 pages nothing is rounded);
  # owner o's j-th page is page o * 3 + j of the dense prefix (3 pages of 32 per owner).
  np.testing.assert_array_equal(owners[0], [1, 1, 2, 2, 3])
  np.testing.assert_array_equal(sources[0], [3, 4, 6, 7, 9])
  np.testing.assert_array_equal(owners[1], [0])
  np.testing.assert_array_equal(sources[1], [0])
  assert paged.page_multiple(63) == 1 and paged.page_multiple(64) == 2
  assert paged.page_multiple(1000) == 16
  # Page size: a power of two near 1/8 of the mean kept count, within [32, 512].
  assert paged.page_size_for(np.full((2, 1, 4), 100)) == 32
  assert paged.page_size_for(np.full((2, 1, 4), 3277)) == 256
  assert paged.page_size_for(np.full((2, 1, 4), 10**6)) == 512


def test_gpu_pages_are_at_most_128_slots():
  """A Triton block holds a page's K and V in shared memory: long prompts get 512-slot pages on
  CPU/TPU but 128-slot ones on GPU; short ones get the same small pages everywhere."""
  long, short = np.full((2, 1, 4), 8192), np.full((2, 1, 4), 300)
  assert paged.page_size_for(long, platform="cpu") == 512
  assert paged.page_size_for(long, platform="tpu") == 512
  assert paged.page_size_for(long, platform="gpu") == paged.MAX_PAGE_SIZE_GPU == 128
  assert paged.page_size_for(short, platform="gpu") == paged.page_size_for(short, "tpu") == 32
