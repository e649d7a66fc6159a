"""Self-checks of the merge, LOOK-M and MEDA NumPy references on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from references import lookm_ref, meda_ref, merge_ref, stats_ref

# A one-head layer with hand-computable merges. Kept positions 0 and 2; evicted 1 (parallel to
# key 0: cosine 1) and 3 (cosine 3/5 with key 0, 4/5 with key 2 -> merges into 2).
K4 = np.array([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
V4 = np.array([[[1.0, 1.0], [3.0, 5.0], [2.0, 0.0], [4.0, 4.0]]])
KEPT4 = [np.array([0, 2])]


def causal_softmax(logits_NTT):
  T = logits_NTT.shape[-1]
  x = np.where(np.tril(np.ones((T, T), bool)), logits_NTT, -np.inf)
  p = np.exp(x - x.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def random_prompt(seed, L=3, N=4, K=2, T=24, H=4, modality=None):
  rng = np.random.default_rng(seed)
  q = [rng.standard_normal((N, T, H)) for _ in range(L)]
  k = [rng.standard_normal((K, T, H)) for _ in range(L)]
  v = [rng.standard_normal((K, T, H)) for _ in range(L)]
  scaling = H**-0.5
  attn = [
    causal_softmax(np.einsum("nqh,nkh->nqk", ql, np.repeat(kl, N // K, 0)) * scaling)
    for ql, kl in zip(q, k)
  ]
  if modality is None:  # text, an image, text, a second image, text
    modality = np.array([1] * 3 + [2] * 8 + [1] * 2 + [2] * 6 + [1] * (T - 19))
  return attn, q, k, v, scaling, modality


def test_parallel_key_merges_into_it():
  out = merge_ref.merge(K4, V4, KEPT4, rule="average")
  assert out["target"][0].tolist() == [0, 2]
  # 1 is 3x key 0 (far in Euclidean distance, cosine 1): it merges into 0, not into 2.
  k = np.array([[[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]]])
  assert merge_ref.merge(k, k, [np.array([1])], [np.array([2])])["target"][0].tolist() == [1]
  assert merge_ref.merge(k, k, [np.array([0, 1])], [np.array([2])])["target"][0].tolist() == [0]


def test_tie_goes_to_lower_kept_position():
  k = np.array([[[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]])  # 2 is at 45 degrees to both
  assert merge_ref.merge(k, k, [np.array([0, 1])])["target"][0].tolist() == [0]


@pytest.mark.parametrize(
  "rule, k_exp, v_exp",
  [
    ("average", [[2.0, 0.0], [1.5, 3.0]], [[2.0, 3.0], [3.0, 2.0]]),
    ("pivot", [[1.5, 0.0], [0.75, 2.5]], [[1.5, 2.0], [2.5, 1.0]]),
    ("weighted", [[2.0, 0.0], [1.2, 2.6]], [[2.0, 3.0], [2.6, 1.6]]),
  ],
)
def test_merge_rules_by_hand(rule, k_exp, v_exp):
  out = merge_ref.merge(K4, V4, KEPT4, rule=rule)
  np.testing.assert_allclose(out["k"][0], k_exp, atol=1e-12)
  np.testing.assert_allclose(out["v"][0], v_exp, atol=1e-12)
  assert out["counts"].tolist() == [2]


def test_merge_several_into_one():
  k = np.array([[[1.0, 0.0], [2.0, 0.1], [4.0, -0.2], [0.0, 1.0]]])
  v = np.array([[[1.0], [2.0], [6.0], [9.0]]])
  kept = [np.array([0, 3])]
  s1, s2 = 2.0 / math.hypot(2, 0.1), 4.0 / math.hypot(4, 0.2)
  cases = {
    "average": (1 + 2 + 6) / 3,
    "pivot": (1 + 0.5 * (2 + 1) + 0.5 * (6 + 1)) / 3,
    "weighted": (1 + s1 * 2 + s2 * 6) / 3,
  }
  for rule, want in cases.items():
    out = merge_ref.merge(k, v, kept, rule=rule)
    np.testing.assert_allclose(out["v"][0, :, 0], [want, 9.0], atol=1e-12)


def test_code_compat_filter_and_misalignment():
  # Kept 0, 1; evicted 2 (max cos 0.707, tie -> 0), 3 (cos 1 -> 1), 4 (cos 0.995 -> 0).
  k = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.1]]])
  kept = [np.array([0, 1])]
  out = merge_ref.merge_code_compat(k, k, kept, rule="average")
  assert out["nearest"][0].tolist() == [0, 1, 0]
  # Ranks 1, 2 pass the filter (mean max-cosine 0.90); slot 0 sends rank 0 (pos 2) into
  # c*(rank 1) = 1, slot 1 sends rank 1 (pos 3) into c*(rank 2) = 0; rank 2 is dropped.
  assert out["target"][0].tolist() == [1, 0, -1]
  np.testing.assert_allclose(out["k"][0], [[0.5, 0.5], [0.5, 1.0]], atol=1e-12)
  fixed = merge_ref.merge_code_compat(k, k, kept, rule="average", misaligned=False)
  assert fixed["target"][0].tolist() == [-1, 1, 0]
  np.testing.assert_allclose(fixed["k"][0], [[1.0, 0.05], [0.0, 1.0]], atol=1e-12)
  w = merge_ref.merge_code_compat(k, k, kept, rule="weighted")
  s = 1.0 / math.hypot(1, 0.1)
  np.testing.assert_allclose(w["k"][0], [[(1 + s) / 2, 0.1 * s / 2], [0.0, 1.0]], atol=1e-12)
  paper = merge_ref.merge(k, k, kept, rule="average")
  np.testing.assert_allclose(paper["k"][0], [[1.0, 1.1 / 3], [0.0, 1.0]], atol=1e-12)
  for rule in ("pivot",):  # pivot: no filter, no misalignment
    a = merge_ref.merge_code_compat(k, k, kept, rule=rule)["k"]
    np.testing.assert_array_equal(a, merge_ref.merge(k, k, kept, rule=rule)["k"])


def test_code_compat_filter_is_shared_across_heads():
  # Head 0 evicted ranks have max-cos (1, 0); head 1 (0, 1) -> per-rank head means are equal to the
  # global mean 0.5, so both ranks pass (">=").
  k = np.array(
    [
      [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
      [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
    ]
  )
  out = merge_ref.merge_code_compat(k, k, [np.array([0]), np.array([0])], rule="average")
  assert [t.tolist() for t in out["target"]] == [[0, 0], [0, 0]]
  with pytest.raises(ValueError):  # heads must evict the same count
    merge_ref.merge_code_compat(k, k, [np.array([0]), np.array([0, 1])])


def test_code_weighted_filter_is_shared_across_heads():
  # One kept key [1, 0] per head. Max-cos by evicted rank: head 0 (1, 0.71, 0), head 1 (0, 1,
  # 0.71); rank means (0.5, 0.85, 0.35) against the global mean 0.57: only rank 1 passes (a
  # per-head filter would pass ranks 0, 1 of head 0 and 1, 2 of head 1).
  k = np.array(
    [
      [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]],
      [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]],
    ]
  )
  kept = [np.array([0]), np.array([0])]
  w = merge_ref.merge_code_compat(k, k, kept, rule="weighted")
  assert [t.tolist() for t in w["target"]] == [[-1, 0, -1], [-1, 0, -1]]
  s = 1 / math.sqrt(2)
  np.testing.assert_allclose(w["k"][:, 0], [[(1 + s) / 2, s / 2], [1.0, 0.0]], atol=1e-12)
  # average, misaligned: the rank-0 tokens (position 1) go to rank 1's target, 0.
  a = merge_ref.merge_code_compat(k, k, kept, rule="average")
  np.testing.assert_allclose(a["k"][:, 0], [[1.0, 0.0], [0.5, 0.5]], atol=1e-12)


def _scores_attn(score_NT):
  """An [N, T, T] array whose column sums are score_NT (the references only sum columns)."""
  n, t = score_NT.shape
  a = np.zeros((n, t, t))
  a[:, -1, :] = score_NT
  return a


def test_lookm_text_prior_by_hand():
  modality = np.array([1, 1, 2, 2, 2, 2, 2, 1, 1, 1])
  # GQA: two query heads, one KV head: the KV score is their mean.
  s = np.array([[0, 0, 5, 1, 9, 2, 3, 0, 0, 0], [0, 0, 1, 1, 1, 8, 3, 0, 0, 0]], float)
  k = np.random.default_rng(0).standard_normal((1, 10, 3))
  args = ([_scores_attn(s)], [k], [k], modality)
  # n = 6: M = 3 (7, 8, 9), N = 3; text before the window {0, 1}; top-1 visual by mean score:
  # means 3, 1, 5, 5, 3 at 2..6 -> tie 4 / 5 -> lower position 4.
  out = lookm_ref.lookm(*args, ratio=0.6, merge=None)
  assert (out["n"], out["recent"], out["important"]) == (6, 3, 3)
  assert out["kept"][0][0].tolist() == [0, 1, 4, 7, 8, 9]
  # n = 4: M = 2 (8, 9), N = 2 < 3 text tokens {0, 1, 7}: all text kept, overrun 1.
  out = lookm_ref.lookm(*args, ratio=0.4, merge="pivot")
  assert out["kept"][0][0].tolist() == [0, 1, 7, 8, 9]
  assert out["counts"].tolist() == [[5]] and out["overrun"].tolist() == [[1]]
  # n = 5 (odd): M = ceil(5/2) = 3, N = 2.
  assert lookm_ref.split(5, 0.1, 0.1) == (3, 2)
  assert lookm_ref.split(5, 3, 1) == (4, 1)


def test_lookm_text_only_is_h2o():
  s = np.array([[9, 0, 3, 7, 1, 2, 8, 5, 0, 0]], float)
  k = np.random.default_rng(1).standard_normal((1, 10, 3))
  out = lookm_ref.lookm([_scores_attn(s)], [k], [k], np.ones(10, int), ratio=0.4, merge=None)
  assert out["kept"][0][0].tolist() == [0, 6, 8, 9]  # top-2 of [0, 8) by score + recent 8, 9
  np.testing.assert_array_equal(out["k"][0], k[:, [0, 6, 8, 9]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lookm_random_invariants(seed):
  attn, _, keys, values, _, modality = random_prompt(seed)
  T = len(modality)
  for merge in (None, "average", "pivot", "weighted"):
    out = lookm_ref.lookm(attn, keys, values, modality, ratio=0.5, merge=merge)
    n, M = out["n"], out["recent"]
    text_c = np.flatnonzero((modality == 1) & (np.arange(T) < T - M))
    for l, kept_K in enumerate(out["kept"]):
      for j, p in enumerate(kept_K):
        assert len(p) == M + max(out["important"], len(text_c)) == out["counts"][l, j]
        assert set(range(T - M, T)) <= set(p.tolist()) and set(text_c) <= set(p.tolist())
        if merge is None:
          np.testing.assert_array_equal(out["k"][l][j], keys[l][j, p])
      if merge is not None:
        m = merge_ref.merge(keys[l], values[l], kept_K, rule=merge)
        np.testing.assert_array_equal(out["v"][l], m["v"])
    assert n == math.ceil(0.5 * T)
  for merge in lookm_ref.CODE_MERGES:  # the released code's: merge_code_compat, some dropped
    cc = lookm_ref.lookm(attn, keys, values, modality, ratio=0.5, merge=merge)
    assert any((t == -1).any() for layer in cc["target"] for t in layer)
    for l, kept_K in enumerate(cc["kept"]):
      m = merge_ref.merge_code_compat(keys[l], values[l], kept_K, rule=merge.removesuffix("-code"))
      np.testing.assert_array_equal(cc["v"][l], m["v"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_ge_T_keeps_everything(seed):
  attn, q, keys, values, scaling, modality = random_prompt(seed)
  T = len(modality)
  outs = [
    lookm_ref.lookm(attn, keys, values, modality, tokens=T + 5),
    lookm_ref.lookm(attn, keys, values, modality, ratio=1.0, merge="weighted"),
    meda_ref.meda(attn, keys, values, modality, queries=q, scaling=scaling, ratio=1.0),
    meda_ref.meda(attn, keys, values, modality, variant="code", tokens=T),
  ]
  for out in outs:
    assert (out["counts"] == T).all()
    for l in range(len(keys)):
      np.testing.assert_array_equal(out["k"][l], keys[l])
      np.testing.assert_array_equal(out["v"][l], values[l])
      assert all((t == -1).all() and len(t) == 0 for t in out["target"][l])
  assert (outs[2]["layer_fractions"] == 1).all() and (outs[2]["layer_budgets"] == T).all()


def test_layer_fractions_by_hand():
  E = np.array([0.0, math.log(3.0)])  # softmax = (1/4, 3/4); p = (1/2, 3/2)
  np.testing.assert_allclose(meda_ref.layer_fractions(E, 0.5), [0.25, 0.75], atol=1e-14)
  # x = (2.5, 7.5): remainders tie -> the lower layer gets the extra token.
  assert meda_ref.layer_budgets([0.25, 0.75], 10).tolist() == [3, 7]
  # rho = 0.8: (0.4, 1.2) clamps to (0.4, 1); renormalised: (0.6, 1) with mean 0.8.
  np.testing.assert_allclose(meda_ref.layer_fractions(E, 0.8), [0.4, 1.0], atol=1e-14)
  np.testing.assert_allclose(meda_ref.layer_fractions(E, 0.8, renormalise=True), [0.6, 1.0])
  # alpha_min clamps from below; lo = min(alpha_min, rho).
  E = np.array([0.0, 10.0, 10.0])
  a = meda_ref.layer_fractions(E, 0.3, alpha_min=0.05)
  assert a[0] == 0.05 and np.allclose(a[1:], 0.3 * 3 * np.exp(10) / (1 + 2 * np.exp(10)))
  r = meda_ref.layer_fractions(E, 0.3, alpha_min=0.05, renormalise=True)
  np.testing.assert_allclose([r[0], r.mean()], [0.05, 0.3], atol=1e-14)
  p1 = 3 * np.exp(10) / (1 + 2 * np.exp(10))
  np.testing.assert_allclose(meda_ref.layer_fractions(E, 0.02, 0.05), [0.02, 0.02 * p1, 0.02 * p1])
  np.testing.assert_allclose(meda_ref.layer_fractions(E, 0.02, 0.05, renormalise=True), 0.02)
  assert meda_ref.layer_budgets([0.001, 0.5], 10).tolist() == [1, 5]  # at least 1 per layer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_renormalised_mean_and_budget_sum(seed):
  rng = np.random.default_rng(seed)
  for L in (2, 5, 32):
    E = 3.0 * rng.standard_normal(L)
    T = 997
    for n in (50, 100, 200, 500, 900):
      rho = n / T
      a = meda_ref.layer_fractions(E, rho, renormalise=True)
      assert abs(a.mean() - rho) < 1e-12 and a.min() >= 0.01 - 1e-15 and a.max() <= 1.0
      plain = meda_ref.layer_fractions(E, rho)
      np.testing.assert_allclose(plain, np.clip(np.exp(E) / np.exp(E).sum() * L * rho, 0.01, 1))
      S = meda_ref.largest_remainder(a * T)
      assert S.sum() == L * n and (np.abs(S - a * T) < 1).all()


def test_entropies_by_hand_and_against_stats_ref():
  # Zero queries: every restricted softmax is uniform -> H_TV = ln(#visual), H_VT = ln(#text).
  modality = np.array([1, 2, 2, 2, 1, 2])
  q = np.zeros((2, 6, 3))
  k = np.random.default_rng(0).standard_normal((1, 6, 3))
  h_tv, h_vt = meda_ref.cross_modal_entropy(q, k, 1.0, modality)
  np.testing.assert_allclose([h_tv, h_vt], [math.log(4), math.log(2)], atol=1e-14)
  assert meda_ref.cross_modal_entropy(q, k, 1.0, np.ones(6, int)) == (0.0, 0.0)
  # Uniform causal rows: row t has entropy ln(t + 1).
  T = 5
  attn = np.tril(np.ones((2, T, T))) / np.arange(1, T + 1)[None, :, None]
  np.testing.assert_allclose(meda_ref.row_entropy(attn), np.log(np.arange(1, T + 1)).mean())
  # Random data against the statistics reference (written separately, dense, batch axis).
  attn, qs, keys, _, scaling, modality = random_prompt(3, N=4, K=2)
  valid = np.ones((1, len(modality)), bool)
  for a, ql, kl in zip(attn, qs, keys):
    ours = meda_ref.cross_modal_entropy(ql, kl, scaling, modality)
    theirs = stats_ref.cross_entropy(
      ql[None], kl[None], scaling, valid, (modality == 1)[None], (modality >= 2)[None]
    )[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    np.testing.assert_allclose(
      meda_ref.row_entropy(a), stats_ref.row_entropy(a[None], valid)[0].mean(), atol=1e-12
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_meda_random_invariants(seed, variant):
  attn, q, keys, values, scaling, modality = random_prompt(seed, L=4, T=40)
  T = len(modality)
  out = meda_ref.meda(
    attn, keys, values, modality, queries=q, scaling=scaling, variant=variant, ratio=0.3
  )
  assert out["n"] == math.ceil(0.3 * T) and out["rho"] == out["n"] / T
  E = out["entropies"]
  np.testing.assert_allclose(
    out["layer_fractions"], np.clip(np.exp(E) / np.exp(E).sum() * 4 * out["rho"], 0.01, 1)
  )
  S = out["layer_budgets"]
  assert S.sum() == math.floor((out["layer_fractions"] * T).sum() + 0.5)
  b1, b2 = (3, 1) if variant == "paper" else (1, 1)
  for l in range(4):
    M, N = out["recent"][l], out["important"][l]
    assert M + N == S[l] and M == min(S[l], math.floor(S[l] * b1 / (b1 + b2) + 0.5))
    n_text = int(((modality == 1) & (np.arange(T) < T - M)).sum())
    assert (out["counts"][l] == M + max(N, n_text)).all()
    assert (out["overrun"][l] == max(0, n_text - N)).all()
    for p in out["kept"][l]:
      assert set(range(T - M, T)) <= set(p.tolist())
    fn = merge_ref.merge if variant == "paper" else merge_ref.merge_code_compat
    m = fn(keys[l], values[l], out["kept"][l], rule="average")
    np.testing.assert_array_equal(out["k"][l], m["k"])
  ren = meda_ref.meda(
    attn,
    keys,
    values,
    modality,
    queries=q,
    scaling=scaling,
    variant=variant,
    ratio=0.3,
    renormalise=True,
  )
  assert abs(ren["layer_fractions"].mean() - ren["rho"]) < 1e-12
  assert ren["layer_budgets"].sum() == 4 * ren["n"]


def test_meda_text_only_fallback():
  attn, q, keys, values, scaling, _ = random_prompt(4, T=20)
  text = np.ones(20, int)
  out = meda_ref.meda(attn, keys, values, text, queries=q, scaling=scaling, ratio=0.2)
  assert (out["entropies"] == 0).all()
  np.testing.assert_allclose(out["layer_fractions"], 0.2)
  assert out["layer_budgets"].tolist() == [4, 4, 4]
  h2o = lookm_ref.lookm(
    attn, keys, values, text, tokens=4, recent_ratio=3, important_ratio=1, merge="average"
  )
  for l in range(3):
    assert [p.tolist() for p in out["kept"][l]] == [p.tolist() for p in h2o["kept"][l]]
    np.testing.assert_allclose(out["k"][l], h2o["k"][l], atol=0)
  code = meda_ref.meda(attn, keys, values, text, variant="code", ratio=0.2)
  assert (code["entropies"] > 0).all() and (code["counts"] == code["layer_budgets"][:, None]).all()
