"""MadaKV vs its independent reference (tests/references/madakv_ref.py) on tiny HF models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmmkv
from policy_harness import assert_same_kept, mm_setup, text_setup
from references.madakv_ref import madakv_ref

CORE = [
  dict(),  # reading C, the default
  dict(mpa=False),  # "HCC only"
  dict(hcc=False),  # "MPA only"
  dict(reading="B"),
]
EXTRA = [
  dict(mpa=False, hcc=False),
  dict(theta=0.5, proxy_window=4, b_min=3),
  dict(kernel=5),
  dict(reading="B", mpa=False),
  dict(reading="A"),
  dict(reading="B", hcc_units="layer_total"),
  dict(reading="B", pool_cap=False),
]
SETUPS = [("llava", 0), ("llava", 1), ("llava", 2), ("qwen2_vl", 0)]
pytestmark = pytest.mark.usefixtures("dense_store")  # suite time: see conftest
# Suite time: the core variants on every setup at 20%, and at 50% on one setup per family; the
# others on one setup per family at 20%, and on the first at 50% too.
CASES = (
  [(s, kw, 0.2) for s in SETUPS for kw in CORE]
  + [(s, kw, 0.5) for s in (SETUPS[0], SETUPS[3]) for kw in CORE]
  + [(s, kw, 0.2) for s in (SETUPS[0], SETUPS[3]) for kw in EXTRA]
  + [(SETUPS[0], kw, 0.5) for kw in EXTRA]
)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
  """(family, seed) -> its `mm_setup`, built once for the module."""
  built = {}

  def get(family, seed):
    if (family, seed) not in built:
      built[family, seed] = mm_setup(tmp_path_factory.mktemp(family), seed, family)
    return built[family, seed]

  return get


@pytest.fixture
def llava(request, setups):
  # Not module-scoped itself: each (setup, kw) case is its own parameter to pytest, so a
  # module-scoped fixture parametrized this way was built again for every test.
  return setups(*request.param)


@pytest.mark.parametrize("llava,kw,ratio", CASES, ids=str, indirect=["llava"])
def test_kept_positions_and_kv_equal_reference(llava, kw, ratio):
  kw = {"proxy_window": 8, **kw}
  cache = jmmkv.compress(
    llava.model, llava.batch, jmmkv.policies.get("madakv", **kw), jmmkv.Budget(ratio=ratio)
  )
  for b, row in enumerate(llava.rows):
    ref = madakv_ref(row["attn"], row["keys"], row["values"], row["modality"], ratio=ratio, **kw)
    assert_same_kept(cache, b, ref["kept"], f"row {b} {kw}")
    mod = np.asarray(cache.modality)[:, b]  # [L, K, C]
    split = np.stack([(mod >= 2).sum(-1), (mod == 1).sum(-1)], axis=-1)  # kept visual / text
    np.testing.assert_array_equal(split, ref["modality_split"])
    np.testing.assert_array_equal(split.sum(-1), ref["counts"])  # the split fills the head budget
    k = np.asarray(cache.k)[:, b]
    for l, kept_l in enumerate(ref["kept"]):
      for h, kept in enumerate(kept_l):
        np.testing.assert_allclose(
          k[l, h, : len(kept)], row["keys"][l][h, kept], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_text_only_prompt(tmp_path, seed):
  s = text_setup(tmp_path, seed, [70, 33])
  cache = jmmkv.compress(
    s.model, s.batch, jmmkv.policies.get("madakv", proxy_window=8), jmmkv.Budget(ratio=0.25)
  )
  for b, row in enumerate(s.rows):
    ref = madakv_ref(
      row["attn"], row["keys"], row["values"], row["modality"], ratio=0.25, proxy_window=8
    )
    assert_same_kept(cache, b, ref["kept"], f"row {b}")


def _attention(rng, n_layers, n_heads, t):
  """[L][N, T, T] causal softmax rows, sharp or diffuse per (layer, head), some with a sink."""
  out = []
  for _ in range(n_layers):
    s = rng.normal(size=(n_heads, t, t)) * rng.uniform(0.3, 6.0, size=(n_heads, 1, 1))
    s[:, :, 0] += rng.choice([0.0, 12.0], size=(n_heads, 1))  # attention sinks in some heads
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    out.append(e / e.sum(-1, keepdims=True))
  return out


DEEP_VARIANTS = [
  dict(),
  dict(mpa=False),
  dict(hcc=False),
  dict(mpa=False, hcc=False),
  dict(kernel=3),
]


@functools.partial(jax.jit, static_argnames=("policy", "t"))
def _layer_by_layer(k, valid, mod_BT, psi, kept_B, lengths_B, *, policy, t):
  """The policy driven layer by layer as the prefill drives it (jitted, as there: one compilation
  per variant serves every seed and ratio); the kept positions ``[L, B, K, C]``."""
  from jmmkv.cache.policies.base import Context, PromptKV
  from jmmkv.cache.statistics import WindowSums

  n_layers = psi.shape[0]
  ctx = Context(kept_B, lengths_B, {}, n_layers)
  carry = policy.start(ctx)
  got = []
  for l in range(n_layers):
    layer = PromptKV(k, k, valid, mod_BT, lengths_B, {WindowSums.name: psi[l]})
    kept, carry = policy.compress_layer(layer, l, ctx, t, carry)
    got.append(kept.positions[0])  # [B, K, C]
  return jnp.stack(got)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_six_layers_equal_reference(seed):
  """Readings C (and B) over six layers and two padded rows, driven layer by layer with
  statistics from random attention (sharp, diffuse and sink-heavy heads), so that the layer
  budgets move: the kept positions equal the reference's, and C keeps L K n in all."""
  rng = np.random.default_rng(seed)
  n_layers, n_heads, n_kv, t, hd, proxy = 6, 4, 2, 96, 4, 8
  lengths = [96, 61]
  rows = []
  for length in lengths:
    mod = np.ones(length, int)
    for start in rng.choice(length - proxy - 12, size=2, replace=False):
      mod[start : start + 12] = rng.choice([2, 3])
    rows.append((_attention(rng, n_layers, n_heads, length), mod))
  valid = np.arange(t)[None] < np.array(lengths)[:, None]
  psi = np.zeros((n_layers, 1, len(lengths), n_heads, t), np.float32)
  mod_BT = np.zeros((len(lengths), t), np.int32)
  for b, (attn, mod) in enumerate(rows):
    n = lengths[b]
    mod_BT[b, :n] = mod
    for l in range(n_layers):
      psi[l, 0, b, :, :n] = attn[l][:, n - proxy :].sum(1)
  k = rng.normal(size=(1, len(lengths), n_kv, t, hd)).astype(np.float32)
  for ratio in (0.05, 0.2, 0.5):
    kept_B = np.array([jmmkv.Budget(ratio=ratio).kept(n) for n in lengths], np.int32)
    for kw in DEEP_VARIANTS + [dict(reading="B")]:
      policy = jmmkv.policies.get("madakv", proxy_window=proxy, **kw)
      got = np.asarray(
        _layer_by_layer(
          k, valid, mod_BT, psi, kept_B, np.array(lengths, np.int32), policy=policy, t=t
        )
      )
      for b, (attn, mod) in enumerate(rows):
        ref = madakv_ref(attn, modality=mod, ratio=ratio, proxy_window=proxy, n_kv=n_kv, **kw)
        for l in range(n_layers):
          for h in range(n_kv):
            pos = got[l, b, h]
            np.testing.assert_array_equal(pos[pos >= 0], ref["kept"][l][h], f"{kw} {ratio} {l}")
        if kw.get("reading", "C") == "C" or not kw.get("hcc", True):
          total = sum(len(x) for kept_l in ref["kept"] for x in kept_l)
          assert total == n_layers * n_kv * kept_B[b], (kw, ratio, b)
