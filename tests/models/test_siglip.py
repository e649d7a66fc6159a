"""SigLIP vision tower vs transformers' SiglipVisionModel (tiny random configs, saved and read
back through the key table): every hidden state and the post-normed last one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import SiglipVisionConfig, SiglipVisionModel

from jmmkv.models import convert, siglip

VISION = {  # tiny HF vision_config kwargs
  "base": dict(image_size=32, patch_size=8),  # 4x4 patches, gelu_pytorch_tanh
  "odd": dict(image_size=30, patch_size=7, hidden_act="gelu", num_hidden_layers=3),  # 4x4
}


@torch.no_grad()
def _randomize_(tower: torch.nn.Module, seed: int) -> None:
  """Norms 1 + N(0, 0.1^2) with N(0, 0.2^2) shifts, biases N(0, 0.2^2), positions N(0, 0.5^2),
  weights N(0, 1/fan_in) (the patch conv included)."""
  g = torch.Generator().manual_seed(seed)
  for name, p in tower.named_parameters():
    noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
    if "norm" in name:
      p.copy_(1.0 + 0.1 * noise if name.endswith(".weight") else 0.2 * noise)
    elif name.endswith(".bias"):
      p.copy_(0.2 * noise)
    elif "position_embedding" in name:
      p.copy_(0.5 * noise)
    else:
      p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


@pytest.mark.parametrize("name", sorted(VISION))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hidden_states_equal_transformers(tmp_path, name, seed):
  kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
  hf_cfg = SiglipVisionConfig(**{**kw, **VISION[name]}, vision_use_head=False)
  torch.manual_seed(seed)
  hf = SiglipVisionModel(hf_cfg).eval()
  _randomize_(hf, seed)
  hf.save_pretrained(tmp_path)
  cfg = siglip.SiglipVisionConfig.from_hf(hf_cfg.to_dict())
  suffix = "embeddings.patch_embedding.weight"
  with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    (prefix,) = [k[: -len(suffix)] for k in f.keys() if k.endswith(suffix)]
  params = convert.read_tensors(tmp_path, siglip.key_table(cfg, prefix), jnp.float32)
  pix = np.random.default_rng(seed).normal(size=(2, 3, cfg.image_size, cfg.image_size))
  with torch.no_grad():
    out = hf(torch.from_numpy(pix.astype(np.float32)), output_hidden_states=True)
  tower = siglip.SiglipVisionTower(cfg)
  hidden = jax.jit(tower.apply)({"params": params}, jnp.asarray(pix, jnp.float32))
  assert len(hidden) == len(out.hidden_states) == cfg.num_layers + 1
  for got, want in zip(hidden, out.hidden_states):
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-5)
  last = tower.apply({"params": params}, jnp.asarray(pix, jnp.float32), method="last_hidden")
  np.testing.assert_allclose(np.asarray(last), out.last_hidden_state.numpy(), rtol=1e-5, atol=1e-5)


def test_config_errors():
  with pytest.raises(ValueError, match="vision_use_head=true"):
    siglip.SiglipVisionConfig.from_hf({"model_type": "siglip_vision_model"})
  with pytest.raises(ValueError, match="is not a SigLIP vision tower"):
    siglip.SiglipVisionConfig.from_hf({"model_type": "clip_vision_model"})
  with pytest.raises(ValueError, match="must be square"):
    siglip.SiglipVisionConfig.from_hf({"vision_use_head": False, "image_size": [32, 30]})
