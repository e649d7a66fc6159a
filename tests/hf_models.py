"""Tiny random HF (PyTorch) models and plain helpers shared by the tests.

Everything here is independent of jmmkv: it builds the reference models and inputs.
Fixtures that wrap these live in tests/conftest.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

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
)

CONFIG_NAMES = ("llama_gqa", "llama_tied_llama3", "qwen2_bias", "llama_linear")
GENERATE_CONFIG_NAMES = ("llama_gqa", "llama_tied_llama3", "qwen2_bias")


def make_config(name: str):
  """The HF config and model class of one named tiny configuration."""
  if name == "llama_gqa":
    cfg = LlamaConfig(
      **TEXT,
      tie_word_embeddings=False,
      rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )
    return cfg, LlamaForCausalLM
  if name == "llama_tied_llama3":
    # original_max_position_embeddings is small so that llama3 scaling changes the
    # frequencies of this head_dim (16) at all.
    cfg = LlamaConfig(
      **TEXT,
      tie_word_embeddings=True,
      rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
      ),
    )
    return cfg, LlamaForCausalLM
  if name == "qwen2_bias":
    cfg = Qwen2Config(**TEXT, rope_parameters=dict(rope_type="default", rope_theta=1e6))
    return cfg, Qwen2ForCausalLM
  if name == "llama_linear":
    cfg = LlamaConfig(
      **TEXT,
      tie_word_embeddings=False,
      rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    )
    return cfg, LlamaForCausalLM
  raise KeyError(f"unknown tiny config {name!r}; known: {CONFIG_NAMES}")


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
  """Re-initialise every parameter with random, non-degenerate values (in place).

  HF initialises biases to 0 and norm weights to 1, which would hide a missing bias or
  norm weight; its 0.02 init also makes attention almost uniform, which would hide RoPE
  mistakes. Here: linear weights N(0, 1/fan_in) (attention scores of order 1), biases
  N(0, 0.2^2), norm weights 1 + N(0, 0.1^2), embeddings N(0, 0.3^2).
  With tied embeddings a token's own embedding dominates its logits and greedy decoding
  just repeats the last token; there the embeddings are N(0, 0.1^2) and the final norm
  weight is scaled by 3 (logits of the same order, varied greedy continuations).
  """
  tied = bool(getattr(model.config, "tie_word_embeddings", False))
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():  # tied weights appear once
    noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
    if "norm" in name:
      scale = 3.0 if (tied and name == "model.norm.weight") else 1.0
      p.copy_(scale * (1.0 + 0.1 * noise))
    elif name.endswith(".bias"):
      p.copy_(0.2 * noise)
    elif "embed_tokens" in name:
      p.copy_((0.1 if tied else 0.3) * noise)
    else:  # [out, in] linear weights, lm_head included
      p.copy_(noise / np.sqrt(p.shape[1]))


def build_model(name: str, seed: int) -> torch.nn.Module:
  """A tiny fp32 eager HF causal LM with random parameters."""
  cfg, cls = make_config(name)
  torch.manual_seed(seed)
  model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
  randomize_(model, seed)
  if getattr(model.config, "tie_word_embeddings", False):
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  return model.eval()


def random_ids(rng: np.random.Generator, n: int, vocab: int = TEXT["vocab_size"]) -> list[int]:
  """n random token ids in [3, vocab) (never pad 0 / bos 1 / eos 2), not all the same."""
  while True:
    ids = rng.integers(3, vocab, size=n)
    if n < 2 or len(set(ids.tolist())) > 1:
      return [int(i) for i in ids]


def pad_batch(seqs: list[list[int]], side: str, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids [B, T] int64, attention_mask [B, T] int64), padded on `side` ("left"/"right")."""
  assert side in ("left", "right")
  T = max(len(s) for s in seqs)
  ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
  mask = np.zeros((len(seqs), T), dtype=np.int64)
  for b, s in enumerate(seqs):
    if side == "right":
      ids[b, : len(s)] = s
      mask[b, : len(s)] = 1
    else:
      ids[b, T - len(s) :] = s
      mask[b, T - len(s) :] = 1
  return ids, mask


