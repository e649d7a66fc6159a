"""Self-checks of the MadaKV reference on hand-made attention whose answer is known."""

import numpy as np
import pytest

from references.madakv_ref import (
  demand,
  kept_tokens,
  madakv_ref,
  mpa_split,
  next_budget,
  proxy_scores,
)


def _random_attn(rng, n_layers, n_heads, t):
  """[L][N, T, T] causal softmax of random scores (no zeros above the diagonal's left)."""
  out = []
  for _ in range(n_layers):
    s = rng.normal(size=(n_heads, t, t)) * rng.uniform(0.5, 3.0)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    out.append(e / e.sum(-1, keepdims=True))
  return out


def _modality(t, start, stop, vid=False):
  m = np.ones(t, np.int64)
  m[start:stop] = 3 if vid else 2
  return m


def _looking_at(t, n_heads, targets_per_head):
  """[N, T, T] causal rows: each row spreads its mass uniformly over the head's targets that
  precede it, plus a small share on itself (so every row is a valid causal distribution)."""
  a = np.zeros((n_heads, t, t))
  for h, targets in enumerate(targets_per_head):
    for j in range(t):
      tg = [i for i in targets if i < j]
      if tg:
        a[h, j, tg] = 0.9 / len(tg)
        a[h, j, j] = 0.1
      else:
        a[h, j, j] = 1.0
  return a


def _case(seed, n_layers=4, n_heads=4, n_kv=2, t=40, hd=3):
  rng = np.random.default_rng(seed)
  attn = _random_attn(rng, n_layers, n_heads, t)
  keys = [rng.normal(size=(n_kv, t, hd)) for _ in range(n_layers)]
  values = [rng.normal(size=(n_kv, t, hd)) for _ in range(n_layers)]
  return attn, keys, values, _modality(t, 5, 25, vid=seed == 2)


def test_demand_hand_computed():
  psi = np.array([0.125, 0.5, 0.125, 0.25])  # dyadic: exact sums
  assert demand(psi, 0.75) == 2  # 0.5 + 0.25 reaches 0.75 exactly
  assert demand(psi, 0.8) == 3
  assert demand(psi, 1.0) == 4
  assert demand(np.array([0.5, 0.5, 0.0]), 1.0) == 2  # a zero tail is never needed
  assert demand(np.zeros(0), 0.9) == 0


def test_mpa_split_rounding_and_surplus():
  assert mpa_split(10, 3.0, 1.0, 20, 20) == (8, 2)  # 7.5 rounds half up
  assert mpa_split(10, 1.0, 3.0, 20, 20) == (3, 7)  # 2.5 -> 3
  assert mpa_split(10, 3.0, 1.0, 5, 20) == (5, 5)  # visual surplus goes to text
  assert mpa_split(10, 1.0, 3.0, 20, 1) == (9, 1)  # text surplus goes to visual
  assert mpa_split(10, 0.0, 0.0, 20, 20) == (0, 10)
  assert mpa_split(0, 1.0, 1.0, 20, 20) == (0, 0)


def test_next_budget_formulas():
  # per_head: (Kh*(r+1)*phi - X) / (Kh*r): L=4, layer 0 -> r=3, Kh=2, phi=10, X=26 -> 54/6 = 9.
  assert next_budget(10, 26, 0, 4, 2, 100, "per_head") == 9
  assert next_budget(10, 27, 0, 4, 2, 100, "per_head") == 8  # 53/6 floors to 8
  # layer_total: ((r+Kh)*phi - X) / r = (50 - 26) / 3 = 8.
  assert next_budget(10, 26, 0, 4, 2, 100, "layer_total") == 8
  assert next_budget(10, 200, 0, 4, 2, 100, "per_head") == 1  # clamp below (floor of < 0)
  assert next_budget(10, 0, 2, 4, 2, 15, "per_head") == 15  # clamp above at T


def test_kept_tokens():
  assert kept_tokens(100, ratio=0.2) == 20
  assert kept_tokens(101, ratio=0.2) == 21
  assert kept_tokens(3, ratio=0.01) == 1
  assert kept_tokens(10, tokens=50) == 10


def test_proxy_scores_gqa_mean():
  attn = _random_attn(np.random.default_rng(0), 1, 4, 12)[0]
  psi = proxy_scores(attn, 2, 5)
  per_q = attn[:, 7:, :].sum(1)
  np.testing.assert_allclose(psi[0], (per_q[0] + per_q[1]) / 2)
  np.testing.assert_allclose(psi[1], (per_q[2] + per_q[3]) / 2)
  np.testing.assert_allclose(psi.sum(-1), 5.0)  # each proxy row sums to one


