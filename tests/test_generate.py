"""generate(): decode-step logits vs a full forward, padding invariance, EOS, recompilation, sampling."""

import jax
import jax.monitoring
import numpy as np
import pytest

import jmmkv
from jmmkv.models.configs import tiny_decoder

CFG = tiny_decoder(
  vocab_size=512,
  hidden_size=64,
  intermediate_size=128,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
)


@pytest.fixture(scope="module", params=[0, 1, 2])
def model(request):
  return jmmkv.random_model(CFG, seed=request.param)


def _prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, CFG.vocab_size, n) for n in lengths]


def test_decode_step_logits_equal_full_forward(model):
  prompts = _prompts(1, [9, 23, 4])
  out = jmmkv.generate(
    model, model.prepare(input_ids=prompts), max_new_tokens=12, eos_token_id=[], output_scores=True
  )
  assert out.scores.shape == (3, 12, CFG.vocab_size)
  for b, (p, new) in enumerate(zip(prompts, out.tokens)):
    seq = np.concatenate([p, new])[None]
    full_TV = model.logits(seq)[0]
    # step m's logits are predicted from the prompt + the first m new tokens
    want = full_TV[len(p) - 1 : len(p) - 1 + len(new)]
    np.testing.assert_allclose(out.scores[b], want, atol=1e-4, rtol=0)
    assert new == list(np.argmax(want, axis=-1))


def test_row_in_padded_batch_equals_row_alone(model):
  prompts = _prompts(2, [30, 3, 17])
  together = jmmkv.generate(
    model, model.prepare(input_ids=prompts), max_new_tokens=10, eos_token_id=[], output_scores=True
  )
  for b, p in enumerate(prompts):
    alone = jmmkv.generate(
      model, model.prepare(input_ids=[p]), max_new_tokens=10, eos_token_id=[], output_scores=True
    )
    assert alone.tokens[0] == together.tokens[b]
    np.testing.assert_allclose(alone.scores[0], together.scores[b], atol=1e-5, rtol=0)


def test_per_row_eos_stops_each_row(model):
  prompts = _prompts(3, [8, 14])
  free = jmmkv.generate(model, model.prepare(input_ids=prompts), max_new_tokens=16, eos_token_id=[])
  eos = free.tokens[0][4]  # row 0 emits this token at step 4 (maybe earlier too)
  stop0 = free.tokens[0].index(eos)
  out = jmmkv.generate(model, model.prepare(input_ids=prompts), max_new_tokens=16, eos_token_id=eos)
  assert out.tokens[0] == free.tokens[0][: stop0 + 1]
  row1 = free.tokens[1]
  want1 = row1[: row1.index(eos) + 1] if eos in row1 else row1
  assert out.tokens[1] == want1


def test_max_new_tokens_one_and_model_default_eos(model):
  out = jmmkv.generate(model, model.prepare(input_ids=_prompts(4, [5, 6])), max_new_tokens=1)
  assert [len(t) for t in out.tokens] == [1, 1]
  full = jmmkv.generate(
    model,
    model.prepare(input_ids=_prompts(4, [5, 6])),
    max_new_tokens=1,
    eos_token_id=[],
    output_scores=True,
  )
  assert out.tokens == [[int(np.argmax(s[0]))] for s in full.scores]


def test_no_recompilation_within_a_bucket():
  model = jmmkv.random_model(CFG, seed=5)
  compiles = []
  listener = lambda event, duration, **kw: (
    compiles.append(event) if "backend_compile" in event else None
  )
  jmmkv.generate(
    model, model.prepare(input_ids=_prompts(5, [20, 7])), max_new_tokens=8, eos_token_id=[]
  )  # warm-up
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    # Different lengths and contents, same bucket (32) and batch size: nothing compiles, and the
    # decode loop runs all 8 steps inside one compiled while_loop.
    for seed, lengths in ((6, [31, 2]), (7, [13, 25])):
      out = jmmkv.generate(
        model, model.prepare(input_ids=_prompts(seed, lengths)), max_new_tokens=8, eos_token_id=[]
      )
      assert out.stats["decode_steps"] == 7
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  # A new bucket does compile (the listener can see compilations at all).
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jmmkv.generate(model, model.prepare(input_ids=_prompts(8, [40, 9])), max_new_tokens=8)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles


def test_sampling_is_reproducible_and_keyed(model):
  batch = model.prepare(input_ids=_prompts(9, [12, 5]))
  kw = dict(max_new_tokens=16, eos_token_id=[], temperature=1.5, top_k=50, top_p=0.95)
  a = jmmkv.generate(model, batch, rng=jax.random.key(1), **kw)
  b = jmmkv.generate(model, batch, rng=jax.random.key(1), **kw)
  c = jmmkv.generate(model, batch, rng=jax.random.key(2), **kw)
  greedy = jmmkv.generate(model, batch, max_new_tokens=16, eos_token_id=[])
  assert a.tokens == b.tokens
  assert a.tokens != c.tokens
  assert a.tokens != greedy.tokens