def answer_window_mask(n: int, t: int, window: int | None) -> torch.Tensor:
  """``[1, 1, t, t]`` float mask (0 allowed, float32 min masked) for a sequence of an
  ``n``-token prompt and its answer: causal, with ``window`` set the query at answer token i sees
  the whole prompt and answer tokens ``max(0, i - window + 1) .. i`` only (jmmkv.generate's
  ``decode_window`` rule)."""
  allowed = np.tril(np.ones((t, t), bool))
  for i in range(t - n if window else 0):
    allowed[n + i, n : n + max(0, i - window + 1)] = False
  mask = torch.zeros((1, 1, t, t))
  mask[0, 0][torch.from_numpy(~allowed)] = torch.finfo(torch.float32).min
  return mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
  """clip(cumsum(mask) - 1, 0): the positions HF generate uses for padded batches."""
  return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)


@torch.no_grad()
def hf_logits(
  model, ids: np.ndarray, mask: np.ndarray | None = None, position_ids: np.ndarray | None = None
) -> np.ndarray:
  """Reference logits [B, T, V] float32 from the HF model."""
  kw = {}
  if mask is not None:
    kw["attention_mask"] = torch.from_numpy(np.asarray(mask, dtype=np.int64))
  if position_ids is not None:
    kw["position_ids"] = torch.from_numpy(np.asarray(position_ids, dtype=np.int64))
  out = model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64)), use_cache=False, **kw)
  return out.logits.float().numpy()


@torch.no_grad()
def hf_greedy_generate(
  model, seqs: list[list[int]], max_new_tokens: int, eos_token_id=None, pad_id: int = 0
):
  """HF greedy generation on a left-padded batch.

  Returns (tokens, margins): tokens[b] is the list of new ids of row b with the trailing
  pad ids after its EOS stripped (EOS kept); margins[b][i] is the gap between the best and
  second-best raw logit at step i (to detect near ties that make a comparison fragile).
  With eos_token_id=None no EOS is used at all (the model's generation_config EOS is
  overridden), so every row gets exactly max_new_tokens tokens.
  """
  from transformers import GenerationConfig

  ids, mask = pad_batch(seqs, "left", pad_id)
  gc = GenerationConfig(
    do_sample=False,
    max_new_tokens=max_new_tokens,
    pad_token_id=pad_id,
    eos_token_id=eos_token_id,
    bos_token_id=1,
    return_dict_in_generate=True,
    output_logits=True,
  )
  # generate() fills every None of `gc` from model.generation_config (whose eos_token_id is
  # the config's 2), so "no EOS" has to be set there too, for the duration of the call.
  saved = model.generation_config.eos_token_id
  model.generation_config.eos_token_id = eos_token_id
  try:
    out = model.generate(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), generation_config=gc
    )
  finally:
    model.generation_config.eos_token_id = saved
  new = out.sequences[:, ids.shape[1] :].numpy()
  logits = torch.stack(out.logits, dim=1).float().numpy()  # [B, M, V], raw (unprocessed)
  eos = (
    []
    if eos_token_id is None
    else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
  )
  tokens, margins = [], []
  for b in range(len(seqs)):
    row = []
    for t in new[b].tolist():
      row.append(int(t))
      if t in eos:
        break
    # greedy really is argmax of the raw logits (no processor changed anything)
    np.testing.assert_array_equal(np.argmax(logits[b, : len(row)], -1), row)
    top2 = np.sort(logits[b, : len(row)], axis=-1)[:, -2:]
    if not eos:
      assert len(row) == max_new_tokens, (b, len(row))
    tokens.append(row)
    margins.append((top2[:, 1] - top2[:, 0]).tolist())
  return tokens, margins