@pytest.mark.parametrize("reading", ["A", "B"])
@pytest.mark.parametrize("mpa", [True, False])
@pytest.mark.parametrize("hcc", [True, False])
def test_full_budget_keeps_everything(reading, mpa, hcc):
  attn, keys, values, mod = _case(0)
  out = madakv_ref(attn, keys, values, mod, ratio=1.0, reading=reading, mpa=mpa, hcc=hcc)
  for layer in range(4):
    for k in range(2):
      np.testing.assert_array_equal(out["kept"][layer][k], np.arange(40))
    np.testing.assert_array_equal(out["k"][layer], keys[layer])
  assert (out["layer_budgets"] == 40).all()


def test_head_looking_only_at_images_keeps_only_images():
  t, images, texts = 40, list(range(4, 20)), list(range(20, 32))
  a = _looking_at(t, 2, [images, texts])  # head 0 images, head 1 text (MHA, Kh = N = 2)
  mod = _modality(t, 4, 20)
  for reading in ("A", "B"):
    out = madakv_ref([a], None, None, mod, tokens=14, proxy_window=8, reading=reading)
    assert out["modality_weights"][0, 0, 1] == 0 and out["modality_weights"][0, 1, 0] == 0
    cand0 = out["kept"][0][0][out["kept"][0][0] < t - 8]
    cand1 = out["kept"][0][1][out["kept"][0][1] < t - 8]
    assert set(cand0) <= set(images) and set(cand1) <= set(texts)
    assert len(cand0) > 0 and len(cand1) > 0
    assert out["candidate_split"][0, 0, 1] == 0 and out["candidate_split"][0, 1, 0] == 0
    np.testing.assert_array_equal(out["kept"][0][0][-8:], np.arange(32, 40))  # window kept
  # Uniform over 16 images / 12 texts, theta 0.9: demands ceil(14.4) = 15 and ceil(10.8) = 11.
  out = madakv_ref([a], None, None, mod, tokens=14, proxy_window=8, reading="B")
  np.testing.assert_array_equal(out["demand"][0], [[15, 0], [0, 11]])
  np.testing.assert_array_equal(out["demand_slots"][0], [8 + 15, 8 + 11])
  np.testing.assert_array_equal(out["counts"][0], [14, 14])  # one layer: cap = the pool = n
  out = madakv_ref([a], None, None, mod, tokens=14, proxy_window=8, pool_cap=False)
  np.testing.assert_array_equal(out["counts"][0], [8 + 15, 8 + 11])
  np.testing.assert_array_equal(out["candidate_split"][0], [[15, 0], [0, 11]])


