"""Every policy compresses a conversation's next turn over the whole cache (`jmmkv.turns`): after
a first turn kept whole, each (layer, row, KV head) keeps what the NumPy reference keeps of the
whole conversation, scored by the new turn's queries only (the earlier queries are gone: column
sums and entropies over the new turn's rows of the attention; observation windows inside it)."""

import dataclasses

import numpy as np
import pytest

import jmmkv
from policy_harness import assert_same_kept, mm_setup, text_setup
from references.adakv_ref import adakv
from references.h2o_ref import h2o
from references.lookm_ref import lookm
from references.madakv_ref import madakv_ref
from references.meda_ref import meda
from references.pyramidkv_ref import pyramidkv
from references.snapkv_ref import snapkv
from references.streaming_ref import streaming

pytestmark = pytest.mark.usefixtures("dense_store")

# (name, reference, settings, whether the reference reads only the new turn's query rows)
CASES = [
  ("streaming", streaming, dict(), False),
  ("h2o", h2o, dict(), True),
  ("snapkv", snapkv, dict(window=8), False),
  ("pyramidkv", pyramidkv, dict(window=8), False),
  ("adakv", adakv, dict(window=8), False),
  ("lookm", lookm, dict(), True),
  ("meda", meda, dict(variant="code"), True),
  ("meda", meda, dict(), True),  # the paper entropy: the new turn's text -> the cache's images
  ("madakv", madakv_ref, dict(proxy_window=8), False),
]
IDS = [f"{c[0]}-{c[2].get('variant', '')}" for c in CASES]


@pytest.fixture(scope="module", params=[(0, dict(ratio=0.3)), (1, dict(tokens=12))], ids=str)
def text(request, tmp_path_factory):
  """Rows of 70 and 50 tokens; turn 1 is each row's first 30 and 20 (a seed, a budget)."""
  seed, budget = request.param
  return text_setup(tmp_path_factory.mktemp("text"), seed, [70, 50]), (30, 20), budget


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def images(request, tmp_path_factory):
  """Rows with 2 images and 1; turn 1 ends after each row's last image, turn 2 is text."""
  setup = mm_setup(tmp_path_factory.mktemp(request.param), 0, request.param)
  cuts = tuple(int(np.flatnonzero(m >= 2)[-1]) + 2 for m in setup.batch.modality)
  return setup, cuts  # (+2: Qwen's vision_end token stays in turn 1)


def _turns(setup, cuts):
  media = {k: v for k, v in dataclasses.asdict(setup.batch.media).items() if v is not None}
  ids = [np.asarray(r) for r in setup.batch.input_ids]
  first = setup.model.prepare(input_ids=[r[:c] for r, c in zip(ids, cuts)], **media)
  second = setup.model.prepare(input_ids=[r[c:] for r, c in zip(ids, cuts)])
  return first, second


def _check(setup, cuts, name, ref_fn, kw, new_rows, budget):
  first, second = _turns(setup, cuts)
  past = jmmkv.compress(setup.model, first)
  policy = jmmkv.policies.get(name, **kw)
  cache = jmmkv.compress(setup.model, second, policy, jmmkv.Budget(**budget), cache=past)
  k, v = np.asarray(cache.k), np.asarray(cache.v)
  for b, row in enumerate(setup.rows):
    attn = [a[:, cuts[b] :, :] for a in row["attn"]] if new_rows else row["attn"]
    extra = {}
    if name == "meda":
      extra = dict(queries=row["queries"], scaling=row["scaling"], first_query=cuts[b])
    ref = ref_fn(attn, row["keys"], row["values"], row["modality"], **budget, **kw, **extra)
    assert_same_kept(cache, b, ref["kept"], f"{name} {kw} {budget} row {b}")
    for l, kept_l in enumerate(ref["kept"]):
      for h, kept in enumerate(kept_l):
        np.testing.assert_allclose(
          k[l, b, h, : len(kept)], ref["k"][l][h, : len(kept)], atol=1e-5, rtol=1e-5
        )
        np.testing.assert_allclose(
          v[l, b, h, : len(kept)], ref["v"][l][h, : len(kept)], atol=1e-5, rtol=1e-5
        )
  np.testing.assert_array_equal(np.asarray(cache.lengths), [len(r) for r in setup.batch.input_ids])


@pytest.mark.parametrize("name, ref_fn, kw, new_rows", CASES, ids=IDS)
def test_next_turn_keeps_what_the_reference_keeps(text, name, ref_fn, kw, new_rows):
  setup, cuts, budget = text
  _check(setup, cuts, name, ref_fn, kw, new_rows, budget)


@pytest.mark.parametrize("name, ref_fn, kw, new_rows", CASES, ids=IDS)
def test_next_turn_after_images(images, name, ref_fn, kw, new_rows):
  _check(*images, name, ref_fn, kw, new_rows, dict(ratio=0.25))
