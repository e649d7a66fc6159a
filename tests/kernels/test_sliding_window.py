"""Gemma 3's prompt attention: a sliding window (its local layers) and image tokens that attend
both ways within their run. The flash reference and the exact pass with statistics against a
dense masked softmax written here, with transformers' rules: a query sees itself and the
``window - 1`` slots before it; a token of a run of image tokens also sees the later tokens of
its run (window permitting)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jmmkv.cache import stats
from jmmkv.cache.statistics import ColumnSums
from jmmkv.kernels import flash_attention as fa


def _dense(q, k, v, valid, window, image=None):
  """Softmax over keys j with valid[j], j <= i (or i, j in one run of ``image`` [B, T] slots)
  and i - j < window; outputs [B, T, N, H] and the per-head column sums of the probabilities
  over valid queries [B, N, T] (float64)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  g = n // k.shape[1]
  k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # [B, N, T, H]
  s = np.einsum("btnh,bnsh->bnts", q, k) / np.sqrt(h)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  seen = np.broadcast_to(j <= i, (b, t, t)).copy()
  for row in range(b if image is not None else 0):  # runs: the same id from one start on
    run = np.cumsum(image[row] & ~np.r_[False, image[row][:-1]]) * image[row]
    seen[row] |= (run[:, None] == run[None, :]) & (run[:, None] > 0)
  keep = (seen & (i - j < window))[:, None] & valid[:, None, None, :]
  s = np.where(keep, s, -1e30)  # rows without a key (padding) stay finite; callers skip them
  p = np.exp(s - s.max(-1, keepdims=True))
  p = np.where(keep, p, 0)
  p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)
  out = np.einsum("bnts,bnsh->btnh", p, v)
  col = np.einsum("bnts,bt->bns", p, valid.astype(np.float64))
  return out, col


def _prompt(seed, t, n=4, kh=2, h=16, pad=7):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((2, t, n, h)) + 0.1
  k, v = (rng.standard_normal((2, kh, t, h)) + 0.1 for _ in range(2))
  valid = np.ones((2, t), bool)
  valid[1, t - pad :] = False  # right padding, as jmmkv lays prompts out
  return *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), valid


@pytest.mark.parametrize("window", [1, 37, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_and_exact_pass_equal_the_dense_window(seed, window):
  q, k, v, valid = _prompt(seed, 128)
  want, want_col = _dense(q, k, v, valid, window)
  rows = valid  # padding rows are ignored by callers
  got = fa.causal_attention_reference(q, k, v, jnp.asarray(valid), 16, 32, window)
  np.testing.assert_allclose(np.asarray(got)[rows], want[rows], rtol=1e-5, atol=1e-5)
  got, _ = stats.attention(
    q,
    k,
    v,
    jnp.asarray(valid),
    jnp.ones((2, 128), jnp.int32),
    window=window,
    block=16,
    key_block=32,
  )
  np.testing.assert_allclose(np.asarray(got)[rows], want[rows], rtol=1e-5, atol=1e-5)
  spec = stats.spec(ColumnSums())
  got, st = stats.attention(
    q, k, v, jnp.asarray(valid), jnp.ones((2, 128), jnp.int32), spec, 16, 32, window
  )
  np.testing.assert_allclose(np.asarray(got)[rows], want[rows], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(st["colsum"]), want_col, rtol=1e-5, atol=1e-5)


def test_no_window_is_the_causal_attention():
  q, k, v, valid = _prompt(3, 64)
  args = (q, k, v, jnp.asarray(valid), 16, 32)
  np.testing.assert_array_equal(
    fa.causal_attention_reference(*args, 10_000), fa.causal_attention_reference(*args)
  )


def test_query_statistics_of_a_window_are_refused():
  from jmmkv.cache.statistics import WindowSums

  q, k, v, valid = _prompt(4, 32)
  with pytest.raises(NotImplementedError, match="sliding-window layer"):
    stats.attention(
      q, k, v, jnp.asarray(valid), jnp.ones((2, 32), jnp.int32), stats.spec(WindowSums(8)), window=4
    )


def _image_runs(seed: int, t: int) -> np.ndarray:
  """[2, t] bool: runs of image slots of random lengths (one longer than a key tile, two
  adjacent-but-separated runs, one at the very start of a row)."""
  rng = np.random.default_rng(100 + seed)
  image = np.zeros((2, t), bool)
  image[0, 0:5] = True
  image[0, 20:61] = True  # crosses the 32-key tiles
  image[0, 62:70] = True  # one slot after the previous run
  start = int(rng.integers(70, 100))
  image[1, start : start + int(rng.integers(3, 20))] = True
  image[1, 10:11] = True  # a run of one slot
  return image


@pytest.mark.parametrize("window", [None, 1, 37])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_runs_attend_both_ways(seed, window):
  q, k, v, valid = _prompt(seed, 128)
  image = _image_runs(seed, 128)
  want, want_col = _dense(q, k, v, valid, 10_000 if window is None else window, image)
  rows, bi = valid, jnp.asarray(image)
  got = fa.causal_attention_reference(q, k, v, jnp.asarray(valid), 16, 32, window, bi)
  np.testing.assert_allclose(np.asarray(got)[rows], want[rows], rtol=1e-5, atol=1e-5)
  mod = jnp.ones((2, 128), jnp.int32)
  for spec in (stats.NONE, stats.spec(ColumnSums())):
    got, st = stats.attention(
      q, k, v, jnp.asarray(valid), mod, spec, 16, 32, window, bidirectional_BT=bi
    )
    np.testing.assert_allclose(np.asarray(got)[rows], want[rows], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(st["colsum"]), want_col, rtol=1e-5, atol=1e-5)
  causal, _ = _dense(q, k, v, valid, 10_000 if window is None else window)
  if window != 1:  # the runs change the output (a window of 1 leaves no one to look ahead to)
    assert np.abs(causal[rows] - want[rows]).max() > 1e-3


def test_runs_give_each_slot_its_run_and_reach():
  image = np.array([[1, 1, 0, 1, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 0, 0]], bool)
  groups, reach = fa.runs(jnp.asarray(image))
  np.testing.assert_array_equal(
    groups, [[0, 0, -1, 1, -1, -1, 2, 2], [-1, -1, -1, 0, 0, 0, -1, -1]]
  )
  np.testing.assert_array_equal(reach, [1, 1, 2, 5, 5, 5, 7, 7])
