"""Self-checks of the MadaKV reference on hand-made attention whose answer is known."""

import numpy as np
import pytest

from references.madakv_ref import (
  allocate,
  demand,
  kept_tokens,
  layer_slots,
  madakv_ref,
  mpa_split,
  next_budget,
  pool_psi,
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


@pytest.mark.parametrize("reading", ["A", "B", "C"])
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
  for reading in ("A", "B", "C"):
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
  out = madakv_ref([a], None, None, mod, tokens=14, proxy_window=8, reading="B", pool_cap=False)
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
  out = madakv_ref(attn, keys, values, mod, ratio=0.05, proxy_window=6, reading="B", pool_cap=False)
  np.testing.assert_array_equal(out["counts"], out["demand_slots"])  # budget ignored
  np.testing.assert_array_equal(out["candidate_split"], out["demand"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_hcc_is_uniform_and_exact(seed):
  attn, keys, values, mod = _case(seed)
  for reading in ("A", "B", "C"):
    out = madakv_ref(attn, keys, values, mod, ratio=0.4, proxy_window=6, reading=reading, hcc=False)
    assert (out["layer_budgets"] == 16).all() and (out["counts"] == 16).all()
    assert out["counts"].sum() == 4 * 2 * 16 and (out["compensation"] == 0).all()


@pytest.mark.parametrize("reading", ["A", "B", "C"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_mpa_no_hcc_is_window_plus_topk(seed, reading):
  attn, keys, values, mod = _case(seed)
  out = madakv_ref(
    attn, keys, values, mod, ratio=0.4, proxy_window=6, reading=reading, mpa=False, hcc=False
  )
  for layer in range(4):
    psi = proxy_scores(attn[layer], 2, 6)
    for k in range(2):
      top = np.argsort(-psi[k, :34], kind="stable")[:10]
      np.testing.assert_array_equal(out["kept"][layer][k], np.sort(np.r_[top, 34:40]))


@pytest.mark.parametrize("reading", ["A", "B", "C"])
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


@pytest.mark.parametrize("reading", ["B", "C"])
def test_ablations_change_selection(reading):
  attn, keys, values, mod = _case(1)
  runs = {
    (m, h): madakv_ref(
      attn, keys, values, mod, ratio=0.3, proxy_window=6, reading=reading, mpa=m, hcc=h
    )
    for m in (True, False)
    for h in (True, False)
  }
  sets = {key: [tuple(x) for row in r["kept"] for x in row] for key, r in runs.items()}
  assert len(set(map(tuple, sets.values()))) == 4


# Reading C (item 6C).


def test_layer_slots_hand_computed():
  # R = 80 (L = 4, Kh = 2, n = 10), r = 3: share = 20, hi = min(2*40, 80 - 3*2*1) = 74.
  assert layer_slots(80, 30, 3, 2, 40, 1) == (30, 20, 74)  # over-demand keeps its demand
  assert layer_slots(80, 12, 3, 2, 40, 1) == (20, 20, 74)  # under-demand keeps its share
  assert layer_slots(80, 100, 3, 2, 40, 1) == (74, 20, 74)  # later layers keep b_min each
  assert layer_slots(81, 12, 3, 2, 40, 1) == (20, 20, 75)  # share floors 81 / 4
  assert layer_slots(80, 100, 3, 2, 30, 1) == (60, 20, 60)  # at most Kh*T
  assert layer_slots(15, 3, 0, 2, 40, 1) == (15, 15, 15)  # last layer: what remains
  assert layer_slots(15, 3, 0, 2, 5, 1) == (10, 15, 10)  # ... at most Kh*T
  assert layer_slots(10, 0, 1, 2, 40, 4) == (8, 5, 2)  # floor Kh*b_min wins over hi
  assert layer_slots(80, 0, 3, 2, 3, 9) == (6, 20, 6)  # b_min is taken as min(b_min, T)


def test_allocate_hand_computed():
  # u = d - b_min = (3, 6, 9), E = 9: q = (1.5, 3, 4.5); leftover 1 goes to the lower tied head.
  np.testing.assert_array_equal(allocate(12, [4, 7, 10], 1, 100), [3, 4, 5])
  np.testing.assert_array_equal(allocate(21, [4, 7, 10], 1, 100), [4, 7, 10])  # S = D: b = d
  # u = (2, 4, 6), E = 5: q = (5/6, 5/3, 5/2) -> floors (0, 1, 2), leftover 2 to fracs .83, .67.
  np.testing.assert_array_equal(allocate(8, [3, 5, 7], 1, 100), [2, 3, 3])
  # d < b_min gives weight 0: u = (0, 4), E = 5 -> q = (0, 5).
  np.testing.assert_array_equal(allocate(9, [1, 6], 2, 100), [2, 7])
  # cap = T - b_min = 6: head 0's quota 11*18/22 = 9 > 6 caps it; the other two split 11 - 6 = 5
  # equally (2.5 each), the leftover slot to the lower head.
  np.testing.assert_array_equal(allocate(17, [20, 4, 4], 2, 8), [8, 5, 4])
  # Two rounds: head 0 capped first (16.7 > 10), then head 1 (20*60/80 = 15 > 10), rest 5 + 5.
  np.testing.assert_array_equal(allocate(30, [100, 60, 10, 10], 0, 10), [10, 10, 5, 5])
  # U_F == 0: equal split 7/3 each, the leftover to the lowest head.
  np.testing.assert_array_equal(allocate(13, [1, 1, 1], 2, 10), [5, 4, 4])
  # U_F == 0 after capping: head 0 capped at 4, the two zero-weight heads split 2 equally.
  np.testing.assert_array_equal(allocate(9, [50, 1, 1], 1, 5), [5, 2, 2])
  np.testing.assert_array_equal(allocate(6, [5, 5, 5], 2, 20), [2, 2, 2])  # E = 0
  np.testing.assert_array_equal(allocate(60, [40, 40, 40], 1, 20), [20, 20, 20])  # all at T


def test_allocate_float32_quotas():
  # E = 10, u = (1, 13, 16), U = 30: exact fractional parts all 1/3. In float32, 13/3 and 16/3
  # round up (frac 0.33333349) while 1/3 rounds to 0.33333334, so the leftover slot goes to
  # head 1; float64 quotas would give it to head 0 (allocation [1, 4, 5]).
  np.testing.assert_array_equal(allocate(10, [1, 13, 16], 0, 100), [0, 5, 5])


def _ramp_modality(t, kind):
  if kind == "text":
    return np.ones(t, np.int64)
  if kind == "image_heavy":
    return _modality(t, 1, 32)
  return _modality(t, 5, 25, vid=True)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["text", "image_heavy", "mixed"])
@pytest.mark.parametrize("mpa", [True, False])
def test_reading_c_conserves_total(seed, kind, mpa):
  attn, keys, values, _ = _case(seed, n_layers=5)
  mod = _ramp_modality(40, kind)
  for ratio, b_min in ((0.05, 1), (0.2, 1), (0.2, 6), (0.5, 1), (0.5, 3)):
    out = madakv_ref(attn, keys, values, mod, ratio=ratio, proxy_window=6, mpa=mpa, b_min=b_min)
    n, kh, nl = out["n"], 2, 5
    assert n == {0.05: 2, 0.2: 8, 0.5: 20}[ratio]
    counts, slots, rem = out["counts"], out["layer_slots"], out["remaining"]
    assert counts.sum() == nl * kh * n  # exact, every layer and head included
    assert sum(len(x) for row in out["kept"] for x in row) == nl * kh * n
    np.testing.assert_array_equal(counts.sum(1), slots)
    assert rem[0] == nl * kh * n and out["layer_budgets"][0] == n
    np.testing.assert_array_equal(rem[1:], rem[:-1] - slots[:-1])
    assert slots[-1] == rem[-1]  # the last layer keeps what remains
    assert (counts >= b_min).all() and (counts <= 40).all()
    for layer in range(nl):
      for k in range(kh):
        assert len(out["kept"][layer][k]) == counts[layer, k]
        if counts[layer, k] >= 6:  # the window survives whenever the head has room for it
          assert set(range(34, 40)) <= set(out["kept"][layer][k])
    if mpa:  # a head keeping exactly its demand keeps its per-modality demand
      exact = counts == out["demand_slots"]
      np.testing.assert_array_equal(out["candidate_split"][exact], out["demand"][exact])


def test_reading_c_over_demanding_layer_keeps_demand():
  # L = 3, MHA with 2 heads, T = 40, p = 4, n = 10 (R^0 = 60), text only. Layer 0 spreads over 25
  # candidates (demand ceil(0.9 * 25) = 23, d = 27); layers 1 and 2 look at 2 tokens (d = 6).
  t, p = 40, 4
  wide, narrow = _looking_at(t, 2, [range(25)] * 2), _looking_at(t, 2, [[3, 10]] * 2)
  out = madakv_ref([wide, narrow, narrow], None, None, np.ones(t), tokens=10, proxy_window=p)
  np.testing.assert_array_equal(out["demand_slots"], [[27, 27], [6, 6], [6, 6]])
  # Layer 0: share 60 // 3 = 20, hi = 60 - 2*2*1 = 56, D = 54 -> keeps 54 (27 per head).
  # Layer 1: R = 6, share 3, hi = 6 - 2 = 4, D = 12 -> 4. Layer 2: R = 2 -> 2.
  np.testing.assert_array_equal(out["counts"], [[27, 27], [2, 2], [1, 1]])
  np.testing.assert_array_equal(out["layer_slots"], [54, 4, 2])
  np.testing.assert_array_equal(out["remaining"], [60, 6, 2])
  np.testing.assert_array_equal(out["layer_budgets"], [10, 1, 1])
  np.testing.assert_array_equal(out["caps"], [56, 4, 2])
  np.testing.assert_array_equal(out["compensation"], [34, 1, 0])
  for k in range(2):
    np.testing.assert_array_equal(out["kept"][0][k], np.r_[0:23, 36:40])  # ties: lower first
    np.testing.assert_array_equal(out["kept"][1][k], [36, 37])  # equal window psi (0.1 each)
    np.testing.assert_array_equal(out["kept"][2][k], [36])


def test_reading_c_under_demanding_layer_keeps_share():
  t = 40
  wide, narrow = _looking_at(t, 2, [range(25)] * 2), _looking_at(t, 2, [[3, 10]] * 2)
  out = madakv_ref([narrow, wide, wide], None, None, np.ones(t), tokens=10, proxy_window=4)
  # Layer 0: D = 12 < share 20 -> 20 (u = 5, 5 -> 10 each). Layer 1: R = 40, share 20,
  # hi = 40 - 2 = 38 < D = 54 -> 38 (19 each). Layer 2: R = 2 -> 1 each.
  np.testing.assert_array_equal(out["counts"], [[10, 10], [19, 19], [1, 1]])
  np.testing.assert_array_equal(out["compensation"], [0, 18, 0])


def _image_text_attn(t, p):
  """[1, T, T]: proxy rows put 0.05 on each of 10 images (0..9), 0.02 on each of 10 texts
  (10..19) and 0.3 on themselves; earlier rows are uniform causal."""
  a = np.zeros((1, t, t))
  for j in range(t):
    if j >= t - p:
      a[0, j, 0:10], a[0, j, 10:20], a[0, j, j] = 0.05, 0.02, 0.3
    else:
      a[0, j, : j + 1] = 1.0 / (j + 1)
  return a


def test_reading_c_no_mpa_uses_blind_demand():
  # psi: images 0.2, texts 0.08 (4 proxy rows), other candidates 0. theta = 0.85:
  # k_v = #{j : 0.2 j < 1.7} = 9, k_t = #{j : 0.08 j < 0.68} = 9 -> d = 4 + 18 = 22.
  # Blind: 0.85 * 2.8 = 2.38; 10 images (2.0) + 5 texts (2.40) reach it -> k_a = 15, d = 19.
  t, p = 40, 4
  attn = [_image_text_attn(t, p), _looking_at(t, 1, [[25]])]
  mod = _modality(t, 0, 10)
  common = dict(tokens=12, proxy_window=p, theta=0.85)
  on = madakv_ref(attn, None, None, mod, **common)
  off = madakv_ref(attn, None, None, mod, mpa=False, **common)
  np.testing.assert_array_equal(on["demand"][0, 0], [9, 9])
  np.testing.assert_array_equal(off["demand"][0, 0], [9, 9])  # still reported per modality
  assert on["demand_slots"][0, 0] == 22 and off["demand_slots"][0, 0] == 19
  # L = 2, R = 24: layer 0 share 12, hi 23 -> each keeps its demand; layer 1 the rest.
  np.testing.assert_array_equal(on["counts"][:, 0], [22, 2])
  np.testing.assert_array_equal(off["counts"][:, 0], [19, 5])
  np.testing.assert_array_equal(on["kept"][0][0], np.r_[0:9, 10:19, 36:40])  # (k_v, k_t)
  np.testing.assert_array_equal(off["kept"][0][0], np.r_[0:15, 36:40])  # blind top 15
  np.testing.assert_array_equal(off["candidate_split"][0, 0], [10, 5])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["image_heavy", "mixed"])
def test_reading_c_no_mpa_is_hcc_plus_topc(seed, kind):
  attn, keys, values, _ = _case(seed, n_layers=5)
  mod = _ramp_modality(40, kind)
  for ratio in (0.05, 0.2, 0.5):
    out = madakv_ref(attn, keys, values, mod, ratio=ratio, proxy_window=6, mpa=False)
    assert out["counts"].sum() == 5 * 2 * out["n"]
    for layer in range(5):
      psi = proxy_scores(attn[layer], 2, 6)
      for k in range(2):
        s = np.sort(psi[k, :34])[::-1]
        cum = np.cumsum(s)
        blind = int(np.searchsorted(cum, 0.9 * cum[-1]) + 1)  # first j: S(j) >= theta w
        assert out["demand_slots"][layer, k] == 6 + blind
        b = out["counts"][layer, k]
        top = np.argsort(-psi[k, :34], kind="stable")[: max(0, b - 6)]
        win = 34 + np.argsort(-psi[k, 34:], kind="stable")[: min(b, 6)]
        np.testing.assert_array_equal(out["kept"][layer][k], np.sort(np.r_[top, win]))


def test_reading_c_hcc_off_reports():
  attn, keys, values, mod = _case(0)
  out = madakv_ref(attn, keys, values, mod, ratio=0.2, proxy_window=6, hcc=False)
  assert (out["counts"] == 8).all() and (out["caps"] == 8).all()
  np.testing.assert_array_equal(out["layer_slots"], [16] * 4)
  np.testing.assert_array_equal(out["remaining"], [64, 48, 32, 16])


# Pooling (item 2, option kernel).


def test_pool_psi_hand_computed():
  # T = 8, p = 3: candidates 0..4 = (3, 6, 0, 9, 3), window 5..7 = (1, 2, 4). kernel 3:
  # 0: (0 + 3 + 6) / 3 = 3 (zero before position 0, divisor still 3, not 2);
  # 1: (3 + 6 + 0) / 3 = 3; 2: (6 + 0 + 9) / 3 = 5; 3: (0 + 9 + 3) / 3 = 4;
  # 4: (9 + 3 + 0) / 3 = 4 (window position 5 counts as zero, not 1); window unpooled.
  psi = np.array([3.0, 6.0, 0.0, 9.0, 3.0, 1.0, 2.0, 4.0])
  np.testing.assert_array_equal(pool_psi(psi, 5, 3), [3, 3, 5, 4, 4, 1, 2, 4])
  # kernel 5: 0: (3+6+0)/5, 1: (3+6+0+9)/5, 2: 21/5, 3: (6+0+9+3)/5, 4: (0+9+3)/5.
  np.testing.assert_allclose(
    pool_psi(psi, 5, 5), [9 / 5, 18 / 5, 21 / 5, 18 / 5, 12 / 5, 1, 2, 4], rtol=0, atol=1e-15
  )
  # A kernel wider than the candidates: every candidate averages all of them over the kernel.
  np.testing.assert_allclose(pool_psi(psi, 2, 7), [9 / 7, 9 / 7, 0, 9, 3, 1, 2, 4], atol=1e-15)
  np.testing.assert_array_equal(pool_psi(psi, 0, 3), psi)  # no candidates (p == T)
  np.testing.assert_array_equal(pool_psi(psi, 5, 1), psi)
  # Leading axes are pooled independently.
  two = np.stack([psi, psi[::-1]])
  np.testing.assert_array_equal(pool_psi(two, 5, 3)[0], pool_psi(psi, 5, 3))
  np.testing.assert_array_equal(pool_psi(two, 5, 3)[1], pool_psi(psi[::-1], 5, 3))


def test_proxy_scores_pooled_then_gqa_mean():
  attn = _random_attn(np.random.default_rng(3), 1, 4, 12)[0]
  per_q = attn[:, 7:, :].sum(1)  # p = 5: candidates 0..6, window 7..11
  pooled = per_q.copy()
  for q in range(4):  # independent form: zero-padded "same" convolution over the candidates
    pooled[q, :7] = np.convolve(per_q[q, :7], np.ones(3), mode="same") / 3
  psi = proxy_scores(attn, 2, 5, kernel=3)
  np.testing.assert_allclose(psi[0], (pooled[0] + pooled[1]) / 2, rtol=1e-13)
  np.testing.assert_allclose(psi[1], (pooled[2] + pooled[3]) / 2, rtol=1e-13)
  np.testing.assert_array_equal(psi[:, 7:], proxy_scores(attn, 2, 5)[:, 7:])  # window untouched
  assert not np.allclose(psi[:, :7], proxy_scores(attn, 2, 5)[:, :7])
  np.testing.assert_array_equal(proxy_scores(attn, 2, 5, kernel=1), proxy_scores(attn, 2, 5))


def _outputs_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    if key in ("kept", "k", "v"):
      for row_a, row_b in zip(a[key], b[key], strict=True):
        if key == "kept":
          for x, y in zip(row_a, row_b, strict=True):
            np.testing.assert_array_equal(x, y)
        else:
          np.testing.assert_array_equal(row_a, row_b)
    else:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("reading", ["A", "B", "C"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_one_is_exactly_default(seed, reading):
  attn, keys, values, mod = _case(seed, n_layers=5)
  for ratio, mpa, hcc in ((0.2, True, True), (0.4, False, True), (0.3, True, False)):
    common = dict(ratio=ratio, proxy_window=6, reading=reading, mpa=mpa, hcc=hcc)
    base = madakv_ref(attn, keys, values, mod, **common)
    _outputs_equal(madakv_ref(attn, keys, values, mod, kernel=1, **common), base)
    pooled = madakv_ref(attn, keys, values, mod, kernel=5, **common)
    assert not np.array_equal(pooled["psi"], base["psi"])  # the option is really applied
    for layer in range(5):
      np.testing.assert_array_equal(pooled["psi"][layer], proxy_scores(attn[layer], 2, 6, kernel=5))


def _lone_vs_run_attn(t, p):
  """[1, T, T]: proxy rows put 0.2 on position 5 (lone), 0.15 on each of 20, 21, 22 (a run)
  and the rest on themselves; earlier rows are uniform causal."""
  a = np.zeros((1, t, t))
  for j in range(t):
    if j >= t - p:
      a[0, j, 5], a[0, j, 20:23], a[0, j, j] = 0.2, 0.15, 0.35
    else:
      a[0, j, : j + 1] = 1.0 / (j + 1)
  return a


@pytest.mark.parametrize("reading", ["A", "B", "C"])
def test_pooling_prefers_a_run_over_a_lone_peak(reading):
  # T = 32, p = 4: psi(5) = 0.8, psi(20..22) = 0.6 each. Unpooled top 3 candidates: 5, then
  # 20, 21 (ties to the lower position). kernel 3: pooled(21) = 1.8/3 = 0.6, pooled(20) =
  # pooled(22) = 1.2/3 = 0.4, pooled(4..6) = 0.8/3 = 0.267 -> the run 20, 21, 22 wins.
  t, p = 32, 4
  attn, mod = [_lone_vs_run_attn(t, p)], np.ones(t, np.int64)
  common = dict(tokens=p + 3, proxy_window=p, reading=reading, hcc=False)
  plain = madakv_ref(attn, None, None, mod, **common)
  pooled = madakv_ref(attn, None, None, mod, kernel=3, **common)
  np.testing.assert_array_equal(plain["kept"][0][0], [5, 20, 21, 28, 29, 30, 31])
  np.testing.assert_array_equal(pooled["kept"][0][0], [20, 21, 22, 28, 29, 30, 31])
  psi = pooled["psi"][0, 0]
  np.testing.assert_allclose(
    psi[[4, 5, 6, 19, 20, 21, 22, 23]], [0.8 / 3] * 3 + [0.2, 0.4, 0.6, 0.4, 0.2]
  )
  np.testing.assert_array_equal(psi[t - p :], plain["psi"][0, 0, t - p :])  # window unpooled
  # Demand follows the pooled psi too: more, smaller scores need more slots to reach theta.
  assert pooled["demand"][0, 0, 1] > plain["demand"][0, 0, 1]


def test_pooling_changes_mpa_weights_with_image_next_to_text():
  # Pooling moves score across a modality border: a text peak at 10 next to images 0..9.
  t, p = 24, 4
  a = _looking_at(t, 1, [[10]])
  mod = _modality(t, 0, 10)
  plain = madakv_ref([a], None, None, mod, tokens=8, proxy_window=p, hcc=False)
  pooled = madakv_ref([a], None, None, mod, tokens=8, proxy_window=p, hcc=False, kernel=3)
  # Proxy rows put 0.9 on 10: psi(10) = 3.6; pooled: 9, 10, 11 get 1.2 each.
  np.testing.assert_allclose(plain["modality_weights"][0, 0], [0.0, 3.6])
  np.testing.assert_allclose(pooled["modality_weights"][0, 0], [1.2, 2.4])


@pytest.mark.parametrize("kernel", [0, -1, -3, 2, 4, 3.0, 2.5, "3", None, True])
def test_kernel_must_be_positive_odd_integer(kernel):
  attn, keys, values, mod = _case(0, n_layers=1)
  with pytest.raises(ValueError, match="kernel"):
    madakv_ref(attn, keys, values, mod, ratio=0.3, proxy_window=6, kernel=kernel)
  with pytest.raises(ValueError, match="kernel"):
    proxy_scores(attn[0], 2, 6, kernel=kernel)
  with pytest.raises(ValueError, match="kernel"):
    pool_psi(np.ones(8), 5, kernel)
  madakv_ref(attn, keys, values, mod, ratio=0.3, proxy_window=6, kernel=np.int64(3))
