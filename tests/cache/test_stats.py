"""Blockwise prefill statistics vs a dense reference built from transformers' own attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jmmkv
from hf_models import build_model, pad_batch, positions_from_mask, random_ids
from jmmkv.cache import statistics, stats
from jmmkv.inputs import Media
from jmmkv.models.llama import Decoder
from mm_models import build_mm_model, make_case, modality_of
from references import stats_ref

ALL = (statistics.WindowSums(8), statistics.ColumnSums(), statistics.RowEntropy())
SPEC = stats.spec(*ALL, statistics.CrossEntropy())


def _ours(model, ids, mask, media=Media(), modality=None, spec=SPEC):
  x = model.embed(ids, media)
  pos = model.positions(ids, mask.astype(bool), media)
  modality = np.where(mask, 1, 0) if modality is None else modality
  dec = Decoder(model.text_config)
  out = dec.apply(
    model.params["text"],
    x,
    pos.astype(np.int32),
    mask.astype(bool),
    modality,
    spec,
    method=Decoder.prefill,
  )
  return jax.tree.map(np.asarray, out[3])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lengths", [(21, 9), (300, 170)])  # one block; several blocks + padding
def test_text_stats_equal_dense(seed, lengths, tmp_path):
  hf = build_model("llama_gqa", seed)
  hf.save_pretrained(tmp_path)
  model = jmmkv.load(tmp_path)
  rng = np.random.default_rng(seed)
  ids, mask = pad_batch([random_ids(rng, n) for n in lengths], "right")
  ref = stats_ref.capture(
    hf,
    "LlamaAttention",
    input_ids=torch.tensor(ids),
    attention_mask=torch.tensor(mask),
    position_ids=torch.tensor(positions_from_mask(mask)),
  )
  got = _ours(model, ids, mask)
  valid = mask.astype(bool)
  for layer, (probs, _, _, _) in enumerate(ref):
    np.testing.assert_allclose(
      got["colsum"][layer], stats_ref.colsum(probs, valid), atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(
      got["window"][layer], stats_ref.window(probs, valid, 8), atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(
      got["entropy"][layer], stats_ref.row_entropy(probs, valid), atol=1e-5, rtol=1e-5
    )
    np.testing.assert_array_equal(got["cross"][layer], 0.0)  # text only: no cross-modal entropy
    # padding keys get nothing
    assert np.all(got["colsum"][layer][~valid[:, None, :].repeat(probs.shape[1], 1)] == 0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("seed", [0, 1])
def test_multimodal_stats_equal_dense(family, seed, tmp_path):
  hf = build_mm_model(family, seed)
  hf.save_pretrained(tmp_path)
  model = jmmkv.load(tmp_path)
  rng = np.random.default_rng(seed)
  rows = [[5, "image", 7, "image", 3], [4, "image", 6]]
  images = 3 if family == "llava" else [[1, 4, 4], [1, 4, 6], [1, 2, 2]]
  case = make_case(model, family, rng, rows, images=images, side="right")
  cls = "LlamaAttention" if family == "llava" else "Qwen2VLAttention"
  arrays = dict(case.hf_inputs(), input_ids=case.ids, attention_mask=case.mask)
  inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
  ref = stats_ref.capture(hf, cls, **inputs)
  media = Media(**case.arrays)
  valid = case.mask.astype(bool)
  modality = modality_of(case.ids)
  is_text, is_vis = (modality == 1) & valid, (modality >= 2) & valid
  # seeds 1, 2: text / visual compacted to static bounds below T (as generate does)
  cross = statistics.CrossEntropy(multiple=8)
  if seed:
    cross = cross.for_prompt(valid, modality)
  assert seed == 0 or cross.visual < case.ids.shape[1]
  spec = stats.spec(*ALL, cross)
  got = _ours(model, case.ids, case.mask, media, modality_of(case.ids) * case.mask, spec)
  for layer, (probs, q, k, scaling) in enumerate(ref):
    np.testing.assert_allclose(
      got["colsum"][layer], stats_ref.colsum(probs, valid), atol=1e-5, rtol=1e-5
    )
    want = stats_ref.cross_entropy(q, k, scaling, valid, is_text, is_vis)
    assert (want > 0.1).sum() >= 2  # non-degenerate: most rows have spread-out attention
    np.testing.assert_allclose(got["cross"][layer], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [4, 16, 64])
def test_block_size_does_not_change_anything(block):
  rng = np.random.default_rng(block)
  b, t, n, kh, h = 2, 64, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, kh, t, h)), jnp.float32) for _ in range(2))
  valid = jnp.asarray(np.arange(t)[None] < np.array([[64], [41]]))
  modality = jnp.asarray(np.where(rng.random((b, t)) < 0.5, 2, 1) * valid)
  run = lambda block: jax.jit(lambda *a: stats.attention(*a, SPEC, block=block))(
    q, k, v, valid, modality
  )
  whole, blocked = run(t), run(block)
  for a, c in zip(jax.tree.leaves(whole), jax.tree.leaves(blocked)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=1e-5)


def test_key_tiles_do_not_change_anything():
  """The two passes over key tiles (each query block reading only the tiles the causal mask
  leaves it): the same outputs and statistics as one tile of all T keys, with padding and GQA,
  on 3 seeds."""
  b, t, n, kh, h = 2, 100, 4, 2, 8  # 13 blocks of 8, the last one padded
  fns = {
    kb: jax.jit(
      lambda q, k, v, valid, mod, kb=kb: stats.attention(q, k, v, valid, mod, SPEC, 8, kb)
    )
    for kb in (128, 8, 32)
  }
  for seed in range(3):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, kh, t, h)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(np.arange(t)[None] < np.array([[100], [57]]))
    modality = jnp.asarray(np.where(rng.random((b, t)) < 0.5, 2, 1) * valid)
    one = fns[128](q, k, v, valid, modality)
    for kb in (8, 32):
      many = fns[kb](q, k, v, valid, modality)
      for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-5)
  with pytest.raises(ValueError, match="key_block 12 must be a multiple of block 8"):
    stats.attention(q, k, v, valid, modality, SPEC, 8, 12)


def test_16k_prompt_never_builds_a_t_by_t_array():
  t, b, n, kh, h = 16384, 1, 2, 1, 16
  spec = stats.spec(statistics.WindowSums(32), *ALL[1:], statistics.CrossEntropy())
  fn = jax.jit(lambda q, k, v, valid, mod: stats.attention(q, k, v, valid, mod, spec, block=128))
  args = (
    jax.ShapeDtypeStruct((b, t, n, h), jnp.float32),
    jax.ShapeDtypeStruct((b, kh, t, h), jnp.float32),
    jax.ShapeDtypeStruct((b, kh, t, h), jnp.float32),
    jax.ShapeDtypeStruct((b, t), jnp.bool_),
    jax.ShapeDtypeStruct((b, t), jnp.int32),
  )
  temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
  assert temp < t * t * 4 / 8, f"{temp / 2**20:.0f} MiB of temporaries for T={t}"


def _dense_causal(q, k, v, valid):
  """NumPy reference: softmax over the keys at or before each query, padding never a key."""
  b, t, n, h = q.shape
  g = n // k.shape[1]
  kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # [B, N, T, H]
  s = np.einsum("bqnh,bnsh->bnqs", q.astype(np.float64), kk) / np.sqrt(h)
  mask = (np.arange(t)[:, None] >= np.arange(t)[None, :])[None, None] & valid[:, None, None, :]
  s = np.where(mask, s, -1e30)  # a query without keys (left padding) is never compared
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnqs,bnsh->bqnh", p, vv)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
  "t, blocks", [(96, (8, 32)), (96, (16, 16)), (64, (64, 64)), (128, (32, 128))]
)
def test_flash_causal_attention_equals_dense(seed, t, blocks):
  from jmmkv.kernels.flash_attention import causal_attention_reference as causal_attention

  rng = np.random.default_rng(seed)
  b, n, kh, h = 3, 4, 2, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k, v = (rng.normal(size=(b, kh, t, h)).astype(np.float32) for _ in range(2))
  slots = np.arange(t)[None]
  valid = np.stack([slots[0] < t, slots[0] < t - 29, slots[0] >= 11])  # full, right, left padded
  got = np.asarray(causal_attention(q, k, v, jnp.asarray(valid), *blocks))
  want = _dense_causal(q, k, v, valid)
  rows = valid & (np.cumsum(valid, axis=1) > 0)  # valid queries (each sees itself)
  np.testing.assert_allclose(got[rows], want[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [37, 700])  # one tile; several tiles after padding to 512
def test_attention_without_query_statistics_is_flash_and_exact(t):
  rng = np.random.default_rng(t)
  b, n, kh, h = 2, 4, 2, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k, v = (rng.normal(size=(b, kh, t, h)).astype(np.float32) for _ in range(2))
  valid = np.arange(t)[None] < np.array([[t], [t - 13]])
  modality = np.where(rng.random((b, t)) < 0.5, 2, 1) * valid
  spec = stats.spec(statistics.WindowSums(8))  # SnapKV's: no statistic of every query
  run = lambda spec: jax.jit(lambda *a: stats.attention(*a, spec, block=16))(
    q, k, v, jnp.asarray(valid), jnp.asarray(modality)
  )
  out, st = run(spec)
  np.testing.assert_allclose(
    np.asarray(out)[valid], _dense_causal(q, k, v, valid)[valid], atol=1e-5, rtol=1e-5
  )
  both = run(spec | {statistics.ColumnSums()})
  np.testing.assert_allclose(np.asarray(st["window"]), np.asarray(both[1]["window"]), atol=1e-6)


def test_meda_survey_sees_the_hidden_states_of_the_compressing_pass(tmp_path):
  """MEDA's survey (entropies only, no column sums) must give exactly the statistics a single
  pass with the column sums gives, layer after layer: its hidden states are bit-identical
  (several query blocks and key tiles, left padding; the paper variant's survey holds the code
  variant's row entropies too)."""
  build_model("llama_gqa", 0).save_pretrained(tmp_path)
  model = jmmkv.load(tmp_path)
  rng = np.random.default_rng(0)
  ids, mask = pad_batch([random_ids(rng, n) for n in (600, 300)], "left")
  modality = np.where(rng.random(ids.shape) < 0.6, 2, 1) * mask
  policy = jmmkv.policies.from_spec("meda")
  survey = stats.for_prompt(policy.survey, mask.astype(bool), modality)
  alone = _ours(model, ids, mask, modality=modality, spec=survey)
  joint = _ours(model, ids, mask, modality=modality, spec=survey | policy.stats)
  assert set(alone) == {"cross", "entropy"}
  for key, x in alone.items():
    assert np.all(np.isfinite(x)) and np.abs(x).max() > 0
    np.testing.assert_array_equal(x, joint[key], err_msg=key)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_entropies_do_not_depend_on_the_query_block(seed, monkeypatch):
  """Many keys shrink the query blocks (`statistics.SCORE_ELEMENTS`): the same sums as whole
  blocks, with padding and rows of different modality mixes."""
  rng = np.random.default_rng(seed)
  b, t, n, kh, h = 2, 90, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, kh, t, h)), jnp.float32)
  valid = np.arange(t)[None] < np.array([[90], [61]])
  visual = (rng.random((b, t)) < np.array([[0.7], [0.3]])) & valid
  text = ~visual & valid
  run = lambda: np.asarray(statistics.cross_entropies(q, k, text, visual, t, t, block=64))
  whole = run()
  monkeypatch.setattr(statistics, "SCORE_ELEMENTS", b * n * t * 8)  # 8 queries a block
  np.testing.assert_allclose(run(), whole, rtol=1e-5, atol=1e-5)
  assert np.all(whole > 0.1)


