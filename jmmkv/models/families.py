"""The model families jmmkv runs (`jmmkv.models.family`), and how one is chosen: by the type of
the config (`for_config`) or by the HF ``architectures`` name (`for_architecture`). Adding a
family: its module, then one line here."""

from __future__ import annotations

from jmmkv.models import (
  family,
  gemma3,
  gemma3_mm,
  internvl,
  llava,
  llava_onevision,
  mistral,
  qwen2_vl,
  qwen3,
  qwen3_vl,
)

FAMILIES: tuple[family.Family, ...] = (
  family.Family(),  # Llama, Qwen2
  llava.FAMILY,
  qwen2_vl.FAMILY,
  mistral.FAMILY,
  qwen3.FAMILY,
  gemma3.FAMILY,
  llava_onevision.FAMILY,
  internvl.FAMILY,
  qwen3_vl.FAMILY,
  gemma3_mm.FAMILY,
)
ARCHITECTURES: tuple[str, ...] = tuple(a for f in FAMILIES for a in f.architectures)


def for_config(cfg) -> family.Family:
  """The family of a jmmkv config (by its type; families that share a config type, as the text
  decoders do, share what a model does at run time: the first one answers)."""
  for f in FAMILIES:
    if type(cfg) is f.config_type:
      return f
  raise TypeError(f"no model family has a config of type {type(cfg).__name__}")


def for_architecture(architecture: str | None, where: str = "config.json") -> family.Family:
  """The family of an HF ``architectures[0]`` name; a one-line error naming the supported ones."""
  for f in FAMILIES:
    if architecture in f.architectures:
      return f
  raise ValueError(
    f"unsupported architecture {architecture!r} in {where}; supported: {', '.join(ARCHITECTURES)}"
  )
