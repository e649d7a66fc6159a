"""`jmmkv.bench_hf`: the transformers copy of a bench preset computes jmmkv's logits and tokens."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import jmmkv
from jmmkv import bench, bench_hf
from jmmkv.inputs import Batch
from jmmkv.models.configs import tiny_decoder
from jmmkv.typing import TEXT

TINY = tiny_decoder(**bench.PRESETS["tiny"])


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_jmmkv(seed):
  model = jmmkv.random_model(TINY, seed=seed)
  hf = bench_hf.hf_llama_from_jmmkv(model)
  assert type(hf).__name__ == "LlamaForCausalLM"
  assert hf.config._attn_implementation == "sdpa"
  ids = np.random.default_rng(seed).integers(0, TINY.vocab_size, (2, 24))
  ours = model.logits(input_ids=ids, attention_mask=np.ones_like(ids))
  with torch.inference_mode():
    theirs = hf(input_ids=torch.from_numpy(ids)).logits.float().numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_decode_ms_figures_and_tokens():
  model = jmmkv.random_model(TINY, seed=0)
  ids = np.random.default_rng(0).integers(3, TINY.vocab_size, 37).astype(np.int32)
  out = bench_hf.hf_decode_ms(bench_hf.hf_llama_from_jmmkv(model), ids, new_tokens=3, repeats=1)
  for key in ("decode_ms_per_token", "prefill_ms"):
    assert math.isfinite(out[key]) and out[key] > 0, (key, out[key])
  assert out["threads"] == bench_hf.default_threads() >= 1
  batch = Batch((ids,), (np.full(37, TEXT, np.int32),), (np.full(37, -1, np.int32),))
  ref = jmmkv.generate(model, batch, max_new_tokens=4, eos_token_id=[]).tokens[0]
  assert out["tokens"] == ref


def test_unsupported_configs_raise():
  with pytest.raises(ValueError, match="o_proj bias"):
    bench_hf.hf_config(dataclasses.replace(TINY, o_bias=True), torch.float32)
  with pytest.raises(ValueError, match="M-RoPE"):
    bench_hf.hf_config(dataclasses.replace(TINY, mrope_section=(2, 3, 3)), torch.float32)
