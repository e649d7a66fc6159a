"""Gemma 3, text only (``Gemma3ForCausalLM``): a Llama-style decoder with Gemma's pieces, all
`DecoderConfig` switches: (1 + w) RMSNorms, norms on the attention and MLP outputs (sandwich),
q/k norms, a gelu-tanh MLP, embeddings scaled by sqrt(D), scores scaled by
``query_pre_attn_scalar``, optional final logit soft-capping, and RoPE of its own on the local
(sliding-window) layers.

The local layers attend to their last ``sliding_window`` tokens, in the prompt forward and in
decoding; their decode cache is a ring of at most that many slots that no policy touches (the
policies compress the global layers: `jmmkv.cache.kv_cache`, `jmmkv.cache.stream`).
Attention-score soft-capping (Gemma 2's) is refused.
"""

from __future__ import annotations

import dataclasses

from jmmkv.models.configs import decoder_config_from_hf, rope_config
from jmmkv.models.family import Family

GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # Gemma3TextConfig's defaults


def rope_parameters(cfg: dict) -> tuple[dict, dict]:
  """(global, local) HF rope parameters: transformers 5's per-layer-type ``rope_parameters``, or
  the hub's ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq``."""
  params = cfg.get("rope_parameters") or {}
  if "full_attention" in params or "sliding_attention" in params:
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
  else:
    full = {"rope_type": "default", **(cfg.get("rope_scaling") or {})}
    local = {"rope_type": "default"}
  full.setdefault("rope_theta", cfg.get("rope_theta", GLOBAL_THETA))
  local.setdefault("rope_theta", cfg.get("rope_local_base_freq", LOCAL_THETA))
  return full, local


def layer_types(cfg: dict) -> list[str]:
  n = int(cfg["num_hidden_layers"])
  types = cfg.get("layer_types")
  if types is None:  # the hub's older spelling: every `sliding_window_pattern`-th layer is global
    pattern = int(cfg.get("sliding_window_pattern", 6))
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
  if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
    raise ValueError(f"layer_types must name {n} layers sliding_attention or full_attention")
  return list(types)


def config_from_hf(cfg: dict, architecture: str):
  """A `DecoderConfig` from a ``Gemma3ForCausalLM`` (``gemma3_text``) config dict."""
  for key in ("attn_logit_softcapping",):
    if cfg.get(key) is not None:
      raise ValueError(f"{key}={cfg[key]} is not supported (attention-score soft-capping)")
  if cfg.get("use_bidirectional_attention"):
    raise ValueError("use_bidirectional_attention=true (an encoder-style Gemma) is not supported")
  types = layer_types(cfg)
  window = cfg.get("sliding_window", 4096)
  if window is not None and (int(window) != window or window < 1):
    raise ValueError(f"sliding_window must be a positive integer, got {window!r}")
  full, local = rope_parameters(cfg)
  act = cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh"))
  plain = {k: v for k, v in cfg.items() if k not in ("hidden_act", "rope_scaling")}
  dec = decoder_config_from_hf(
    {**plain, "rope_parameters": full, "head_dim": cfg.get("head_dim", 256)}, architecture
  )
  bias = bool(cfg.get("attention_bias", False))
  return dataclasses.replace(
    dec,
    qkv_bias=bias,
    o_bias=bias,
    qk_norm=True,
    norm_plus_one=True,
    sandwich_norms=True,
    hidden_act=act,
    embed_scale=True,
    query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
    final_logit_softcap=cfg.get("final_logit_softcapping"),
    tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    local_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
    local_rope=rope_config(local),
    sliding_window=int(window) if window is not None and "sliding_attention" in types else None,
  )


class Gemma3TextFamily(Family):
  name = "Gemma 3 (text)"
  architectures = ("Gemma3ForCausalLM",)

  def config_from_hf(self, hf_cfg: dict, architecture: str, eos_ids: tuple[int, ...]):
    cfg = config_from_hf(hf_cfg, architecture)
    return dataclasses.replace(cfg, eos_token_ids=eos_ids or cfg.eos_token_ids)


FAMILY = Gemma3TextFamily()
