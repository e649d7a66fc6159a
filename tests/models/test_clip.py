"""CLIP vision tower vs the transformers LLaVA vision tower (tiny random configs, saved and reloaded)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
  CLIPVisionConfig,
  LlamaConfig,
  LlavaConfig,
  LlavaForConditionalGeneration,
)

from hf_models import TEXT
import jmmkv
from jmmkv.models import clip, convert

VISION = {  # tiny HF vision_config kwargs
  "base": dict(image_size=32, patch_size=8),  # ENVIRONMENT.md: 4x4 patches, quick_gelu
  "odd": dict(image_size=30, patch_size=6, hidden_act="gelu", num_attention_heads=2),  # 5x5
  "remainder": dict(image_size=30, patch_size=7, num_hidden_layers=3, layer_norm_eps=1e-6),  # 4x4
}
SEEDS = (0, 1, 2)
PREFIX = "vision_tower."  # where transformers 5 saves a config-built LLaVA's tower


def _vision_config(name: str) -> CLIPVisionConfig:
  kw = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=32,
  )
  return CLIPVisionConfig(**{**kw, **VISION[name]})


@torch.no_grad()
def _randomize_tower_(tower: torch.nn.Module, seed: int) -> None:
  """Random non-degenerate tower params: norms 1 + N(0, 0.1^2) / N(0, 0.2^2) shifts, biases
  N(0, 0.2^2), class/position embeddings N(0, 0.5^2), weights N(0, 1/fan_in) (conv included)."""
  g = torch.Generator().manual_seed(seed)
  for name, p in tower.named_parameters():
    noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
    if "norm" in name:  # layer_norm1/2, pre_layrnorm, post_layernorm
      p.copy_(1.0 + 0.1 * noise if name.endswith(".weight") else 0.2 * noise)
    elif name.endswith(".bias"):
      p.copy_(0.2 * noise)
    elif "class_embedding" in name or "position_embedding" in name:
      p.copy_(0.5 * noise)
    else:  # linear [out, in] and patch conv [D, C, p, p]
      p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


@dataclasses.dataclass(frozen=True)
class Tiny:
  model: LlavaForConditionalGeneration
  path: object
  cfg: clip.ClipVisionConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Factory (config name, seed) -> Tiny: a random LLaVA saved once per module."""
  cache = {}

  def get(name: str, seed: int) -> Tiny:
    if (name, seed) not in cache:
      vis = _vision_config(name)
      cfg = LlavaConfig(
        vision_config=vis,
        text_config=LlamaConfig(**TEXT),
        image_token_index=999,
        image_seq_length=(vis.image_size // vis.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
      )
      torch.manual_seed(seed)
      m = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager")
      _randomize_tower_(m.model.vision_tower, seed)
      path = tmp_path_factory.mktemp(f"llava_{name}_s{seed}")
      m.eval().save_pretrained(path)
      vision_cfg = json.loads((path / "config.json").read_text())["vision_config"]
      cache[name, seed] = Tiny(m, path, clip.ClipVisionConfig.from_hf(vision_cfg))
    return cache[name, seed]

  return get


def _pixels(cfg: clip.ClipVisionConfig, n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(100 + seed)
  return rng.standard_normal((n, cfg.num_channels, cfg.image_size, cfg.image_size), np.float32)


@torch.no_grad()
def _hf_hidden(model, pix: np.ndarray) -> list[np.ndarray]:
  out = model.model.vision_tower(torch.from_numpy(pix), output_hidden_states=True)
  return [h.float().numpy() for h in out.hidden_states]


def _load(t: Tiny, dtype=jnp.float32) -> dict:
  table = clip.key_table(t.cfg, PREFIX)
  return convert.load_params(t.path, table, dtype, ignore=lambda k: not k.startswith(PREFIX))


_FNS = {}


def _ours(cfg, params, pix, num_layers=None, dtype=jnp.float32) -> list[np.ndarray]:
  key = (cfg, num_layers, jnp.dtype(dtype).name)
  if key not in _FNS:
    tower = clip.ClipVisionTower(cfg, dtype)
    _FNS[key] = jax.jit(lambda p, x: tower.apply(p, x, num_layers=num_layers))
  return [np.asarray(h.astype(jnp.float32)) for h in _FNS[key](params, jnp.asarray(pix))]


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("n_images", [1, 3])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(VISION))
def test_hidden_states_match_transformers(tiny, name, seed, n_images):
  t = tiny(name, seed)
  pix = _pixels(t.cfg, n_images, seed)
  want = _hf_hidden(t.model, pix)
  got = _ours(t.cfg, _load(t), pix)
  assert len(got) == len(want) == t.cfg.num_layers + 1
  for i, (g, w) in enumerate(zip(got, want)):
    assert g.shape == w.shape == (n_images, 1 + t.cfg.num_patches, t.cfg.hidden_size)
    assert np.std(w) > 0.1  # the random init makes every state non-trivial
    assert _max_diff(g, w) <= 1e-4, (i, _max_diff(g, w))


def test_pooled_matches_transformers(tiny):
  t = tiny("base", 1)
  pix = _pixels(t.cfg, 3, 1)
  with torch.no_grad():
    want = t.model.model.vision_tower(torch.from_numpy(pix)).pooler_output.numpy()
  pooled = jax.jit(lambda p, x: clip.ClipVisionTower(t.cfg).apply(p, x, method="pooled"))
  got = pooled(_load(t), jnp.asarray(pix))
  assert _max_diff(got, want) <= 1e-4


@pytest.mark.parametrize("seed", SEEDS)
def test_bfloat16_close_to_transformers(tiny, seed):
  """bf16 params and activations: our error against HF fp32 is of the size of HF bf16's own."""
  t = tiny("base", seed)
  pix = _pixels(t.cfg, 3, seed)
  want32 = _hf_hidden(t.model, pix)
  hf16 = LlavaForConditionalGeneration.from_pretrained(
    t.path, dtype=torch.bfloat16, attn_implementation="eager"
  ).eval()
  want16 = _hf_hidden(hf16, torch.from_numpy(pix).to(torch.bfloat16).float().numpy())
  params = _load(t, jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  got = _ours(t.cfg, params, pix, dtype=jnp.bfloat16)
  for g, w32, w16 in zip(got, want32, want16):
    scale = float(np.max(np.abs(w32)))
    assert _max_diff(g, w32) <= 0.02 * scale
    assert _max_diff(g, w16) <= 0.02 * scale
    assert _max_diff(g, w32) <= 2.0 * _max_diff(w16, w32) + 0.01 * scale


def test_num_layers_gives_first_hidden_states(tiny):
  t = tiny("remainder", 2)  # 3 layers
  pix = _pixels(t.cfg, 3, 2)
  params = _load(t)
  want = _hf_hidden(t.model, pix)
  full = _ours(t.cfg, params, pix)
  for k in range(t.cfg.num_layers + 1):
    got = _ours(t.cfg, params, pix, num_layers=k)
    assert len(got) == k + 1
    for g, f, w in zip(got, full, want):
      assert _max_diff(g, f) <= 1e-6
      assert _max_diff(g, w) <= 1e-4
  tower = clip.ClipVisionTower(t.cfg)
  for bad in (-1, t.cfg.num_layers + 1):
    with pytest.raises(ValueError, match="num_layers"):
      tower.apply(params, jnp.asarray(pix), num_layers=bad)


def test_layers_for_vision_feature_layer():
  cfg = clip.ClipVisionConfig(num_layers=24)
  assert clip.layers_for(cfg, -2) == 23  # LLaVA-1.5: hidden_states[-2] of 25
  assert clip.layers_for(cfg, -1) == 24
  assert clip.layers_for(cfg, 0) == 0
  assert clip.layers_for(cfg, [-2, -5, 3]) == 23
  for bad in (25, -26, []):
    with pytest.raises(ValueError, match="out of range"):
      clip.layers_for(cfg, bad)


# ---------------------------------------------------------------- config and checkpoint layout


def test_from_hf_defaults_are_transformers_defaults():
  hf = CLIPVisionConfig()
  cfg = clip.ClipVisionConfig.from_hf({})
  assert cfg == clip.ClipVisionConfig()
  assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads) == (
    hf.hidden_size,
    hf.intermediate_size,
    hf.num_hidden_layers,
    hf.num_attention_heads,
  )
  assert (cfg.patch_size, cfg.image_size, cfg.num_channels) == (
    hf.patch_size,
    hf.image_size,
    hf.num_channels,
  )
  assert (cfg.layer_norm_eps, cfg.hidden_act) == (hf.layer_norm_eps, hf.hidden_act)
  # llava-1.5 style: 336 px, patch 14 -> 576 patches; a square [s, s] image size is accepted
  big = clip.ClipVisionConfig.from_hf(
    dict(image_size=[336, 336], patch_size=14, hidden_size=1024, num_attention_heads=16)
  )
  assert (big.num_patches, big.head_dim) == (576, 64)


def test_from_hf_rejects_what_it_cannot_run():
  with pytest.raises(ValueError, match="not a CLIP"):
    clip.ClipVisionConfig.from_hf({"model_type": "siglip_vision_model"})
  with pytest.raises(ValueError, match="square"):
    clip.ClipVisionConfig.from_hf({"image_size": [336, 224]})
  with pytest.raises(ValueError, match="hidden_act"):
    clip.ClipVisionConfig.from_hf({"hidden_act": "relu"})
  with pytest.raises(ValueError, match="multiple"):
    clip.ClipVisionConfig.from_hf({"hidden_size": 30, "num_attention_heads": 4})


@pytest.mark.parametrize("name", list(VISION))
def test_key_table_covers_checkpoint_and_matches_init_layout(tiny, name):
  t = tiny(name, 0)
  with safe_open(t.path / "model.safetensors", "np") as fh:
    keys = set(fh.keys())
  assert clip.find_prefix(keys) == PREFIX
  tower_keys = {k for k in keys if k.startswith(PREFIX)}
  assert "vision_tower.embeddings.position_ids" not in keys  # a non-persistent buffer in v5
  assert set(clip.key_table(t.cfg, PREFIX)) == tower_keys
  loaded = _load(t)
  init = jax.eval_shape(lambda: clip.init_params(t.cfg, jax.random.key(0)))
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(loaded) == shapes(init)


def test_hub_layout_with_position_ids_buffer(tiny, tmp_path):
  """llava-hf hub checkpoints keep CLIP's ``vision_model.`` level (and old saves the
  ``position_ids`` buffer): transformers loads that layout, and so does key_table."""
  t = tiny("odd", 1)
  path = tmp_path / "hub"
  shutil.copytree(t.path, path)
  tensors = load_file(path / "model.safetensors")
  hub = {k.replace(PREFIX, "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
  prefix = clip.find_prefix(hub)
  assert prefix == "vision_tower.vision_model."
  hub[prefix + "embeddings.position_ids"] = torch.arange(1 + t.cfg.num_patches)[None]
  save_file(hub, path / "model.safetensors", metadata={"format": "pt"})

  pix = _pixels(t.cfg, 3, 1)
  want = _hf_hidden(t.model, pix)
  reloaded = LlavaForConditionalGeneration.from_pretrained(
    path, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  for w, r in zip(want, _hf_hidden(reloaded, pix)):
    assert _max_diff(w, r) == 0.0  # transformers maps the hub names onto the same tower

  table = clip.key_table(t.cfg, prefix)
  # The non-persistent position_ids buffer is skipped by the loader itself (like inv_freq).
  params = convert.load_params(path, table, ignore=lambda k: not k.startswith(prefix))
  for g, w in zip(_ours(t.cfg, params, pix), want):
    assert _max_diff(g, w) <= 1e-4
  # ... and the whole hub-layout LLaVA loads through jmmkv.load with the same features.
  model = jmmkv.load(path)
  got = model.image_features(pix)
  with torch.no_grad():
    ref = t.model.model.get_image_features(pixel_values=torch.from_numpy(pix)).pooler_output
  for g, w in zip(got, ref):
    assert _max_diff(g, w.numpy()) <= 1e-4


def test_wrong_image_size_raises(tiny):
  t = tiny("base", 0)
  tower = clip.ClipVisionTower(t.cfg)
  with pytest.raises(ValueError, match="expects"):
    tower.apply(_load(t), jnp.zeros((1, 3, 24, 24)))
