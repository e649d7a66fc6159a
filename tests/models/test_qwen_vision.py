"""Qwen2-VL / Qwen2.5-VL vision towers against transformers' ``model.model.visual``."""

from __future__ import annotations

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (
  Qwen2_5_VLConfig,
  Qwen2_5_VLForConditionalGeneration,
  Qwen2VLConfig,
  Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.vision_utils import (
  get_vision_cu_seqlens,
  get_vision_position_ids,
  get_vision_window_index,
)

from jmmkv.models import convert, qwen_vision_layout as vl
from jmmkv.models.qwen_vision import QwenVisionConfig, QwenVisionTower, key_table

VARIANTS = ("qwen2_vl", "qwen2_5_vl")
SEEDS = (0, 1, 2)
# Qwen2.5-VL windows are 56 px = 2x2 merge blocks = 4x4 patches: these grids span several
# windows, partial ones included.
GRIDS = {
  "one_image": ((1, 6, 8),),
  "three_images": ((1, 4, 8), (1, 6, 4), (1, 2, 2)),
  "video": ((2, 6, 4),),
  "image_and_video": ((1, 4, 4), (3, 4, 6)),
}
TEXT = dict(
  vocab_size=1000,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=512,
  bos_token_id=1,
  eos_token_id=2,
  rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
)
TOKENS = dict(
  image_token_id=999, video_token_id=998, vision_start_token_id=997, vision_end_token_id=996
)
VISION = {
  "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2),
  "qwen2_5_vl": dict(
    depth=3,
    hidden_size=32,
    out_hidden_size=64,
    intermediate_size=64,
    num_heads=4,
    window_size=56,
    fullatt_block_indexes=[1],
  ),
}
SHARED = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)


def hf_model(variant: str, seed: int) -> torch.nn.Module:
  vision = dict(VISION[variant], **SHARED)
  if variant == "qwen2_vl":
    cfg, cls = (
      Qwen2VLConfig(text_config=TEXT, vision_config=vision, **TOKENS),
      Qwen2VLForConditionalGeneration,
    )
  else:
    cfg = Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
    cls = Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(seed)
  model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
  randomize_visual_(model.model.visual, seed)
  return model.eval()


@torch.no_grad()
def randomize_visual_(visual: torch.nn.Module, seed: int) -> None:
  """Weights N(0, 1/fan_in) (attention far from uniform), biases N(0, 0.2^2), norm weights
  1 + N(0, 0.1^2): HF's zero biases / unit norms would hide a missing or misplaced one."""
  g = torch.Generator().manual_seed(seed)
  for name, p in visual.named_parameters():
    noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
    if name.endswith(".bias"):
      p.copy_(0.2 * noise)
    elif p.ndim == 1:  # LayerNorm / RMSNorm weight (norm1, norm2, merger.ln_q)
      p.copy_(1.0 + 0.1 * noise)
    else:  # linear [out, in] and the Conv3d patch embedding [out, C, tp, p, p]
      p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
  """Factory (variant, seed) -> (HF visual module, our config, our fp32 params)."""
  cache = {}

  def get(variant: str, seed: int):
    if (variant, seed) not in cache:
      model = hf_model(variant, seed)
      path = tmp_path_factory.mktemp(f"{variant}_s{seed}")
      model.save_pretrained(path)
      vision = json.loads((path / "config.json").read_text())["vision_config"]
      cfg = QwenVisionConfig.from_hf(vision, variant)
      params = convert.load_params(
        path, key_table(cfg), ignore=lambda k: not k.startswith("visual.")
      )
      cache[variant, seed] = (model.model.visual, cfg, params)
    return cache[variant, seed]

  return get


@functools.lru_cache(maxsize=None)
def jitted(cfg: QwenVisionConfig, dtype=jnp.float32):
  return jax.jit(QwenVisionTower(cfg, dtype).apply, static_argnums=2)


def pixels(cfg: QwenVisionConfig, grid, seed: int) -> np.ndarray:
  rng = np.random.default_rng(100 + seed)
  return rng.standard_normal((vl.num_patches(grid), cfg.patch_pixels)).astype(np.float32)


@torch.no_grad()
def hf_features(visual, pix: np.ndarray, grid, dtype=torch.float32) -> np.ndarray:
  out = visual(torch.from_numpy(pix).to(dtype), grid_thw=torch.tensor(grid))
  return out.pooler_output.float().numpy()


