"""`load_checkpoint`: an HF directory -> (config, params) for every supported architecture.

Params are grouped by part: ``{"text": {"params": ...}}`` plus, for multimodal models,
``"vision"``, ``"projector"`` (LLaVA) and ``"image_newline"`` (LLaVA-NeXT). Key tables use the
hub's checkpoint spelling (what ``save_pretrained`` writes); the other spelling that transformers
v5 uses internally (``model.language_model.`` ...) is renamed to it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from jmmkv.models import convert, families


def load_config_and_shapes(model_dir: str | Path):
  """The jmmkv config of an HF model directory (its config.json and generation_config.json) and
  the params it implies: ``{"text/params/norm/scale": shape}`` for every array `load_checkpoint`
  would read."""
  cfg, table = _config_and_table(model_dir)[:2]
  shapes = {
    "/".join(where): jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, jnp.float32)).shape
    for where, shape, fn in table.values()
  }
  return cfg, shapes


def load_checkpoint(model_dir: str | Path, dtype=jnp.float32):
  """Config and params of an HF model directory (any of `families.ARCHITECTURES`)."""
  cfg, table, rename, tied = _config_and_table(model_dir)
  # A tied checkpoint may still carry the head; like transformers, the embedding wins.
  ignore = lambda k: tied and k.endswith("lm_head.weight")
  return cfg, convert.read_tensors(model_dir, table, dtype, ignore=ignore, rename=rename)


def _config_and_table(model_dir: str | Path):
  hf_cfg, arch = convert.read_config(model_dir)
  family = families.for_architecture(arch, str(Path(model_dir) / "config.json"))
  cfg = family.config_from_hf(hf_cfg, arch, convert.generation_eos_ids(model_dir))
  rename = convert.prefix_renamer(family.renames)
  tied = family.text_config(cfg).tie_word_embeddings
  return cfg, family.key_table(cfg), rename, tied
