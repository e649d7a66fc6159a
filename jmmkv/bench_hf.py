"""transformers reference timings for `jmmkv bench --compare-hf`: the same shapes and weights.

`hf_llama_from_jmmkv` copies a jmmkv text model into ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` for
q/k/v bias without o bias) with sdpa attention; `hf_decode_ms` times its full-cache (``DynamicCache``)
greedy decode on the CPU. XLA's CPU client sizes its thread pool by the cores this process may run
on; torch defaults to all cores. `hf_decode_ms` sets torch to that same count (2 on the dev
machine) unless ``threads`` says otherwise.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import numpy as np

from jmmkv.models import convert
from jmmkv.models.configs import DecoderConfig


TORCH = "torch==2.13.0"  # the `test` extra's pin (the CPU wheel)


def require_torch() -> None:
  """A one-line ValueError, before any work, when PyTorch is not installed."""
  try:
    import torch  # noqa: F401
  except ImportError:
    raise ValueError(
      f"--compare-hf needs PyTorch ({TORCH}), which is not installed: pip install -e '.[test]' "
      f"(or pip install {TORCH})"
    ) from None


def default_threads() -> int:
  """The cores this process may run on: what XLA's CPU client sizes its thread pool by."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def hf_config(cfg: DecoderConfig, torch_dtype):
  """(transformers config, model class) of a jmmkv `DecoderConfig`; raises for what HF lacks."""
  from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

  if cfg.mrope_section is not None:
    raise ValueError("M-RoPE (Qwen2-VL) text decoders are not supported by the HF comparison")
  if cfg.o_bias and not cfg.qkv_bias:
    raise ValueError("an o_proj bias without q/k/v biases has no transformers equivalent")
  r = cfg.rope
  rope = dict(rope_type=r.rope_type, rope_theta=r.theta)
  if r.rope_type == "linear":
    rope.update(factor=r.factor)
  elif r.rope_type == "llama3":
    rope.update(
      factor=r.factor,
      low_freq_factor=r.low_freq_factor,
      high_freq_factor=r.high_freq_factor,
      original_max_position_embeddings=r.original_max_position_embeddings,
    )
  common = dict(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    hidden_act="silu",
    rms_norm_eps=cfg.rms_norm_eps,
    rope_parameters=rope,
    tie_word_embeddings=cfg.tie_word_embeddings,
    max_position_embeddings=cfg.max_position_embeddings,
    bos_token_id=cfg.bos_token_id,
    eos_token_id=list(cfg.eos_token_ids) or None,
    pad_token_id=cfg.pad_token_id,
    dtype=torch_dtype,
  )
  if cfg.qkv_bias and not cfg.o_bias:  # Qwen2: q/k/v biases only
    hf, cls = Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
  else:  # Llama, with attention_bias = q/k/v and o biases
    hf = LlamaConfig(**common, head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias, mlp_bias=False)
    cls = LlamaForCausalLM
  head_dim = getattr(hf, "head_dim", None) or cfg.hidden_size // cfg.num_heads
  if head_dim != cfg.head_dim:
    raise ValueError(
      f"{cls.__name__} fixes head_dim = hidden_size / num_heads = {head_dim}, got {cfg.head_dim}"
    )
  return hf, cls


def _invert(transform, shape: tuple[int, ...], ours: np.ndarray) -> np.ndarray:
  """The HF-layout tensor that ``transform`` (a reshape / transpose of convert.py) maps to ``ours``.

  Applies ``transform`` to an index array to learn where every HF element lands, then scatters.
  """
  index = np.asarray(transform(np.arange(np.prod(shape), dtype=np.int64).reshape(shape)))
  if index.size != ours.size or index.shape != ours.shape:
    raise ValueError(f"param shape {ours.shape} != transformed HF shape {index.shape}")
  flat = np.empty(index.size, ours.dtype)
  flat[index.reshape(-1)] = ours.reshape(-1)
  return flat.reshape(shape)