def test_only_statistics_of_each_key_score_the_tiles_twice(monkeypatch):
  """Row statistics (entropies) ride on the flash pass: the tiles are scored once; column sums
  score each query block's tiles a second time, with the rows' final max and sum."""
  from jmmkv.kernels import flash_attention

  traced = []
  real = flash_attention.tile_scores
  monkeypatch.setattr(flash_attention, "tile_scores", lambda *a: traced.append(1) or real(*a))
  q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 2, 8)), jnp.float32)
  kv = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 64, 8)), jnp.float32)
  valid = jnp.ones((1, 64), bool)
  for statistic, scorings in ((statistics.RowEntropy(), 1), (statistics.ColumnSums(), 2)):
    traced.clear()
    jax.eval_shape(
      lambda: stats.attention(q, kv, kv, valid, valid.astype(jnp.int32), stats.spec(statistic))
    )
    assert len(traced) == scorings, (statistic, len(traced))


def test_conflicting_and_unknown_statistics_are_refused():
  with pytest.raises(ValueError, match="conflicting statistics of one name"):
    stats.spec(statistics.WindowSums(8), statistics.WindowSums(16))
  with pytest.raises(ValueError, match="window must be >= 1"):
    statistics.WindowSums(0)

  class Neither(stats.Statistic):
    name = "neither"

  x = jnp.ones((1, 8, 2, 4), jnp.float32)
  kv = jnp.ones((1, 2, 8, 4), jnp.float32)
  valid = jnp.ones((1, 8), bool)
  with pytest.raises(TypeError, match="not a QueryStatistic or ProbabilityStatistic"):
    stats.attention(x, kv, kv, valid, valid.astype(jnp.int32), stats.spec(Neither()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_sums_over_key_tiles_equal_dense(seed, monkeypatch):
  """Several key tiles and a remainder (tile 16, T = 100), left and right padding, GQA."""
  monkeypatch.setattr(statistics, "WINDOW_KEY_TILE", 16)
  rng = np.random.default_rng(seed)
  b, t, n, kh, h, w = 3, 100, 4, 2, 8, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k = rng.normal(size=(b, kh, t, h)).astype(np.float32)
  slots = np.arange(t)
  valid = np.stack([slots < t, slots < 61, slots >= 30 + seed])
  got = np.asarray(jax.jit(statistics.window_sums, static_argnums=3)(q, k, valid, w))
  kk = np.repeat(k, n // kh, axis=1).astype(np.float64)  # [B, N, T, H]
  want = np.zeros((b, n, t))
  for r in range(b):
    rows = np.flatnonzero(valid[r])[-w:]  # the row's last w valid queries
    for i in rows:
      keys = np.flatnonzero(valid[r] & (slots <= i))
      s = np.einsum("nh,nsh->ns", q[r, i], kk[r][:, keys]) / np.sqrt(h)
      p = np.exp(s - s.max(-1, keepdims=True))
      want[r][:, keys] += p / p.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
