"""Shared by the model-family tests: one policy inside `jmmkv.generate` (batch of several rows),
and the check that every kept cache slot carries its token's modality, from the ids."""

from __future__ import annotations

import numpy as np

import jmmkv
from mm_models import modality_of

SMALL = {  # observation windows that fit the tiny prompts
  "snapkv": dict(window=8),
  "pyramidkv": dict(window=8),
  "adakv": dict(window=8),
  "madakv": dict(proxy_window=8),
}


def generate_and_check(model, case, name: str, max_new_tokens: int = 4):
  """Runs policy ``name`` at a 30% budget (full: no budget) on ``case`` (a `mm_models.Case`);
  checks the answers' lengths, the kept fraction and each kept slot's modality. Returns the
  dense cache's (positions, modality), ``[L, B, K, t]``."""
  batch = model.prepare(input_ids=case.ids, attention_mask=case.mask, **case.arrays)
  budget = None if name == "full" else jmmkv.Budget(ratio=0.3)
  out = jmmkv.generate(
    model,
    batch,
    jmmkv.policies.get(name, **SMALL.get(name, {})),
    budget,
    max_new_tokens=max_new_tokens,
    eos_token_id=[],
    return_cache=True,
    layout="dense",
  )
  assert [len(t) for t in out.tokens] == [max_new_tokens] * len(case.rows)
  kept = out.stats["kept_fraction"]
  assert (kept == 1.0) if name == "full" else (0 < kept < 1.0), kept
  pos, mod = np.asarray(out.cache.positions), np.asarray(out.cache.modality)
  for b, row in enumerate(case.rows):
    live = pos[:, b] >= 0
    assert live.any()
    np.testing.assert_array_equal(mod[:, b][live], modality_of(row)[pos[:, b][live]])
  return pos, mod
