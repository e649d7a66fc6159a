"""Gemma 3's sliding-window layers in the decode cache: a ring per local layer, bounded by the
window, that no policy touches; the policies compress the global layers (parity with
transformers: tests/models/test_families.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jmmkv
from hf_models import TEXT, pad_batch, random_ids, randomize_
from jmmkv import compare
from jmmkv.cache import kv_cache
from jmmkv.typing import TEXT as TEXT_ID

WINDOW = 6


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
  """A 4-layer Gemma 3 (local, global, local, global) with a window of 6 tokens."""
  from transformers import Gemma3ForCausalLM, Gemma3TextConfig

  cfg = Gemma3TextConfig(
    **{
      **TEXT,
      "num_hidden_layers": 4,
      "head_dim": 16,
      "sliding_window": WINDOW,
      "layer_types": ["sliding_attention", "full_attention"] * 2,
      "pad_token_id": 0,
    }
  )
  torch.manual_seed(0)
  hf = Gemma3ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
  randomize_(hf, 0)
  path = tmp_path_factory.mktemp("gemma3")
  hf.eval().save_pretrained(path)
  return jmmkv.load(path)


def _ids(lengths=(40, 13), seed: int = 0):
  rng = np.random.default_rng(seed)
  return pad_batch([random_ids(rng, n) for n in lengths], "right")


def _batch(model, lengths=(40, 13), seed: int = 0):
  ids, mask = _ids(lengths, seed)
  return model.prepare(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("window,bucket,steps", [(6, 16, 12), (9, 8, 2), (1, 8, 3)])
def test_ring_holds_exactly_the_tokens_in_the_window(seed, window, bucket, steps):
  """After the prompt and after each generated token, the ring's valid slots are the last
  ``window`` tokens (the current one included) with their own keys and values; a plain list of
  every token is the reference."""
  rng = np.random.default_rng(seed)
  b, kh, h = 3, 2, 4
  lengths = rng.integers(1, bucket + 1, size=b)
  lengths[0] = bucket
  k_BKTH = rng.standard_normal((b, kh, bucket, h)).astype(np.float32)
  v_BKTH = rng.standard_normal((b, kh, bucket, h)).astype(np.float32)
  modality_BT = rng.integers(1, 4, size=(b, bucket)).astype(np.int32)
  size = kv_cache.ring_size(window, bucket, steps)
  assert size == min(window, bucket + steps)
  ring = kv_cache.ring_of(
    jnp.asarray(k_BKTH),
    jnp.asarray(v_BKTH),
    jnp.asarray(modality_BT),
    jnp.asarray(lengths),
    window,
    size,
  )
  other = tuple(jnp.zeros((b, kh, 3) + s, d) for s, d in (((h,), jnp.float32),) * 2) + (
    jnp.full((b, kh, 3), -1, jnp.int32),
    jnp.zeros((b, kh, 3), jnp.int32),
  )
  layers = list(zip(ring, other))  # layer 0 a ring, layer 1 compressed (empty here)
  cache = kv_cache.from_layers(
    *layers, jnp.asarray(lengths), jnp.asarray(lengths), steps, window, (0,)
  )
  assert cache.append_k.shape[0] == 1 and cache.layer_k[0].shape[2] == size <= window
  # the reference: every token of each row, prompt then generated
  keys = [list(k_BKTH[i, :, : lengths[i]].transpose(1, 0, 2)) for i in range(b)]
  mods = [list(modality_BT[i, : lengths[i]]) for i in range(b)]
  pos = np.asarray(cache.layer_positions[0])
  for i in range(b):  # after the prompt: the last min(length, window - 1) prompt tokens
    want = set(range(max(0, lengths[i] - window + 1), lengths[i]))
    assert set(pos[i, 0][pos[i, 0] >= 0]) == want
  write = jax.jit(kv_cache.write_ring, static_argnums=1)
  for step in range(steps):
    new_BKH = rng.standard_normal((b, kh, h)).astype(np.float32)
    cache = write(cache, 0, jnp.asarray(new_BKH), jnp.asarray(-new_BKH))
    valid = np.asarray(kv_cache.ring_valid(cache, 0))
    pos, k = np.asarray(cache.layer_positions[0]), np.asarray(cache.layer_k[0])
    v, mod = np.asarray(cache.layer_v[0]), np.asarray(cache.layer_modality[0])
    for i in range(b):
      keys[i].append(new_BKH[i])
      mods[i].append(TEXT_ID)
      now = lengths[i] + step
      want = range(max(0, now - window + 1), now + 1)
      for head in range(kh):
        got = pos[i, head][valid[i, head]]
        assert sorted(got) == list(want), (i, step)
        for slot in np.nonzero(valid[i, head])[0]:
          p = pos[i, head, slot]
          np.testing.assert_array_equal(k[i, head, slot], keys[i][p][head])
          assert mod[i, head, slot] == mods[i][p]
      np.testing.assert_array_equal(v[i, :, (now % size)], -new_BKH[i])
    cache = cache.replace(index=cache.index + 1)


# The family's policies (tests/policy_run.py), and PyramidKV: its layer schedule counts the
# global layers only.
@pytest.mark.parametrize("name", ["full", "snapkv", "pyramidkv", "lookm", "meda", "madakv"])
def test_every_policy_compresses_the_global_layers_only(gemma, name):
  """Batch 2 of 40 and 13 tokens, 4 new tokens: the local layers' rings (at most the window)
  end holding exactly the last window tokens; the global layers are compressed to the budget,
  with every kept slot's modality right."""
  model, cfg = gemma, gemma.config
  small = {"snapkv": dict(window=8), "pyramidkv": dict(window=8), "adakv": dict(window=8)}
  policy = jmmkv.policies.get(name, **small.get(name, {}))
  budget = None if name == "full" else 0.3
  out = jmmkv.generate(
    model, _batch(model), policy, budget, max_new_tokens=4, eos_token_id=[], return_cache=True
  )
  assert [len(t) for t in out.tokens] == [4, 4]
  cache = out.cache
  pos = np.asarray(cache.positions)
  for layer in cfg.window_layers:  # 3 tokens fed back: sequence indices n .. n + 2
    assert cache.layer_k[layer].shape[2] <= WINDOW
    for b, n in enumerate((40, 13)):
      for head in range(cfg.num_kv_heads):
        got = pos[layer, b, head][pos[layer, b, head] >= 0]
        assert sorted(got) == list(range(n + 3 - WINDOW, n + 3))
  glob = cache.kept_LBK()[list(cfg.global_layers)]
  if name == "full":
    np.testing.assert_array_equal(glob, np.broadcast_to([[40], [13]], glob.shape))
  else:  # per-head/-layer allocations move slots around, the total stays within budget
    per_row = glob.sum((0, 2))
    n_B = np.array([jmmkv.Budget(ratio=0.3).kept(n) for n in (40, 13)])
    assert (per_row <= n_B * len(cfg.global_layers) * cfg.num_kv_heads).all(), per_row
    assert (glob.sum(2) > 0).all(), glob
  mod = np.asarray(cache.modality)
  assert set(np.unique(mod[pos >= 0])) == {TEXT_ID}


