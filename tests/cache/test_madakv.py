"""MadaKV vs its independent reference (tests/references/madakv_ref.py) on tiny HF models."""

import numpy as np
import pytest

import jmmkv
from policy_harness import assert_same_kept, mm_setup, text_setup
from references.madakv_ref import madakv_ref

VARIANTS = [
  dict(),
  dict(reading="A"),
  dict(mpa=False),
  dict(hcc=False),
  dict(hcc_units="layer_total"),
  dict(pool_cap=False),
  dict(theta=0.5, proxy_window=4),
]


@pytest.fixture(
  scope="module", params=[("llava", 0), ("llava", 1), ("llava", 2), ("qwen2_vl", 0)], ids=str
)
def llava(request, tmp_path_factory):
  family, seed = request.param
  return mm_setup(tmp_path_factory.mktemp(family), seed, family)


@pytest.mark.parametrize("kw", VARIANTS, ids=str)
@pytest.mark.parametrize("ratio", [0.2, 0.5])
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
