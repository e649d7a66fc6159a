"""Compression inside the prefill: the page pool keeps what a dense prefix keeps, and storing a
layer's kept slots as soon as it is done really lowers the prefill's memory (XLA's own
accounting of the compiled prefill, which needs no run)."""

import importlib

import jax
import numpy as np
import pytest

import jmmkv
from jmmkv.cache import stream
from jmmkv.models import llama
from jmmkv.models.configs import tiny_decoder
from jmmkv.models.model import Model

G = importlib.import_module("jmmkv.generate")
CFG = tiny_decoder(
  vocab_size=512,
  hidden_size=64,
  intermediate_size=128,
  num_layers=3,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
)
POLICIES = {  # the per-head / per-layer allocations, whose slots may go to a pool
  "adakv": dict(window=8),
  "madakv": dict(proxy_window=8),
  "meda": dict(),
  "lookm:keep_all_text=false": dict(),  # merged values written at the kept slots
}


REAL_STORAGE_FOR = stream.storage_for


def _storages(monkeypatch, pooled: bool):
  """Forces every policy into the pool (its plan's total, else L B K C) or into a dense prefix."""

  def forced(plan, num_layers, b, kh, bucket, pool_ok=True):
    if not pooled:
      return stream.Storage(plan.capacity)
    total = plan.total if plan.total is not None else num_layers * b * kh * plan.capacity
    return REAL_STORAGE_FOR(plan._replace(total=total), num_layers, b, kh, bucket, pool_ok)

  monkeypatch.setattr(stream, "storage_for", forced)
  monkeypatch.setattr(stream, "POOL_GAIN", 1e9)  # a pool whatever it saves


@pytest.fixture(scope="module")
def model():
  return jmmkv.random_model(CFG, seed=7)


@pytest.mark.parametrize("spec", list(POLICIES))
def test_the_pool_keeps_what_a_dense_prefix_keeps(monkeypatch, model, spec):
  rng = np.random.default_rng(7)
  mod = [np.where(rng.random(n) < 0.4, 2, 1).astype(np.int32) for n in (230, 140)]
  batch = jmmkv.inputs.Batch(
    tuple(rng.integers(3, 512, len(m)).astype(np.int32) for m in mod),
    tuple(mod),
    tuple(np.where(m == 2, 0, -1).astype(np.int32) for m in mod),
  )
  policy = jmmkv.policies.from_spec(spec, **POLICIES[spec])
  got, seen, real_step = {}, [], G.prefill_step
  monkeypatch.setattr(
    G, "prefill_step", lambda *a, **k: seen.append(k["storage"]) or real_step(*a, **k)
  )
  for pooled in (False, True):
    _storages(monkeypatch, pooled)
    got[pooled] = jmmkv.compress(model, batch, policy, 0.3)
    assert seen[-1].pooled == pooled
  dense, pooled = got[False], got[True]
  pos_d, pos_p = np.asarray(dense.positions), np.asarray(pooled.positions)
  c = max(pos_d.shape[-1], pos_p.shape[-1])
  pad = lambda x, fill: np.pad(
    x, [(0, 0)] * 3 + [(0, c - x.shape[3])] + [(0, 0)] * (x.ndim - 4), constant_values=fill
  )
  np.testing.assert_array_equal(pad(pos_d, -1), pad(pos_p, -1))
  np.testing.assert_array_equal(
    pad(np.asarray(dense.modality), 0), pad(np.asarray(pooled.modality), 0)
  )
  for a, b in ((dense.k, pooled.k), (dense.v, pooled.v)):
    np.testing.assert_array_equal(pad(np.asarray(a), 0), pad(np.asarray(b), 0))


def _compiled_bytes(model, batch, spec, ratio):
  """XLA's temp + output bytes of the compiled prefill (with compression), without running it."""
  captured = {}

  def catch(*args, **kw):
    captured.update(args=args, kw=kw)
    raise StopIteration

  real = G.prefill_step
  G.prefill_step = catch
  try:
    policy = jmmkv.policies.from_spec(spec)
    budget = None if spec == "full" else jmmkv.Budget(ratio=ratio)
    with pytest.raises(StopIteration):
      G.prefill_stage(model, batch, policy, budget, 1)
  finally:
    G.prefill_step = real
  m = real.lower(*captured["args"], **captured["kw"]).compile().memory_analysis()
  return m.temp_size_in_bytes + m.output_size_in_bytes


def test_compressing_layer_by_layer_lowers_the_prefill_memory():
  """8 layers, 8 MHA heads of 64, T = 2048: the prompt K/V (64 MiB) dominate. Keeping 5% with
  SnapKV must need well under half of Full's bytes; before layer-by-layer compression its
  prefill needed as much as Full's (it returned every layer's K/V to compress afterwards)."""
  cfg = tiny_decoder(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_layers=8,
    num_heads=8,
    num_kv_heads=8,
    head_dim=64,
  )
  # Zero weights of the right shapes: the compiled bytes do not depend on the values, and the
  # eager random initialisation of these 8 layers took a third of the test's time.
  shapes = jax.eval_shape(lambda key: llama.init_params(cfg, key), jax.random.key(0))
  model = Model(
    cfg, {"text": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)}, "float32"
  )
  ids = np.random.default_rng(0).integers(3, 256, 2048)
  batch = model.prepare(input_ids=[ids])
  full = _compiled_bytes(model, batch, "full", 1.0)
  snap = _compiled_bytes(model, batch, "snapkv", 0.05)
  kv = 8 * 2 * 8 * 2048 * 64 * 4  # every layer's prompt K and V, float32
  assert full >= kv  # Full's prefix is the whole prompt K/V
  assert snap < 0.4 * full, (snap / 2**20, full / 2**20)