@pytest.mark.parametrize("grid_name", list(GRIDS))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_tower_matches_transformers(tower, variant, seed, grid_name):
  visual, cfg, params = tower(variant, seed)
  grid = GRIDS[grid_name]
  pix = pixels(cfg, grid, seed)
  want = hf_features(visual, pix, grid)
  got = np.asarray(jitted(cfg)(params, pix, grid))
  assert got.shape == want.shape == (vl.num_patches(grid) // 4, 64)
  assert np.abs(want).max() > 0.5  # not degenerate
  assert float(np.abs(got - want).max()) <= 1e-4


def test_windows_and_segments_matter(tower):
  """The comparisons above would catch a missing window / segment restriction."""
  visual, cfg, params = tower("qwen2_5_vl", 0)
  grid = GRIDS["three_images"]
  pix = pixels(cfg, grid, 0)
  want = hf_features(visual, pix, grid)
  full = QwenVisionConfig(**{**cfg.__dict__, "fullatt_block_indexes": tuple(range(cfg.depth))})
  assert float(np.abs(np.asarray(jitted(full)(params, pix, grid)) - want).max()) > 1e-2
  # One image per call: the same features (segments are independent), up to rounding.
  split = np.cumsum([0] + [t * h * w for t, h, w in grid])
  alone = [
    np.asarray(jitted(cfg)(params, pix[a:b], (g,))) for a, b, g in zip(split[:-1], split[1:], grid)
  ]
  np.testing.assert_allclose(np.concatenate(alone), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16(tower, variant, tmp_path):
  """bf16 params and activations: error vs fp32 transformers of the order of HF's own bf16 run."""
  visual, cfg, _ = tower(variant, 1)
  path = tmp_path / "m"
  visual.save_pretrained(path)  # the bare tower: keys without the "visual." prefix
  params = convert.load_params(path, key_table(cfg, prefix=""), jnp.bfloat16)
  assert params["params"]["blocks_0"]["qkv"]["w"].dtype == jnp.bfloat16
  grid = GRIDS["image_and_video"]
  pix = pixels(cfg, grid, 1)
  want = hf_features(visual, pix, grid)
  got = jitted(cfg, jnp.bfloat16)(params, pix, grid)
  assert got.dtype == jnp.bfloat16
  err = float(np.abs(np.asarray(got, np.float32) - want).max())
  visual_bf16 = copy.deepcopy(visual).to(torch.bfloat16)
  hf_err = float(np.abs(hf_features(visual_bf16, pix, grid, torch.bfloat16) - want).max())
  scale = float(np.abs(want).max())
  assert err <= max(2 * hf_err, 0.02 * scale), (err, hf_err, scale)


@pytest.mark.parametrize(
  "grid",
  [((1, 4, 8),), ((1, 6, 4), (2, 8, 8)), ((3, 10, 6), (1, 2, 2), (1, 8, 4)), ((1, 16, 12),)],
)
def test_layout_matches_transformers(grid):
  g = torch.tensor(grid)
  np.testing.assert_array_equal(vl.rotary_positions(grid, 2), get_vision_position_ids(g, 2).numpy())
  np.testing.assert_array_equal(vl.frame_cu_seqlens(grid), get_vision_cu_seqlens(g).numpy())
  for window in (56, 112):
    index, cu = vl.window_index(grid, 2, window, 14)
    want_index, want_cu = get_vision_window_index(g, 2, window, 14)
    np.testing.assert_array_equal(index, want_index.numpy())
    np.testing.assert_array_equal(cu, want_cu.numpy())


@pytest.mark.parametrize(
  "variant,hf_cls", [("qwen2_vl", Qwen2VLVisionConfig), ("qwen2_5_vl", Qwen2_5_VLVisionConfig)]
)
def test_config_defaults_match_transformers(variant, hf_cls):
  assert QwenVisionConfig.from_hf({}, variant) == QwenVisionConfig.from_hf(
    hf_cls().to_dict(), variant
  )


def test_bad_inputs(tower):
  _, cfg, params = tower("qwen2_vl", 0)
  with pytest.raises(ValueError, match="pixel_values has shape"):
    jitted(cfg)(params, np.ones((10, cfg.patch_pixels), np.float32), ((1, 4, 4),))
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    jitted(cfg)(params, np.ones((15, cfg.patch_pixels), np.float32), ((1, 3, 5),))
