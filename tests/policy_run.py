"""Shared by the model-family tests: one policy inside `jmmkv.generate` (batch of several rows),
and the check that every kept cache slot carries its token's modality, from the ids."""

from __future__ import annotations

import numpy as np

import jmmkv
from jmmkv.typing import TEXT
from mm_models import modality_of

# The policies each model family runs through `generate`. Every policy runs on LLaVA, Qwen2-VL and
# text models (tests/test_policies_generate.py, the reference tests); per family, the ones whose
# work depends on the family's prompt: Full (every modality kept), SnapKV (a query statistic),
# LOOK-M (column sums, text prior, merging), MEDA (survey pass, cross-modal entropy, merging) and
# MadaKV (per-head modality preference, the page pool). StreamingLLM, H2O, PyramidKV and AdaKV
# read no modality and share those paths.
FAMILY_POLICIES = ("full", "snapkv", "lookm", "meda", "madakv")

SMALL = {  # observation windows that fit the tiny prompts
  "snapkv": dict(window=8),
  "pyramidkv": dict(window=8),
  "adakv": dict(window=8),
  "madakv": dict(proxy_window=8),
}


def _generate(model, case, name: str, max_new_tokens: int):
  """Policy ``name`` at a 30% budget (full: no budget) on ``case``, the dense cache returned;
  every row gets ``max_new_tokens``."""
  batch = model.prepare(input_ids=case.ids, attention_mask=case.mask, **case.arrays)
  out = jmmkv.generate(
    model,
    batch,
    jmmkv.policies.get(name, **SMALL.get(name, {})),
    None if name == "full" else jmmkv.Budget(ratio=0.3),
    max_new_tokens=max_new_tokens,
    eos_token_id=[],
    return_cache=True,
    layout="dense",
  )
  assert [len(t) for t in out.tokens] == [max_new_tokens] * len(case.rows)
  return out


def generate_and_check(model, case, name: str, max_new_tokens: int = 4):
  """Runs policy ``name`` at a 30% budget (full: no budget) on ``case`` (a `mm_models.Case`);
  checks the answers' lengths, the kept fraction and each kept slot's modality. Returns the
  dense cache's (positions, modality), ``[L, B, K, t]``."""
  out = _generate(model, case, name, max_new_tokens)
  kept = out.stats["kept_fraction"]
  assert (kept == 1.0) if name == "full" else (0 < kept < 1.0), kept
  pos, mod = np.asarray(out.cache.positions), np.asarray(out.cache.modality)
  for b, row in enumerate(case.rows):
    live = pos[:, b] >= 0
    assert live.any()
    np.testing.assert_array_equal(mod[:, b][live], modality_of(row)[pos[:, b][live]])
  return pos, mod


def generate_and_check_windowed(model, case, name: str, max_new_tokens: int = 4):
  """`generate_and_check` for a decoder with sliding-window layers (Gemma 3): the policy
  compresses the global layers only (their kept slots: the whole prompt with full, fewer
  otherwise, each with its token's modality); each local layer's ring holds the last
  ``sliding_window`` tokens, prompt and fed-back generated ones (text). Returns the dense
  cache's (positions, modality), ``[L, B, K, t]``."""
  cfg = model.text_config
  out = _generate(model, case, name, max_new_tokens)
  pos, mod = np.asarray(out.cache.positions), np.asarray(out.cache.modality)
  kept_LB = out.cache.kept_LBK().sum(-1)[list(cfg.global_layers)]
  lengths = np.array([len(r) for r in case.rows])
  full_LB = np.broadcast_to(lengths * cfg.num_kv_heads, kept_LB.shape)
  if name == "full":
    np.testing.assert_array_equal(kept_LB, full_LB)
  else:
    assert (kept_LB.sum(0) > 0).all() and (kept_LB.sum(0) < full_LB.sum(0)).all(), kept_LB
  fed = max_new_tokens - 1  # generated tokens written back into the cache
  for b, row in enumerate(case.rows):
    seq = np.concatenate([modality_of(row), np.full(fed, TEXT)])
    for layer in range(cfg.num_layers):
      live = pos[layer, b] >= 0
      np.testing.assert_array_equal(mod[layer, b][live], seq[pos[layer, b][live]])
      if layer in cfg.window_layers:
        for head in range(cfg.num_kv_heads):
          got = sorted(pos[layer, b, head][pos[layer, b, head] >= 0])
          n = len(row) + fed
          assert got == list(range(max(0, n - cfg.sliding_window), n)), (layer, b, head)
      else:
        assert pos[layer, b].max() < len(row)
  return pos, mod
