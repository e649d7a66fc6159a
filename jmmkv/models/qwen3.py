"""Qwen3 (``Qwen3ForCausalLM``, dense): a Llama-style decoder without q/k/v biases and with an
RMSNorm over each head's query and key before RoPE (`DecoderConfig.qk_norm`). A sliding window
(``use_sliding_window``) is refused, as for Qwen2."""

from __future__ import annotations

import dataclasses

from jmmkv.models.family import Family


class Qwen3Family(Family):
  name = "Qwen3"
  architectures = ("Qwen3ForCausalLM",)

  def config_from_hf(self, hf_cfg: dict, architecture: str, eos_ids: tuple[int, ...]):
    hf_cfg = {"head_dim": 128, **hf_cfg}  # Qwen3Config's default, not hidden / heads
    cfg = super().config_from_hf(hf_cfg, architecture, eos_ids)
    bias = bool(hf_cfg.get("attention_bias", False))
    return dataclasses.replace(cfg, qk_norm=True, qkv_bias=bias, o_bias=bias)


FAMILY = Qwen3Family()