def test_mpa_beats_blind_topk_on_diffuse_images():
  # Head attends 0.6 spread over 20 images and 0.3 on 3 text tokens: blind top-k takes text,
  # MPA gives ~2/3 of the candidate slots to images.
  t, p = 40, 8
  images, texts = list(range(2, 22)), [25, 27, 29]
  a = np.zeros((1, t, t))
  for j in range(t):
    if j > 29:
      a[0, j, images] = 0.6 / 20
      a[0, j, texts] = 0.3 / 3
      a[0, j, j] = 0.1
    else:
      a[0, j, : j + 1] = 1.0 / (j + 1)
  mod = _modality(t, 2, 22)
  common = dict(tokens=p + 3, proxy_window=p, hcc=False)
  on = madakv_ref([a], None, None, mod, mpa=True, **common)
  off = madakv_ref([a], None, None, mod, mpa=False, **common)
  # f = 0.6 / 0.9 (window columns excluded): floor(3 * 2/3 + 0.5) = 2 visual, 1 text.
  np.testing.assert_array_equal(on["candidate_split"][0, 0], [2, 1])
  np.testing.assert_array_equal(on["kept"][0][0][:3], [2, 3, 25])  # equal psi: lower position
  np.testing.assert_array_equal(off["candidate_split"][0, 0], [0, 3])  # the 3 strong texts
  np.testing.assert_array_equal(off["kept"][0][0][:3], texts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reading_a_budget_accounting(seed):
  attn, keys, values, mod = _case(seed, n_layers=5)
  for units in ("per_head", "layer_total"):
    out = madakv_ref(
      attn, keys, values, mod, ratio=0.3, proxy_window=6, reading="A", hcc_units=units
    )
    n, kh, t = out["n"], 2, 40
    phi = out["layer_budgets"]
    assert phi[0] == n
    for layer in range(5):
      assert (out["counts"][layer] == phi[layer]).all()  # the layer keeps exactly phi^l
      assert out["modality_split"][layer].sum(-1).tolist() == out["counts"][layer].tolist()
      x = int(out["demand_slots"][layer].sum())
      assert out["compensation"][layer] == x - kh * phi[layer]
      if layer < 4:
        assert phi[layer + 1] == next_budget(int(phi[layer]), x, layer, 5, kh, t, units)
    assert out["counts"].sum() == kh * phi.sum()
    # Over-demand lowers later budgets; under-demand raises them.
    for layer in range(4):
      sign = np.sign(out["compensation"][layer])
      assert np.sign(phi[layer] - phi[layer + 1]) in (sign, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reading_b_respects_total_budget(seed):
  attn, keys, values, mod = _case(seed, n_layers=6)
  for ratio in (0.1, 0.3, 0.6):
    out = madakv_ref(attn, keys, values, mod, ratio=ratio, proxy_window=6, reading="B")
    n = out["n"]
    assert out["counts"].sum() <= 6 * 2 * n
    assert (out["counts"] >= 1).all() and (out["counts"] <= out["caps"][:, None]).all()
    unclipped = out["counts"] == out["demand_slots"]
    np.testing.assert_array_equal(
      out["candidate_split"][unclipped], out["demand"][unclipped]
    )  # an unclipped head keeps exactly its per-modality demand
    for layer in range(6):
      for k in range(2):
        assert len(out["kept"][layer][k]) == out["counts"][layer, k]
        np.testing.assert_array_equal(
          out["k"][layer][k, : out["counts"][layer, k]], keys[layer][k, out["kept"][layer][k]]
        )


def test_reading_b_literal_keeps_demand():
  attn, keys, values, mod = _case(1, n_layers=3)
  out = madakv_ref(attn, keys, values, mod, ratio=0.05, proxy_window=6, pool_cap=False)
  np.testing.assert_array_equal(out["counts"], out["demand_slots"])  # budget ignored
  np.testing.assert_array_equal(out["candidate_split"], out["demand"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_hcc_is_uniform_and_exact(seed):
  attn, keys, values, mod = _case(seed)
  for reading in ("A", "B"):
    out = madakv_ref(attn, keys, values, mod, ratio=0.4, proxy_window=6, reading=reading, hcc=False)
    assert (out["layer_budgets"] == 16).all() and (out["counts"] == 16).all()
    assert out["counts"].sum() == 4 * 2 * 16 and (out["compensation"] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_mpa_no_hcc_is_window_plus_topk(seed):
  attn, keys, values, mod = _case(seed)
  out = madakv_ref(attn, keys, values, mod, ratio=0.4, proxy_window=6, mpa=False, hcc=False)
  for layer in range(4):
    psi = proxy_scores(attn[layer], 2, 6)
    for k in range(2):
      top = np.argsort(-psi[k, :34], kind="stable")[:10]
      np.testing.assert_array_equal(out["kept"][layer][k], np.sort(np.r_[top, 34:40]))


@pytest.mark.parametrize("reading", ["A", "B"])
def test_text_only_prompt_mpa_is_noop(reading):
  attn, keys, values, _ = _case(0)
  mod = np.ones(40, np.int64)
  on = madakv_ref(attn, keys, values, mod, ratio=0.3, proxy_window=6, reading=reading)
  off = madakv_ref(attn, keys, values, mod, ratio=0.3, proxy_window=6, reading=reading, mpa=False)
  for layer in range(4):
    for k in range(2):
      np.testing.assert_array_equal(on["kept"][layer][k], off["kept"][layer][k])
  assert (on["demand"][..., 0] == 0).all() and (on["modality_split"][..., 0] == 0).all()


def test_window_kept_and_truncated():
  attn, keys, values, mod = _case(0)
  out = madakv_ref(attn, keys, values, mod, tokens=10, proxy_window=6, reading="A", hcc=False)
  for layer in range(4):
    for k in range(2):
      assert set(range(34, 40)) <= set(out["kept"][layer][k])
  out = madakv_ref(attn, keys, values, mod, tokens=3, proxy_window=6, reading="A", hcc=False)
  psi = out["psi"]
  for layer in range(4):
    for k in range(2):
      top = 34 + np.argsort(-psi[layer, k, 34:], kind="stable")[:3]
      np.testing.assert_array_equal(out["kept"][layer][k], np.sort(top))


def test_ablations_change_selection():
  attn, keys, values, mod = _case(1)
  runs = {
    (m, h): madakv_ref(attn, keys, values, mod, ratio=0.3, proxy_window=6, mpa=m, hcc=h)
    for m in (True, False)
    for h in (True, False)
  }
  sets = {key: [tuple(x) for row in r["kept"] for x in row] for key, r in runs.items()}
  assert len(set(map(tuple, sets.values()))) == 4