def hf_llama_from_jmmkv(model):
  """A transformers causal LM (eval, sdpa) holding ``model``'s text weights in its dtype.

  ``model``: a text-only `jmmkv.Model` (e.g. `jmmkv.random_model`), or a multimodal one whose
  text decoder is copied. Float32 stays float32, bfloat16 stays bfloat16 (bit-exact copies).
  """
  import torch

  cfg = model.text_config
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[model.dtype_name]
  hf_cfg, cls = hf_config(cfg, torch_dtype)
  params = model.params["text"]["params"]
  state = {}
  for key, (where, shape, transform) in convert.decoder_key_table(cfg).items():
    node = params
    for name in where:
      node = node[name]
    ours = np.asarray(node, np.float32)  # exact for bf16 too
    state[key] = torch.from_numpy(_invert(transform, shape, ours)).to(torch_dtype)
  hf = cls._from_config(hf_cfg, attn_implementation="sdpa", dtype=torch_dtype)
  missing, unexpected = hf.load_state_dict(state, strict=False)
  if cfg.tie_word_embeddings:
    missing = [k for k in missing if k != "lm_head.weight"]
  if missing or unexpected:
    raise ValueError(f"weight copy mismatch: missing {missing}, unexpected {unexpected}")
  if cfg.tie_word_embeddings and hf.lm_head.weight is not hf.model.embed_tokens.weight:
    raise ValueError("transformers did not tie lm_head to embed_tokens")
  return hf.eval()


@contextlib.contextmanager
def torch_threads(n: int):
  """``torch.set_num_threads(n)`` for the duration of the block."""
  import torch

  saved = torch.get_num_threads()
  torch.set_num_threads(n)
  try:
    yield
  finally:
    torch.set_num_threads(saved)


def hf_decode_ms(
  hf_model, ids: np.ndarray, new_tokens: int, repeats: int, threads: int | None = None
) -> dict:
  """Full-cache greedy decode timing of ``hf_model`` on one prompt ``ids`` ``[T]``.

  Each run prefills (untimed for decode; only the last position's logits are computed) into a
  fresh ``DynamicCache``, then times ``new_tokens`` single-token forwards + argmax. Run 0 is a
  warm-up; with ``repeats`` R > 0 runs 1..R are counted. Returns median ``decode_ms_per_token``
  and ``prefill_ms`` over the counted runs, ``threads`` and the greedy ``tokens`` of the last run
  (the prefill's argmax, then one per decode step: ``new_tokens + 1``).
  """
  import torch
  from transformers import DynamicCache

  if new_tokens < 1 or repeats < 1:
    raise ValueError(f"new_tokens and repeats must be >= 1, got {new_tokens}, {repeats}")
  ids = np.asarray(ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must be a 1-d integer array, got {ids.dtype} {ids.shape}")
  threads = default_threads() if threads is None else int(threads)
  prompt = torch.from_numpy(ids.astype(np.int64))[None]
  decode, prefill, tokens = [], [], []
  with torch_threads(threads), torch.inference_mode():
    for _ in range(repeats + 1):
      cache = DynamicCache(config=hf_model.config)
      t0 = time.perf_counter()
      out = hf_model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
      tok = out.logits[:, -1].argmax(-1, keepdim=True)
      t1 = time.perf_counter()
      tokens = [int(tok)]
      for _ in range(new_tokens):
        out = hf_model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(tok))
      t2 = time.perf_counter()
      prefill.append((t1 - t0) * 1e3)
      decode.append((t2 - t1) * 1e3 / new_tokens)
  return dict(
    decode_ms_per_token=statistics.median(decode[1:]),
    prefill_ms=statistics.median(prefill[1:]),
    threads=threads,
    new_tokens=new_tokens,
    repeats=repeats,
    prompt_tokens=int(ids.shape[0]),
    tokens=tokens,
  )