def test_sampled_tokens_respect_top_k(model):
  batch = model.prepare(input_ids=_prompts(10, [12, 5]))
  out = jmmkv.generate(
    model,
    batch,
    max_new_tokens=16,
    eos_token_id=[],
    temperature=5.0,
    top_k=3,
    rng=jax.random.key(3),
    output_scores=True,
  )
  for b in range(2):
    for m, tok in enumerate(out.tokens[b]):
      assert tok in np.argsort(-out.scores[b, m])[:3]


def test_stats_measure_the_cache(model):
  prompts = _prompts(11, [20, 9])
  out = jmmkv.generate(
    model, model.prepare(input_ids=prompts), max_new_tokens=6, eos_token_id=[], return_cache=True
  )
  s, cache = out.stats, out.cache
  l, kh, h = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim
  # bucket 32, append buffer 5 slots, float32 k and v
  assert s["kv_bytes_allocated"] == 2 * l * 2 * kh * (32 + 5) * h * 4
  assert s["kv_bytes_used"] == 2 * l * kh * h * 4 * (20 + 9 + 2 * 5)
  assert s["kept_fraction"] == 1.0
  np.testing.assert_array_equal(
    s["kept_tokens_per_layer_head"], np.broadcast_to([[20], [9]], (l, 2, kh))
  )
  pos = np.asarray(cache.positions)
  assert pos.shape == (l, 2, kh, 32)
  np.testing.assert_array_equal(pos[0, 1, 0], np.r_[np.arange(9), -np.ones(23)])
  assert int(cache.index) == 5
  assert s["prefill_s"] > 0 and s["decode_s"] > 0


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=0.5), "rng"),
    (dict(temperature=-1.0, rng=jax.random.key(0)), "temperature"),
    (dict(temperature=1.0, top_k=0, rng=jax.random.key(0)), "top_k"),
    (dict(temperature=1.0, top_p=1.5, rng=jax.random.key(0)), "top_p"),
    (dict(top_k=5), "temperature > 0"),
  ],
)
def test_bad_generate_arguments(model, kw, match):
  with pytest.raises(ValueError, match=match):
    jmmkv.generate(model, model.prepare(input_ids=[[5, 6, 7]]), **kw)


def test_bad_batch_inputs(model):
  with pytest.raises(TypeError, match="Batch"):
    jmmkv.generate(model, [[1, 2, 3]])
  with pytest.raises(ValueError, match="outside"):
    model.prepare(input_ids=[[1, 2, CFG.vocab_size]])
  with pytest.raises(ValueError, match="non-empty"):
    model.prepare(input_ids=[[1, 2], []])
  with pytest.raises(ValueError, match="exactly one"):
    model.prepare()
  with pytest.raises(ValueError, match="no tokenizer"):
    model.prepare(prompts=["hello"])
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    model.logits(np.array([1, 2, 3]))


def test_bfloat16_decode_matches_bfloat16_forward():
  model = jmmkv.random_model(CFG, seed=12, dtype="bfloat16")
  assert {x.dtype.name for x in jax.tree.leaves(model.params)} == {"bfloat16"}
  prompts = _prompts(12, [15, 6])
  out = jmmkv.generate(
    model,
    model.prepare(input_ids=prompts),
    max_new_tokens=6,
    eos_token_id=[],
    output_scores=True,
    return_cache=True,
  )
  assert out.cache.k.dtype.name == "bfloat16"
  for b, p in enumerate(prompts):
    full_TV = model.logits(np.concatenate([p, out.tokens[b]])[None])[0]
    want = full_TV[len(p) - 1 : len(p) - 1 + 6]
    scale = np.abs(want).max()
    assert np.abs(out.scores[b] - want).max() <= 0.02 * scale


def test_bench_prefill_time_excludes_the_first_embed_call(monkeypatch):
  import importlib
  import time

  gen = importlib.import_module("jmmkv.generate")
  model = jmmkv.random_model(CFG, seed=13)
  embed, calls = type(model).embed, []

  def slow_first(self, ids_BT, media):  # the first call stands for embed_text's compilation
    calls.append(1)
    if len(calls) == 1:
      time.sleep(0.5)
    return embed(self, ids_BT, media)

  monkeypatch.setattr(type(model), "embed", slow_first)
  batch = model.prepare(input_ids=_prompts(13, [20]))
  seconds = gen.prefill_stage(model, batch, gen.as_policy(None), None, 1, True)[-1]
  assert len(calls) == 2 and seconds < 0.5