def test_prompt_only_rings_and_one_forward_for_several_policies(gemma):
  """`jmmkv.compress`'s rings hold the last window - 1 prompt tokens; `compare.generate_each`
  (one shared forward) answers as `generate` does."""
  model, cfg = gemma, gemma.config
  batch = _batch(model)
  cache = jmmkv.compress(model, batch, "snapkv:window=8", 0.3)
  pos = np.asarray(cache.positions)
  for layer in cfg.window_layers:
    for b, n in enumerate((40, 13)):
      got = pos[layer, b, 0][pos[layer, b, 0] >= 0]
      assert sorted(got) == list(range(n - WINDOW + 1, n))
  jobs = [("meda", 0.3)]  # a survey pass and merging: the most the shared forward must serve
  each = compare.generate_each(model, batch, jobs, max_new_tokens=6, eos_token_id=[])
  for (policy, budget), got in zip(jobs, each):
    want = jmmkv.generate(model, batch, policy, budget, max_new_tokens=6, eos_token_id=[])
    assert got.tokens == want.tokens


def test_local_layers_hold_the_window_whatever_the_prompt(gemma):
  """KV bytes from the arrays: with Full, a local layer holds `sliding_window` slots per (row,
  KV head) whether the prompt has 40 or 200 tokens, a global layer holds the prompt plus the
  append buffer; without the window (same weights) every layer holds the prompt."""
  model, cfg = gemma, gemma.config
  slot = 2 * cfg.head_dim * 4  # float32 key + value
  b, kh, m = 2, cfg.num_kv_heads, 30
  rows = {}
  for n in (40, 200):
    out = jmmkv.generate(
      model, _batch(model, (n, 13)), max_new_tokens=m + 1, eos_token_id=[], return_cache=True
    )
    c = out.cache
    assert [c.layer_k[i].shape[2] for i in cfg.window_layers] == [WINDOW] * 2
    ring_bytes = sum(c.layer_k[i].nbytes + c.layer_v[i].nbytes for i in cfg.window_layers)
    assert ring_bytes == 2 * b * kh * WINDOW * slot
    assert c.append_k.shape[0] == len(cfg.global_layers)
    rows[n] = out.stats["kv_bytes_allocated"]
    plain = dataclasses.replace(model, config=dataclasses.replace(cfg, sliding_window=None))
    full = jmmkv.generate(
      plain,
      _batch(plain, (n, 13)),
      max_new_tokens=m + 1,
      eos_token_id=[],
      return_cache=True,
      layout="dense",
    )
    assert full.cache.ring_layers == () and full.cache.append_k.shape[0] == cfg.num_layers
    assert full.stats["kv_bytes_allocated"] > rows[n]
  capacity = lambda n: -(-n // 32) * 32
  for n, got in rows.items():
    assert got == b * kh * slot * (2 * WINDOW + 2 * (capacity(n) + m))


def test_decode_window_leaves_the_rings_their_window(gemma):
  """``decode_window`` bounds the global layers' append buffer only: a ring still holds its
  whole window of generated tokens (here the window, 60, outlasts prompt and answer)."""
  cfg = dataclasses.replace(gemma.config, sliding_window=60)
  model = dataclasses.replace(gemma, config=cfg)
  out = jmmkv.generate(
    model,
    _batch(model, (13, 9)),
    max_new_tokens=40,
    eos_token_id=[],
    return_cache=True,
    decode_window=3,
  )
  cache = out.cache
  assert cache.append_k.shape[3] == 3
  pos = np.asarray(cache.positions)
  for layer in cfg.window_layers:  # 39 tokens fed back: sequence indices n .. n + 38
    for b, n in enumerate((13, 9)):
      for head in range(cfg.num_kv_heads):
        assert sorted(pos[layer, b, head][pos[layer, b, head] >= 0]) == list(range(n + 39))


def test_paged_layout_refused_and_round_trip(gemma, tmp_path):
  model = gemma
  batch = _batch(model)
  ids, mask = _ids()
  with pytest.raises(ValueError, match="layout='paged' is not supported with sliding-window"):
    jmmkv.generate(model, batch, "snapkv", 0.3, max_new_tokens=2, layout="paged")
  jmmkv.save(model, tmp_path / "ckpt")
  back = jmmkv.load(tmp_path / "ckpt")
  assert back.config == model.config and back.config.sliding_window == WINDOW
  np.testing.assert_array_equal(model.logits(ids, mask), back.logits(ids, mask))
