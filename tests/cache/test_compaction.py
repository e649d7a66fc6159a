"""Shrinking the prefix to the slots in use changes nothing, and really shrinks the arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmmkv
from jmmkv.cache import kv_cache, pool
from jmmkv.generate import as_policy, decode_loop, prefill_stage
from jmmkv.models.configs import tiny_decoder
from jmmkv.sampling import Sampling

CFG = tiny_decoder(
  vocab_size=512,
  hidden_size=64,
  intermediate_size=128,
  num_layers=3,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
)


@pytest.mark.parametrize("name", ["adakv", "pyramidkv", "meda", "madakv"])
def test_shrunk_cache_decodes_identically(name):
  model = jmmkv.random_model(CFG, seed=1)
  rng = np.random.default_rng(1)
  batch = model.prepare(input_ids=[rng.integers(3, 512, 200), rng.integers(3, 512, 120)])
  kw = {"madakv": dict(proxy_window=8)}.get(name, {})
  if name in ("adakv", "pyramidkv"):
    kw = dict(window=8)
  policy, budget = jmmkv.policies.get(name, **kw), jmmkv.Budget(ratio=0.2)
  _, logits, (cache, store), storage, _ = prefill_stage(model, batch, as_policy(policy), budget, 7)
  if store is None:  # a dense prefix at the policy's planned capacity: pad it to 256 slots
    widths = lambda x: [(0, 0), (0, 0), (0, 256 - x.shape[2])] + [(0, 0)] * (x.ndim - 3)
    pad = lambda xs, fill: tuple(jnp.pad(x, widths(x), constant_values=fill) for x in xs)
    full = cache.replace(
      layer_k=pad(cache.layer_k, 0),
      layer_v=pad(cache.layer_v, 0),
      layer_positions=pad(cache.layer_positions, -1),
      layer_modality=pad(cache.layer_modality, 0),
    )
  else:  # the pool laid out as a dense prefix of 256 slots
    kept = np.asarray(store.kept_LBK)
    full = pool.to_dense(store, pool.dense_plan(kept, storage.page_size, storage.pages, 256), cache)
  small = kv_cache.shrink(jax.tree.map(lambda a: a.copy(), full), kv_cache.compact_capacity(full))
  assert small.capacity < full.capacity and small.capacity % 32 == 0
  assert small.kv_bytes_allocated() < full.kv_bytes_allocated()
  assert small.kv_bytes_used() == full.kv_bytes_used()
  run = lambda c: decode_loop(
    model.params["text"],
    logits,
    c,
    jax.random.key(0),
    np.zeros((0,), np.int32),
    cfg=CFG,
    dtype="float32",
    sampling=Sampling(),
    max_new_tokens=8,
    output_scores=True,
  )
  t_full, _, s_full = run(full)
  t_small, _, s_small = run(small)
  np.testing.assert_array_equal(np.asarray(t_full), np.asarray(t_small))
  np.testing.assert_allclose(np.asarray(s_full), np.asarray(s_small), atol=1e-5, rtol=1e-5)
