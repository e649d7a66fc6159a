"""Self-checks of the StreamingLLM, H2O, SnapKV, PyramidKV and AdaKV NumPy references."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from references.adakv_ref import adakv, joint_select
from references.h2o_ref import h2o
from references.pyramidkv_ref import largest_remainder, layer_budgets, pyramidkv
from references.snapkv_ref import budget_n, pool1d, snapkv, window_scores
from references.streaming_ref import streaming


def causal_softmax(logits_NTT):
  T = logits_NTT.shape[-1]
  x = np.where(np.tril(np.ones((T, T), bool)), logits_NTT, -np.inf)
  p = np.exp(x - x.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def random_prompt(seed, L=3, N=6, K=2, T=40, H=4):
  rng = np.random.default_rng(seed)
  attn = [causal_softmax(2.0 * rng.standard_normal((N, T, T))) for _ in range(L)]
  keys = [rng.standard_normal((K, T, H)) for _ in range(L)]
  values = [rng.standard_normal((K, T, H)) for _ in range(L)]
  return attn, keys, values


def as_lists(kept):
  return [[p.tolist() for p in layer] for layer in kept]


def test_budget_n():
  assert budget_n(10, ratio=0.25) == 3  # ceil(2.5)
  assert budget_n(10, ratio=0.01) == 1
  assert budget_n(10, ratio=1.0) == 10
  assert budget_n(10, tokens=4) == 4 and budget_n(10, tokens=40) == 10
  with pytest.raises(ValueError):
    budget_n(10)


def test_streaming_by_hand():
  keys = [np.ones((2, 10, 3))] * 2
  assert as_lists(streaming(None, keys, tokens=6)["kept"]) == [[[0, 1, 2, 3, 8, 9]] * 2] * 2
  assert streaming(None, keys, tokens=2)["kept"][0][0].tolist() == [0, 1]
  assert streaming(None, keys, tokens=6, sinks=0)["kept"][1][1].tolist() == [4, 5, 6, 7, 8, 9]
  assert streaming(None, keys, ratio=1.0)["kept"][0][1].tolist() == list(range(10))
  assert streaming(None, keys, tokens=6)["counts"].tolist() == [[6, 6], [6, 6]]


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_pool1d_matches_torch(pooling, kernel):
  x = np.random.default_rng(kernel).random((3, 11))
  fn = torch.nn.functional.avg_pool1d if pooling == "avg" else torch.nn.functional.max_pool1d
  want = fn(torch.from_numpy(x)[None], kernel, stride=1, padding=kernel // 2)[0].numpy()
  np.testing.assert_allclose(pool1d(x, kernel, pooling), want, rtol=0, atol=1e-12)


def test_pool1d_by_hand_and_even_kernel():
  x = np.array([[1.0, 2.0, 3.0, 4.0]])
  np.testing.assert_allclose(pool1d(x, 3, "avg"), [[1, 2, 3, 7 / 3]])
  np.testing.assert_allclose(pool1d(x, 3, "max"), [[2, 3, 4, 4]])
  with pytest.raises(ValueError):
    pool1d(x, 4, "avg")


def hand_attention():
  """One head, T=6, dyadic entries (exact sums); rows are queries. Window (w=2) sums over the prefix
  0..3: [.125, .5, .5, .25]; column sums over all rows: [2.375, 1.5, 1, .5, .375, .25]."""
  a = np.array(
    [
      [1.0, 0, 0, 0, 0, 0],
      [0.5, 0.5, 0, 0, 0, 0],
      [0.5, 0.25, 0.25, 0, 0, 0],
      [0.25, 0.25, 0.25, 0.25, 0, 0],
      [0.125, 0.375, 0.25, 0.125, 0.125, 0],
      [0, 0.125, 0.25, 0.125, 0.25, 0.25],
    ]
  )
  np.testing.assert_array_equal(a.sum(1), 1.0)
  return [a[None]]


def test_snapkv_by_hand():
  attn, keys = hand_attention(), [np.ones((1, 6, 2))]
  level, score = window_scores(attn[0], 1, window=2, kernel=1, pooling="avg")
  assert level.tolist() == [0, 0, 0, 0, 1, 1]
  np.testing.assert_array_equal(score[0], [0.125, 0.5, 0.5, 0.25, 4, 5])

  def kept(tokens, kernel, pooling="avg"):
    out = snapkv(attn, keys, tokens=tokens, window=2, kernel=kernel, pooling=pooling)
    return out["kept"][0][0].tolist()

  assert kept(3, 1) == [1, 4, 5]  # tie 1 vs 2 at 0.5 -> lower position first
  assert kept(4, 1) == [1, 2, 4, 5]
  assert kept(4, 3) == [1, 2, 4, 5]  # avg: [.625, 1.125, 1.25, .75] / 3 -> positions 2 and 1
  assert kept(4, 3, "max") == [0, 1, 4, 5]  # max: [.5, .5, .5, .5] -> ties -> lowest positions
  assert kept(1, 1) == [5]  # n < w: the latest n window positions
  assert kept(6, 1) == list(range(6))
  with pytest.raises(ValueError):
    kept(3, 2)


def test_snapkv_gqa_mean_after_max_pool():
  """Two query heads on one KV head: pool each head, then average (not average, then pool)."""
  s = np.array([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0.9]])
  T, w = 7, 2
  attn = np.zeros((2, T, T))
  attn[:, T - 1, : T - w] = s  # one window row carries the scores
  _, score = window_scores(attn, 1, window=w, kernel=3, pooling="max")
  np.testing.assert_allclose(score[0, : T - w], [0.5, 0.5, 0, 0.45, 0.45])


def test_h2o_by_hand():
  attn, keys = hand_attention(), [np.ones((1, 6, 2))]
  # r = floor(4 * .5) = 2 -> 4, 5 forced; then column sums 2.375 (0), 1.5 (1)
  out = h2o(attn, keys, tokens=4)
  assert out["kept"][0][0].tolist() == [0, 1, 4, 5] and out["recent"] == 2
  assert h2o(attn, keys, tokens=3)["kept"][0][0].tolist() == [0, 1, 5]  # r = 1
  assert h2o(attn, keys, tokens=3, recent_fraction=0.0)["kept"][0][0].tolist() == [0, 1, 2]
  assert h2o(attn, keys, tokens=3, recent_fraction=1.0)["kept"][0][0].tolist() == [3, 4, 5]


def test_h2o_gqa_mean():
  attn, keys, _ = random_prompt(0, N=4, K=2, T=12)
  out = h2o(attn, keys, tokens=5, recent_fraction=0.0)
  for layer, a in zip(out["kept"], attn):
    for j in range(2):
      score = a[2 * j : 2 * j + 2].sum(1).mean(0)
      assert layer[j].tolist() == sorted(np.argsort(-score, kind="stable")[:5].tolist())


def test_largest_remainder():
  assert largest_remainder([Fraction(7, 2), Fraction(3), Fraction(7, 2)]) == [4, 3, 3]
  assert largest_remainder([Fraction(1, 4), Fraction(3, 4), Fraction(4)]) == [0, 1, 4]


def test_pyramid_budgets_by_hand():
  # C-w = 59: min 2.95, max 115.05, step 56.05 -> 131.05, 75, 18.95 -> floors 131, 75, 18 (+1 to 18)
  assert layer_budgets(150, 75, 3, 16).tolist() == [131, 75, 19]
  # T = 100 < 2 (C - w) = 128: the code's fallback to SnapKV, uniform C
  assert layer_budgets(100, 80, 3, 16).tolist() == [80, 80, 80]
  # clamped: max 134 - 3.35 >= T-w = 124, so max = 124, min = 134 - 124 = 10 -> 140, 83, 26
  assert layer_budgets(140, 83, 3, 16).tolist() == [140, 83, 26]
  # C-w = 10: caps 19.5, 10, .5 (+16) -> tie of remainders, lower layer first
  assert layer_budgets(100, 26, 3, 16).tolist() == [36, 26, 16]
  assert layer_budgets(100, 16, 3, 16).tolist() == [16, 16, 16]  # C <= w
  assert layer_budgets(100, 100, 3, 16).tolist() == [100, 100, 100]  # n >= T
  assert layer_budgets(100, 40, 1, 16).tolist() == [40]
  # small beta makes max_num negative -> uniform
  assert layer_budgets(100, 40, 3, 16, beta=0.25).tolist() == [40, 40, 40]
  with pytest.raises(ValueError):
    layer_budgets(100, 40, 3, 16, beta=0)


def test_pyramid_budgets_sum_and_bounds():
  for T in (20, 57, 150, 301):
    for L in (2, 3, 7, 32):
      for w in (1, 8, 32):
        for n in range(1, T + 1, 3):
          b = layer_budgets(T, n, L, w)
          assert b.sum() == L * n and b.min() >= 0 and b.max() <= T
          assert (np.diff(b) <= 0).all()
          if n > min(w, T) and n < T:
            assert b.min() >= min(w, T)  # the window always fits


def test_pyramidkv_selects_like_snapkv():
  attn, keys, values = random_prompt(1)
  out = pyramidkv(attn, keys, values, tokens=20, window=8, kernel=5)
  assert out["layer_budgets"].tolist() == layer_budgets(40, 20, 3, 8).tolist()
  assert out["counts"].tolist() == [[c, c] for c in out["layer_budgets"]]
  for layer, (a, c) in enumerate(zip(attn, out["layer_budgets"])):
    want = snapkv([a], [keys[layer]], tokens=int(c), window=8, kernel=5)["kept"][0]
    assert as_lists([out["kept"][layer]]) == as_lists([want])
  fallback = pyramidkv(attn, keys, tokens=8, window=8)  # C <= w: uniform = snapkv
  assert as_lists(fallback["kept"]) == as_lists(snapkv(attn, keys, tokens=8, window=8)["kept"])


def test_joint_select_by_hand():
  level = np.array([0, 0, 0, 0, 1])
  score = np.array([[0.9, 0.8, 0.7, 0.6, 0], [0.1, 0.05, 0.3, 0.2, 0]])
  # n = 3, K*n = 6: forced (n_safe=1) = window 4 of both heads; then the scores .9 .8 .7 .6 of
  # head 0 beat every score of head 1
  kept = joint_select(level, score, 3, 1)
  assert [p.tolist() for p in kept] == [[0, 1, 2, 3, 4], [4]]
  # n_safe = 2: forced {4, 0} and {4, 2} (0.3); the two free pairs go to head 0 (.8, .7)
  kept = joint_select(level, score, 3, 2)
  assert [p.tolist() for p in kept] == [[0, 1, 2, 4], [2, 4]]
  # equal scores across heads -> lower position, then lower head
  kept = joint_select(np.zeros(3, int), np.array([[0.5, 0.1, 0.0], [0.5, 0.0, 0.1]]), 1, 1)
  assert [p.tolist() for p in kept] == [[0], [0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adakv_properties(seed):
  attn, keys, values = random_prompt(seed, T=50)
  out = adakv(attn, keys, values, tokens=20, window=8, kernel=5)
  assert out["n_safe"] == 4
  assert (out["counts"].sum(1) == 2 * 20).all() and out["counts"].min() >= 4
  for layer, a in enumerate(attn):
    for j, p in enumerate(out["kept"][layer]):
      assert set(range(42, 50)) <= set(p.tolist())  # n >= w: the window is kept
      np.testing.assert_array_equal(out["k"][layer][j, : len(p)], keys[layer][j, p])
      np.testing.assert_array_equal(out["k"][layer][j, len(p) :], 0)
    # the layer's kept prefix pairs are the joint top by score
    _, score = window_scores(a, 2, 8, 5, "avg")
    pairs = [(score[j, i], j, i) for j, p in enumerate(out["kept"][layer]) for i in p if i < 42]
    dropped = [score[j, i] for j in range(2) for i in range(42) if i not in out["kept"][layer][j]]
    if max(out["counts"][layer]) - 8 > 4:  # safeguard not binding -> pure joint top
      assert min(s for s, _, _ in pairs) > max(dropped)
  assert adakv(attn, keys, ratio=1.0)["counts"].tolist() == [[50, 50]] * 3


def test_budget_below_window_keeps_latest_window_positions():
  attn, keys, _ = random_prompt(5, T=30)
  for policy in (snapkv, pyramidkv, adakv):
    out = policy(attn, keys, tokens=5, window=8)
    assert all(p.tolist() == list(range(25, 30)) for layer in out["kept"] for p in layer)


def test_adakv_one_head_is_snapkv():
  attn, keys, _ = random_prompt(3, N=3, K=1)
  a = adakv(attn, keys, tokens=15, window=6)
  s = snapkv(attn, keys, tokens=15, window=6)
  assert as_lists(a["kept"]) == as_lists(s["kept"])


@pytest.mark.parametrize("policy", [streaming, h2o, snapkv, pyramidkv, adakv])
def test_counts_and_gather(policy):
  attn, keys, values = random_prompt(4, T=30)
  out = policy(attn, keys, values, ratio=0.4)
  assert out["counts"].sum() == 3 * 2 * 12
  for layer in range(3):
    for j, p in enumerate(out["kept"][layer]):
      assert (np.diff(p) > 0).all() and len(p) == out["counts"][layer, j]
      np.testing.assert_array_equal(out["v"][layer][j, : len(p)], values[layer][j, p])
  full = policy(attn, keys, ratio=1.0)
  assert all(p.tolist() == list(range(30)) for layer in full["kept"] for p in layer)
