"""Every policy compresses a conversation's next turn over the whole cache (`jmmkv.turns`): after
a first turn kept whole, each (layer, row, KV head) keeps what the NumPy reference keeps of the
whole conversation, scored by the new turn's queries only (the earlier queries are gone: column
sums and entropies over the new turn's rows of the attention; observation windows inside it)."""

import numpy as np
import pytest

import jmmkv
from policy_harness import assert_same_kept, text_setup
from references.adakv_ref import adakv
from references.h2o_ref import h2o
from references.lookm_ref import lookm
from references.madakv_ref import madakv_ref
from references.meda_ref import meda
from references.pyramidkv_ref import pyramidkv
from references.snapkv_ref import snapkv
from references.streaming_ref import streaming

pytestmark = pytest.mark.usefixtures("dense_store")

CUTS = (30, 20)  # turn 1 of each row; turn 2: the rest (40 and 30 tokens)
# (name, reference, settings, whether the reference reads only the new turn's query rows)
CASES = [
  ("streaming", streaming, dict(), False),
  ("h2o", h2o, dict(), True),
  ("snapkv", snapkv, dict(window=8), False),
  ("pyramidkv", pyramidkv, dict(window=8), False),
  ("adakv", adakv, dict(window=8), False),
  ("lookm", lookm, dict(), True),
  ("meda", meda, dict(variant="code"), True),
  ("madakv", madakv_ref, dict(proxy_window=8), False),
]


@pytest.fixture(scope="module", params=[0, 1])
def text(request, tmp_path_factory):
  return text_setup(tmp_path_factory.mktemp("text"), request.param, [70, 50])


def _turns(setup):
  ids = [np.asarray(r) for r in setup.batch.input_ids]
  first = setup.model.prepare(input_ids=[r[:c] for r, c in zip(ids, CUTS)])
  second = setup.model.prepare(input_ids=[r[c:] for r, c in zip(ids, CUTS)])
  return first, second


@pytest.mark.parametrize("name, ref_fn, kw, new_rows", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("budget", [dict(ratio=0.3), dict(tokens=12)], ids=str)
def test_next_turn_keeps_what_the_reference_keeps(text, name, ref_fn, kw, new_rows, budget):
  first, second = _turns(text)
  past = jmmkv.compress(text.model, first)
  policy = jmmkv.policies.get(name, **kw)
  cache = jmmkv.compress(text.model, second, policy, jmmkv.Budget(**budget), cache=past)
  k, v = np.asarray(cache.k), np.asarray(cache.v)
  for b, row in enumerate(text.rows):
    attn = [a[:, CUTS[b] :, :] for a in row["attn"]] if new_rows else row["attn"]
    extra = dict(queries=row["queries"], scaling=row["scaling"]) if name == "meda" else {}
    ref = ref_fn(attn, row["keys"], row["values"], row["modality"], **budget, **kw, **extra)
    assert_same_kept(cache, b, ref["kept"], f"{name} {budget} row {b}")
    for l, kept_l in enumerate(ref["kept"]):
      for h, kept in enumerate(kept_l):
        np.testing.assert_allclose(
          k[l, b, h, : len(kept)], ref["k"][l][h, : len(kept)], atol=1e-5, rtol=1e-5
        )
        np.testing.assert_allclose(
          v[l, b, h, : len(kept)], ref["v"][l][h, : len(kept)], atol=1e-5, rtol=1e-5
        )
  np.testing.assert_array_equal(np.asarray(cache.lengths), [70, 50])
