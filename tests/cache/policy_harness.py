"""Shared harness for policy-vs-reference tests: one tiny HF model, its dense attention (via
`references.stats_ref.capture`), and jmmkv's compressed cache of the same prompts."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

import jmmkv
from hf_models import build_model, pad_batch, positions_from_mask, random_ids
from mm_models import build_mm_model, make_case, modality_of
from references import stats_ref


@dataclasses.dataclass
class Setup:
  model: object  # jmmkv.Model
  rows: list  # per prompt: (attn, queries, keys, values, scaling per layer, modality [T])
  batch: object  # jmmkv Batch of the same prompts


def _per_row(ref, valid):
  """Split captured [B, ...] tensors into unpadded per-row lists (right padding)."""
  out = []
  for b in range(valid.shape[0]):
    t = int(valid[b].sum())
    out.append([(p[b, :, :t, :t], q[b, :, :t], k[b, :, :t], s) for p, q, k, s in ref])
  return out


@torch.no_grad()
def _values(hf_text, n_layers, inputs):
  cache = hf_text(**inputs, use_cache=True).past_key_values
  return [cache.layers[i].values.double().numpy() for i in range(n_layers)]


def text_setup(tmp_path, seed: int, lengths) -> Setup:
  hf = build_model("llama_gqa", seed)
  hf.save_pretrained(tmp_path)
  model = jmmkv.load(tmp_path)
  rng = np.random.default_rng(seed)
  seqs = [random_ids(rng, n) for n in lengths]
  ids, mask = pad_batch(seqs, "right")
  inputs = dict(
    input_ids=torch.tensor(ids),
    attention_mask=torch.tensor(mask),
    position_ids=torch.tensor(positions_from_mask(mask)),
  )
  captured = stats_ref.capture(hf, "LlamaAttention", **inputs)
  values = _values(hf, len(captured), inputs)
  rows = []
  for b, row in enumerate(_per_row(captured, mask.astype(bool))):
    t = len(seqs[b])
    rows.append(
      dict(
        attn=[r[0] for r in row],
        queries=[r[1] for r in row],
        keys=[r[2] for r in row],
        values=[v[b, :, :t] for v in values],
        scaling=row[0][3],
        modality=np.ones(t, int),
      )
    )
  return Setup(model, rows, model.prepare(input_ids=seqs))


def mm_setup(tmp_path, seed: int, family: str = "llava") -> Setup:
  hf = build_mm_model(family, seed)
  hf.save_pretrained(tmp_path)
  model = jmmkv.load(tmp_path)
  rng = np.random.default_rng(seed)
  rows_spec = [[30, "image", 9, "image", 14], [6, "image", 25]]
  images = 3 if family == "llava" else [[1, 4, 4], [1, 4, 6], [1, 2, 2]]
  case = make_case(model, family, rng, rows_spec, images=images, side="right")
  arrays = dict(case.hf_inputs(), input_ids=case.ids, attention_mask=case.mask)
  inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
  cls = "LlamaAttention" if family == "llava" else "Qwen2VLAttention"
  captured = stats_ref.capture(hf, cls, **inputs)
  text = hf.model.language_model
  embeds = hf.model.get_input_embeddings()(
    inputs["input_ids"]
  )  # not used: values via a full forward
  del embeds
  with torch.no_grad():
    out = hf(**inputs, use_cache=True)
  values = [out.past_key_values.layers[i].values.double().numpy() for i in range(len(captured))]
  del text
  rows = []
  for b, row in enumerate(_per_row(captured, case.mask.astype(bool))):
    t = int(case.mask[b].sum())
    rows.append(
      dict(
        attn=[r[0] for r in row],
        queries=[r[1] for r in row],
        keys=[r[2] for r in row],
        values=[v[b, :, :t] for v in values],
        scaling=row[0][3],
        modality=modality_of(case.ids[b, :t]),
      )
    )
  media = {k: v for k, v in case.arrays.items()}
  return Setup(model, rows, model.prepare(input_ids=case.ids, attention_mask=case.mask, **media))


def kept_sets(cache, b: int):
  """[L][K] sorted kept positions of row b of a jmmkv cache."""
  pos = np.asarray(cache.positions)[:, b]
  return [[row[row >= 0] for row in layer] for layer in pos]


def assert_same_kept(cache, b: int, want, what: str = ""):
  got = kept_sets(cache, b)
  for l, (g_l, w_l) in enumerate(zip(got, want)):
    for k, (g, w) in enumerate(zip(g_l, w_l)):
      np.testing.assert_array_equal(g, np.asarray(w), err_msg=f"{what} layer {l} head {k}")
