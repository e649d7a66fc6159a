"""Dense NumPy reference for the prefill statistics, from transformers' own tensors.

`capture(model, **inputs)` runs an HF forward with a recording eager attention and returns, per
decoder layer, the attention probabilities [B, N, T, T] and the post-RoPE queries / keys
([B, N, T, H] / [B, K, T, H]). The statistics are then written out densely from ALGORITHMS.md.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

_CAPTURED: list = []


def _recording(module, query, key, value, attention_mask, **kw):
  out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kw)
  _CAPTURED.append(
    (type(module).__name__, weights.detach(), query.detach(), key.detach(), module.scaling)
  )
  return out, weights


AttentionInterface.register("jmmkv_recording", _recording)
AttentionMaskInterface.register("jmmkv_recording", eager_mask)  # the additive causal+padding mask


@torch.no_grad()
def capture(model, text_attention_class: str, **inputs):
  """[(probs [B,N,T,T], q [B,N,T,H], k [B,K,T,H], scaling)] for each text decoder layer."""
  _CAPTURED.clear()
  text = getattr(getattr(model, "model", None), "language_model", model)  # multimodal: text part
  text.set_attn_implementation("jmmkv_recording")
  try:
    model(**inputs, use_cache=False)
  finally:
    text.set_attn_implementation("eager")
  layers = [c for c in _CAPTURED if c[0] == text_attention_class]
  return [
    (w.double().numpy(), q.double().numpy(), k.double().numpy(), s) for _, w, q, k, s in layers
  ]


def _entropy(p, axis=-1):
  safe = np.where(p > 0, p, 1.0)
  return -np.sum(np.where(p > 0, p * np.log(safe), 0.0), axis=axis)


def colsum(probs, valid):
  """[B, N, S]: sum over valid query rows."""
  return np.einsum("bnqs,bq->bns", probs, valid.astype(np.float64))


def window(probs, valid, w: int):
  """[B, N, S]: sum over the last w valid query rows of each row."""
  rows = np.zeros_like(valid, dtype=np.float64)
  for b in range(valid.shape[0]):
    idx = np.flatnonzero(valid[b])[-w:]
    rows[b, idx] = 1.0
  return np.einsum("bnqs,bq->bns", probs, rows)


def row_entropy(probs, valid):
  """[B, N]: mean over valid queries of the causal row entropy."""
  ent = _entropy(probs)  # [B, N, T]
  return np.einsum("bnq,bq->bn", ent, valid.astype(np.float64)) / valid.sum(1)[:, None]


def cross_entropy(q, k, scaling, valid, is_text, is_vis):
  """[B, 2]: MEDA eqs. 4-6 with head-averaged attention, no causal mask (ALGORITHMS.md 1.5)."""
  n, kh = q.shape[1], k.shape[1]
  k_rep = np.repeat(k, n // kh, axis=1)
  s = np.einsum("bnqh,bnsh->bnqs", q, k_rep) * scaling
  out = np.zeros((q.shape[0], 2))
  for b in range(q.shape[0]):
    for j, (rows, keys) in enumerate(((is_text[b], is_vis[b]), (is_vis[b], is_text[b]))):
      rows, keys = rows & valid[b], keys & valid[b]
      if not rows.any() or not keys.any():
        continue
      sub = s[b][:, rows][:, :, keys]  # [N, nr, nk]
      p = np.exp(sub - sub.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, j] = _entropy(p.mean(0)).mean()
  return out
