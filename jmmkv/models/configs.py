"""Frozen model configs and their conversion from HF ``config.json`` dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding: base ``theta`` and an optional HF ``rope_type`` scaling."""

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(
        f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
      )
    if self.theta <= 0 or self.factor <= 0:
      raise ValueError(f"rope theta and factor must be positive, got {self.theta}, {self.factor}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A Llama-family text decoder (Llama, Vicuna, Qwen2, Qwen3, Mistral)."""

  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  rms_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2; Llama with attention_bias
  o_bias: bool = False  # Llama with attention_bias
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  architecture: str = "LlamaForCausalLM"
  mrope_section: tuple[int, ...] | None = None  # Qwen2-VL M-RoPE frequency groups (t, h, w)
  qk_norm: bool = False  # Qwen3: RMSNorm over each head's query and key, before RoPE
  mrope_interleaved: bool = False  # Qwen3-VL: M-RoPE axes interleaved over the frequencies
  # Gemma 3 (the defaults are Llama's):
  norm_plus_one: bool = False  # RMSNorm scales by (1 + w), in float32 before the cast
  sandwich_norms: bool = False  # attention and MLP outputs normed too, before their residual
  hidden_act: str = "silu"  # the gated MLP's activation ("silu" or "gelu_pytorch_tanh")
  embed_scale: bool = False  # embeddings times sqrt(D), rounded to the params' dtype
  query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power, not head_dim's
  final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
  local_layers: tuple[int, ...] = ()  # layers whose RoPE is `local_rope` (Gemma's local layers)
  local_rope: RopeConfig | None = None
  sliding_window: int | None = None  # local layers attend to this many tokens (the query's own
  # included); None: to all of them
  bidirectional_images: bool = False  # Gemma 3: in the prompt, each contiguous run of image
  # tokens also attends to its own later tokens

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.hidden_act not in ("silu", "gelu_pytorch_tanh"):
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (silu, gelu_pytorch_tanh)")
    if self.local_layers and self.local_rope is None:
      raise ValueError("local_layers need a local_rope")
    if self.sliding_window is not None and (self.sliding_window < 1 or not self.local_layers):
      raise ValueError(f"sliding_window={self.sliding_window} needs local_layers and must be >= 1")

  @property
  def window_layers(self) -> tuple[int, ...]:
    """The layers that attend within `sliding_window` (their cache is a ring of that size)."""
    return self.local_layers if self.sliding_window is not None else ()

  @property
  def global_layers(self) -> tuple[int, ...]:
    """The layers that attend to the whole context (all but `window_layers`): a policy
    compresses their cache."""
    return tuple(i for i in range(self.num_layers) if i not in self.window_layers)

  def of_global_layers(self, per_layer: Sequence) -> list:
    """The entries of ``per_layer`` (one per layer) at `global_layers`."""
    return [x for i, x in enumerate(per_layer) if i not in self.window_layers]

  @property
  def num_groups(self) -> int:  # G
    return self.num_heads // self.num_kv_heads


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
  # transformers v5 writes `rope_parameters`; v4 wrote `rope_theta` + `rope_scaling`.
  params = dict(cfg.get("rope_parameters") or {})
  if not params:
    params = dict(cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
  return rope_config(params)


def rope_config(params: dict[str, Any]) -> RopeConfig:
  """A `RopeConfig` from one flat HF rope-parameters dict (``rope_type``, ``rope_theta``, ...)."""
  rope_type = params.get("rope_type", params.get("type", "default"))
  fields = {f.name for f in dataclasses.fields(RopeConfig)}
  kw = {k: v for k, v in params.items() if k in fields}
  return RopeConfig(
    **{**kw, "theta": float(params.get("rope_theta", 10000.0)), "rope_type": rope_type}
  )


def as_int_tuple(x) -> tuple[int, ...]:
  if x is None:
    return ()
  return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


def decoder_config_from_hf(cfg: dict[str, Any], architecture: str) -> DecoderConfig:
  """Builds a `DecoderConfig` from an HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` config dict."""
  if cfg.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
  if cfg.get("mlp_bias", False):
    raise ValueError("mlp_bias=True is not supported")
  if cfg.get("use_sliding_window", False):
    raise ValueError("use_sliding_window=True (Qwen2 sliding-window attention) is not supported")
  n_heads = int(cfg["num_attention_heads"])
  is_qwen2 = architecture.startswith("Qwen2")
  attention_bias = bool(cfg.get("attention_bias", False))
  return DecoderConfig(
    vocab_size=int(cfg["vocab_size"]),
    hidden_size=int(cfg["hidden_size"]),
    intermediate_size=int(cfg["intermediate_size"]),
    num_layers=int(cfg["num_hidden_layers"]),
    num_heads=n_heads,
    num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
    head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads),
    rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    rope=_rope_from_hf(cfg),
    tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    qkv_bias=is_qwen2 or attention_bias,
    o_bias=attention_bias and not is_qwen2,
    max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
    bos_token_id=cfg.get("bos_token_id"),
    eos_token_ids=as_int_tuple(cfg.get("eos_token_id")),
    pad_token_id=cfg.get("pad_token_id"),
    architecture=architecture,
    mrope_section=_mrope_section(cfg),
  )


def _mrope_section(cfg: dict[str, Any]) -> tuple[int, ...] | None:
  params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
  section = params.get("mrope_section")
  return tuple(int(x) for x in section) if section else None


def tiny_decoder(**overrides) -> DecoderConfig:
  """A small random-init preset for the demo and smoke tests."""
  base = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=688,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    head_dim=32,
    eos_token_ids=(2,),
    bos_token_id=1,
  )
  return DecoderConfig(**{**base, **overrides})
