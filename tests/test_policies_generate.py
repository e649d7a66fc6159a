"""Every policy inside generate() on a tiny LLaVA, batch 2 with images. (The Qwen family's media
path with M-RoPE runs every policy in tests/models/test_qwen3_vl.py, as do the other families'
test files.)"""

import numpy as np
import pytest

import jmmkv
from mm_models import make_case

SMALL = {
  "snapkv": dict(window=8),
  "pyramidkv": dict(window=8),
  "adakv": dict(window=8),
  "madakv": dict(proxy_window=8),
}


@pytest.fixture(scope="module")
def setup(mm_model):
  model = mm_model("llava", 0)[1]
  rng = np.random.default_rng(0)
  rows = [[12, "image", 5, "image", 9], [4, "image", 20]]
  case = make_case(model, "llava", rng, rows, images=3, side="left")
  return model, model.prepare(input_ids=case.ids, attention_mask=case.mask, **case.arrays)


@pytest.mark.parametrize("name", jmmkv.policies.NAMES)
def test_generate_with_every_policy(setup, name):
  model, batch = setup
  policy = jmmkv.policies.get(name, **SMALL.get(name, {}))
  budget = None if name == "full" else jmmkv.Budget(ratio=0.3)
  out = jmmkv.generate(
    model,
    batch,
    policy,
    budget,
    max_new_tokens=6,
    eos_token_id=[],
    return_cache=True,
    output_scores=True,
    layout="dense",  # tests/cache/test_paged.py checks the paged layout holds the same slots
  )
  assert [len(t) for t in out.tokens] == [6, 6]
  assert np.isfinite(out.scores).all()
  kept = out.stats["kept_fraction"]
  assert (kept == 1.0) if name == "full" else (0 < kept < 1.0)
  pos, mod = np.asarray(out.cache.positions), np.asarray(out.cache.modality)
  for b, ids in enumerate(batch.input_ids):
    live = pos[:, b] >= 0
    want = batch.modality[b][np.where(live, pos[:, b], 0)]
    np.testing.assert_array_equal(mod[:, b][live], want[live])  # modality travels with each slot
  assert out.stats["kv_bytes_used"] <= out.stats["kv_bytes_allocated"]
