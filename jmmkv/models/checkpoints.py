"""`load_checkpoint`: an HF directory -> (config, params) for every supported architecture.

Params are grouped by part: ``{"text": {"params": ...}}`` plus, for multimodal models,
``"vision"``, ``"projector"`` (LLaVA) and ``"image_newline"`` (LLaVA-NeXT). Key tables use the
hub's checkpoint spelling (what ``save_pretrained`` writes); the other spelling that transformers
v5 uses internally (``model.language_model.`` ...) is renamed to it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from jmmkv.models import clip, convert, llava, qwen2_vl, qwen_vision
from jmmkv.models.configs import DecoderConfig, decoder_config_from_hf

# First match wins. The CLIP tower appears as `vision_tower.vision_model.` (hub checkpoints) or
# `vision_tower.` (transformers 5 saving a model built from a config).
_LLAVA_RENAMES = (
  ("model.language_model.", "language_model.model."),
  ("lm_head.", "language_model.lm_head."),
  ("vision_tower.vision_model.", "vision_tower.vision_model."),
  ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
  ("model.vision_tower.", "vision_tower.vision_model."),
  ("vision_tower.", "vision_tower.vision_model."),
  ("model.multi_modal_projector.", "multi_modal_projector."),
  ("model.image_newline", "image_newline"),
)
_QWEN_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def _text_table(cfg: DecoderConfig, prefix: str, head_key: str):
  return convert.nest(convert.decoder_key_table(cfg, prefix, head_key), ("text", "params"))


def _llava_tables(cfg: llava.LlavaConfig):
  table = _text_table(cfg.text, "language_model.model.", "language_model.lm_head.weight")
  table.update(
    convert.nest(clip.key_table(cfg.vision, "vision_tower.vision_model."), ("vision", "params"))
  )
  d, e = cfg.text.hidden_size, cfg.vision.hidden_size * len(cfg.feature_layers)
  for name, (d_in, d_out) in (("linear_1", (e, d)), ("linear_2", (d, d))):
    key = f"multi_modal_projector.{name}."
    table[key + "weight"] = (("projector", "params", name, "w"), (d_out, d_in), lambda x: x.T)
    if cfg.projector_bias:
      table[key + "bias"] = (("projector", "params", name, "b"), (d_out,), lambda x: x)
  if cfg.is_next:
    table["image_newline"] = (("image_newline",), (d,), lambda x: x)
  return table


def _qwen_tables(cfg: qwen2_vl.QwenVLConfig):
  table = _text_table(cfg.text, "model.", "lm_head.weight")
  table.update(convert.nest(qwen_vision.key_table(cfg.vision, "visual."), ("vision", "params")))
  return table


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
  """Config and params of an HF model directory (any of `convert.SUPPORTED_ARCHITECTURES`)."""
  cfg, table, rename, tied = _config_and_table(model_dir)
  # A tied checkpoint may still carry the head; like transformers, the embedding wins.
  ignore = lambda k: tied and k.endswith("lm_head.weight")
  return cfg, convert.read_tensors(model_dir, table, dtype, ignore=ignore, rename=rename)


def _config_and_table(model_dir: str | Path):
  hf_cfg, arch = convert.read_config(model_dir)
  eos = convert.generation_eos_ids(model_dir)
  if arch in convert.DECODER_ARCHITECTURES:
    cfg = decoder_config_from_hf(hf_cfg, arch)
    cfg = dataclasses.replace(cfg, eos_token_ids=eos or cfg.eos_token_ids)
    table, text_cfg, rename = _text_table(cfg, "model.", "lm_head.weight"), cfg, lambda k: k
  else:
    if arch.startswith("Llava"):
      cfg, tables, rules = llava.config_from_hf(hf_cfg, arch), _llava_tables, _LLAVA_RENAMES
    else:
      cfg, tables, rules = qwen2_vl.config_from_hf(hf_cfg, arch), _qwen_tables, _QWEN_RENAMES
    # Multimodal checkpoints tie (or not) at the top level of config.json.
    text_cfg = dataclasses.replace(
      cfg.text,
      tie_word_embeddings=bool(hf_cfg.get("tie_word_embeddings", cfg.text.tie_word_embeddings)),
      eos_token_ids=eos or cfg.text.eos_token_ids,
    )
    cfg = dataclasses.replace(cfg, text=text_cfg)
    table, rename = tables(cfg), convert.prefix_renamer(rules)
  return cfg, table, rename, text_cfg.tie_word_embeddings