def test_policy_and_budget_as_names_specs_and_ratios(model):
  from jmmkv.cache.policies.snapkv import SnapKV

  batch = model.prepare(input_ids=_prompts(14, [40, 25]))
  kw = dict(max_new_tokens=4, eos_token_id=[], return_cache=True)
  want = jmmkv.generate(model, batch, SnapKV(window=8), jmmkv.Budget(ratio=0.5), **kw)
  got = jmmkv.generate(model, batch, "snapkv:window=8", 0.5, **kw)
  assert got.tokens == want.tokens
  np.testing.assert_array_equal(got.stats["kept_tokens_per_layer_head"], [[[20, 20], [13, 13]]] * 2)
  cache = jmmkv.compress(model, batch, "snapkv:window=8", 0.5)
  np.testing.assert_array_equal(cache.positions, want.cache.positions[..., : cache.capacity])
  with pytest.raises(TypeError, match="class SnapKV"):
    jmmkv.generate(model, batch, SnapKV, 0.5)
  with pytest.raises(TypeError, match="policy must be a policy"):
    jmmkv.generate(model, batch, 3, 0.5)
  with pytest.raises(TypeError, match="budget must be a jmmkv.Budget"):
    jmmkv.compress(model, batch, "snapkv", "0.5")
  with pytest.raises(ValueError, match="unknown policy 'nope'"):
    jmmkv.generate(model, batch, "nope", 0.5)


@pytest.mark.parametrize(
  "rng", [0, np.array([0, 1]), jax.random.split(jax.random.key(0)), jax.random.key(0)[None]]
)
def test_rng_must_be_one_key(model, rng):
  batch = model.prepare(input_ids=[[5, 6, 7]])
  with pytest.raises(TypeError, match=r"jax\.random\.key\(seed\)"):
    jmmkv.generate(model, batch, temperature=0.7, rng=rng)


def test_legacy_uint32_keys_still_work(model):
  batch = model.prepare(input_ids=[[5, 6, 7]])
  kw = dict(max_new_tokens=4, eos_token_id=[], temperature=0.7)
  typed = jmmkv.generate(model, batch, rng=jax.random.key(4), **kw)
  legacy = jmmkv.generate(model, batch, rng=jax.random.key_data(jax.random.key(4)), **kw)
  assert legacy.tokens == typed.tokens


def test_input_ids_must_be_integer_rows(model):
  with pytest.raises(ValueError, match="must be integers"):
    model.prepare(input_ids=[[1.5, 2.7]])
  with pytest.raises(ValueError, match="must be integers"):
    model.prepare(input_ids=[[True, False]])
  with pytest.raises(ValueError, match=r"row 0 must be a 1-D .* shape \(2, 2\)"):
    model.prepare(input_ids=[[[1, 2], [5, 6]]])
  with pytest.raises(ValueError, match=r"row 0 must be a 1-D .* shape \(\)"):
    model.prepare(input_ids=[1, 2, 3])  # a flat list is not one prompt per id
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    model.prepare(input_ids=np.ones((1, 2, 3), int), attention_mask=np.ones((1, 2, 3)))
  for one_row in (np.array([4, 5, 6]), jax.numpy.array([4, 5, 6])):  # a 1-D array is one prompt
    batch = model.prepare(input_ids=one_row)
    assert [r.tolist() for r in batch.input_ids] == [[4, 5, 6]]
    assert batch.input_ids[0].dtype == np.int32


@pytest.mark.parametrize("batch_lengths", [[40], [17, 40]])
def test_warns_when_decoding_passes_max_position_embeddings(batch_lengths):
  """The longest row's prompt (positions 0..39) plus the fed-back new tokens (all but the last)
  must stay below max_position_embeddings (64): 25 new tokens reach 63, 26 reach 64."""
  import dataclasses
  import warnings

  model = jmmkv.random_model(dataclasses.replace(CFG, max_position_embeddings=64), seed=3)
  batch = model.prepare(input_ids=_prompts(4, batch_lengths))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no warning at the limit
    jmmkv.generate(model, batch, max_new_tokens=25, eos_token_id=[])
  with pytest.warns(UserWarning) as record:
    jmmkv.generate(model, batch, max_new_tokens=26, eos_token_id=[])
  assert [str(w.message) for w in record] == [
    "the prompt plus max_new_tokens=26 reach position 64, past the model's "
    "max_position_embeddings=64: output beyond it may be meaningless (shorten the prompt or "
    "lower max_new_tokens)"
  ]
  assert record[0].filename == __file__  # points at the caller's generate line
