"""Logits parity of jmmkv's Llama / Qwen2 decoders with transformers (PyTorch, fp32, eager).

References come from the HF models only; jmmkv is compared against them at the valid
(attention_mask == 1) positions. Tiny random configs: see tests/hf_models.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hf_models import (
  CONFIG_NAMES,
  hf_logits,
  make_config,
  pad_batch,
  positions_from_mask,
  random_ids,
)

SEEDS = (0, 1, 2)
LENGTHS = (13, 7)
FP32_ATOL = 1e-4


def _inputs(seed: int) -> list[list[int]]:
  rng = np.random.default_rng(1000 + seed)
  return [random_ids(rng, n) for n in LENGTHS]


def _max_diff_valid(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  m = mask.astype(bool)
  return float(np.max(np.abs(a[m] - b[m])))


def _jmmkv_logits(model, ids, mask=None, position_ids=None) -> np.ndarray:
  out = model.logits(input_ids=ids, attention_mask=mask, position_ids=position_ids)
  out = np.asarray(out)
  assert out.shape == (*ids.shape, 1000), out.shape
  assert out.dtype == np.float32, out.dtype
  return out


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_logits_match_hf_padded_batch(name, seed, side, tiny_model, jmmkv_model):
  tm = tiny_model(name, seed)
  model = jmmkv_model(name, seed)
  seqs = _inputs(seed)
  ids, mask = pad_batch(seqs, side)
  pos = positions_from_mask(mask)
  ref = hf_logits(tm.torch_model, ids, mask, pos)

  # default positions (cumsum(mask) - 1, clipped) ...
  got = _jmmkv_logits(model, ids, mask)
  assert np.all(np.isfinite(got[mask.astype(bool)]))
  diff = _max_diff_valid(got, ref, mask)
  assert diff <= FP32_ATOL, f"{name} seed={seed} {side} padding: max |jmmkv - HF| = {diff:.3g}"

  # ... and the same positions passed explicitly
  got_pos = _jmmkv_logits(model, ids, mask, pos)
  diff = _max_diff_valid(got_pos, ref, mask)
  assert diff <= FP32_ATOL, (
    f"{name} seed={seed} {side} padding, explicit position_ids: max diff {diff:.3g}"
  )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_logits_batch1_unpadded_equals_row_in_padded_batch(name, seed, tiny_model, jmmkv_model):
  """A row run alone (no mask, no padding) gives the logits it gets inside a padded batch,
  and both match HF run on that row alone."""
  tm = tiny_model(name, seed)
  model = jmmkv_model(name, seed)
  seqs = _inputs(seed)
  for row in range(len(seqs)):
    single = np.asarray([seqs[row]], dtype=np.int64)
    ref_single = hf_logits(tm.torch_model, single)
    got_single = _jmmkv_logits(model, single)  # attention_mask=None, position_ids=None
    diff = float(np.max(np.abs(got_single - ref_single)))
    assert diff <= FP32_ATOL, f"{name} seed={seed} row {row} alone: max |jmmkv - HF| = {diff:.3g}"
    for side in ("right", "left"):
      ids, mask = pad_batch(seqs, side)
      got = _jmmkv_logits(model, ids, mask)
      valid = got[row][mask[row].astype(bool)]
      diff = float(np.max(np.abs(valid - got_single[0])))
      assert diff <= FP32_ATOL, (
        f"{name} seed={seed} row {row}: batch ({side} padded) vs alone: max diff {diff:.3g}"
      )


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_logits_explicit_gapped_positions(name, tiny_model, jmmkv_model):
  """Explicit position_ids with gaps (as after eviction) are honoured, RoPE scaling included.

  A constant offset would be invisible (RoPE is relative), so the gaps vary."""
  seed = 0
  tm = tiny_model(name, seed)
  model = jmmkv_model(name, seed)
  rng = np.random.default_rng(77)
  seqs = _inputs(seed)
  ids, mask = pad_batch(seqs, "right")
  steps = rng.integers(1, 9, size=ids.shape)
  pos = (
    np.cumsum(steps, axis=1) - steps[:, :1] + rng.integers(0, 5, size=(ids.shape[0], 1))
  ) * mask
  ref = hf_logits(tm.torch_model, ids, mask, pos)
  # the gaps matter: contiguous positions give clearly different logits
  assert (
    _max_diff_valid(ref, hf_logits(tm.torch_model, ids, mask, positions_from_mask(mask)), mask)
    > 1e-2
  )
  got = _jmmkv_logits(model, ids, mask, pos)
  diff = _max_diff_valid(got, ref, mask)
  assert diff <= FP32_ATOL, f"{name}: gapped position_ids: max |jmmkv - HF| = {diff:.3g}"


# ---------------------------------------------------------------- bfloat16

BF16_SEEDS = (0, 1)
BF16_MIN_ARGMAX_AGREEMENT = 0.9


def _bf16_tol(ref_valid: np.ndarray) -> float:
  # Measured (HF in bf16 vs fp32, these configs): max abs err 0.06-0.23 at logit scales 4-11,
  # i.e. about 2.5x under this bound. Wrong RoPE theta/scaling or a missing bias moves logits
  # by 1-4 (test_bf16_tolerance_rejects_wrong_models checks that against this very bound).
  return 0.05 * (1.0 + float(np.max(np.abs(ref_valid))))


@pytest.mark.parametrize("seed", BF16_SEEDS)
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_bf16_logits_close_to_fp32(name, seed, tiny_model, jmmkv_model):
  import jax

  tm = tiny_model(name, seed)
  model_bf16 = jmmkv_model(name, seed, "bfloat16")
  leaves = jax.tree.leaves(model_bf16.params)
  assert leaves, "model.params has no leaves"
  float_dtypes = {str(x.dtype) for x in leaves if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)}
  assert float_dtypes == {"bfloat16"}, f"bf16 model has float params of dtypes {float_dtypes}"

  seqs = _inputs(seed)
  ids, mask = pad_batch(seqs, "right")
  m = mask.astype(bool)
  got = _jmmkv_logits(model_bf16, ids, mask)[m]  # float32 output even for bf16 params
  assert np.all(np.isfinite(got))
  # reference: HF fp32 (independent), and jmmkv fp32 (consistency)
  fp32 = _jmmkv_logits(jmmkv_model(name, seed), ids, mask)[m]
  for label, ref in (
    ("HF fp32", hf_logits(tm.torch_model, ids, mask, positions_from_mask(mask))[m]),
    ("jmmkv fp32", fp32),
  ):
    tol = _bf16_tol(ref)
    diff = float(np.max(np.abs(got - ref)))
    assert diff <= tol, f"{name} seed={seed}: bf16 vs {label}: max diff {diff:.3g} > {tol:.3g}"
    agree = float(np.mean(np.argmax(got, -1) == np.argmax(ref, -1)))
    assert agree >= BF16_MIN_ARGMAX_AGREEMENT, (
      f"{name} seed={seed}: bf16 vs {label} argmax agreement {agree:.2f}"
    )
  # not trivially equal to fp32: the computation really ran in bf16
  assert float(np.max(np.abs(got - fp32))) > 1e-4


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_bf16_tolerance_rejects_wrong_models(name, tiny_model):
  """Self-check of the bf16 bound, HF only: plausible implementation mistakes (ignoring
  RoPE scaling, a wrong rope_theta, dropping the q/k/v biases) break it."""
  tm = tiny_model(name, 0)
  seqs = _inputs(0)
  ids, mask = pad_batch(seqs, "right")
  pos = positions_from_mask(mask)
  m = mask.astype(bool)
  ref = hf_logits(tm.torch_model, ids, mask, pos)[m]
  tol = _bf16_tol(ref)

  cfg, cls = make_config(name)
  theta = cfg.rope_parameters["rope_theta"]
  wrong = {"rope_theta": dict(rope_type="default", rope_theta=1e4 if theta != 1e4 else 1e6)}
  if cfg.rope_parameters["rope_type"] != "default":
    wrong["no_rope_scaling"] = dict(rope_type="default", rope_theta=theta)
  for label, rope in wrong.items():
    bad_cfg = copy.deepcopy(cfg)
    bad_cfg.rope_parameters = rope
    bad = cls._from_config(bad_cfg, attn_implementation="eager").eval()
    bad.load_state_dict(tm.torch_model.state_dict())
    diff = float(np.max(np.abs(hf_logits(bad, ids, mask, pos)[m] - ref)))
    assert diff > 2 * tol, (
      f"{name}: {label} changes logits by only {diff:.3g} (bf16 bound {tol:.3g})"
    )
  if name == "qwen2_bias":
    bad = copy.deepcopy(tm.torch_model)
    with torch.no_grad():
      for n, p in bad.named_parameters():
        if n.endswith(".bias"):
          p.zero_()
    diff = float(np.max(np.abs(hf_logits(bad, ids, mask, pos)[m] - ref)))
    assert diff > 2 * tol, (
      f"{name}: dropping biases changes logits by only {diff:.3g} (bound {tol:.3g})"
    )
