"""Cross-check the NumPy references (tests/references/*_ref.py) against kvpress 0.5.5 (CPU).

Not part of the test suite: kvpress needs transformers < 5.3, so this runs in its own venv
(scripts/README.md has the install). The references are numpy-only and are imported directly.

For each seed a tiny random Llama (vocab 512, hidden 96, 3 layers, 6 heads, 2 KV heads,
initializer_range 0.2) reads T random ids. The references get the eager attention probabilities of
a press-free forward; kvpress' presses run on the same model and ids, and their kept positions per
(layer, KV head) are read back:
- ScorerPress family (SnapKV, StreamingLLM, PyramidKV): the cache rows are gathered in score order,
  so a prepended forward hook clones the full keys and each kept row is matched to its position
  (byte for byte; RoPE makes rows distinct; an ambiguous match fails loudly).
- AdaKVPress: the cache is not shortened; the pruned (batch, head, position) triples are in
  ``self_attn.masked_key_indices`` and the kept positions are the complement. AdaKV refuses eager
  attention, so it runs with sdpa (its window attention is recomputed from q_proj).
Budget: the references get ``tokens=C``; kvpress gets r = 1 - (C + 0.5) / T, so its
n_kept = int(T (1 - r)) = C. PyramidKV gets r = 1 - C / T (its counts use round(), not int()).
Known differences, so the settings keep C >= window (kvpress keeps the whole window only then):
- kvpress averages the window rows (mean), we sum: ranking-equivalent;
- kvpress' topk tie order is unspecified (no exact ties arise with random float scores);
- PyramidKV counts: kvpress uses c = T (1 - r) as the count WITH the window
  (min = c / beta, max = 2c - min, clamp max <= T - w, counts round(max - l step)), and falls back
  to uniform unless T >= max >= min >= w; the reference uses ALGORITHMS.md 3.5 (C - w, plus w,
  largest remainder). So "pyramidkv" rows differ in the outer layers by design; the
  "pyramidkv-select" rows feed kvpress' realised per-layer counts to the reference's selection.
Usage: /tmp/kvpress-venv/bin/python scripts/kvpress_crosscheck.py --out /tmp/kvpress_check.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the references import each other as `references.*`

import numpy as np  # noqa: E402
import torch  # noqa: E402
from kvpress import AdaKVPress, PyramidKVPress, SnapKVPress, StreamingLLMPress  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from references.adakv_ref import adakv  # noqa: E402
from references.pyramidkv_ref import pyramidkv  # noqa: E402
from references.snapkv_ref import select_layer, snapkv, window_scores  # noqa: E402
from references.streaming_ref import streaming  # noqa: E402


def build(seed: int) -> LlamaForCausalLM:
  torch.manual_seed(seed)
  cfg = LlamaConfig(
    vocab_size=512,
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    initializer_range=0.2,
    max_position_embeddings=512,
    attn_implementation="eager",
  )
  return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def dense(model, ids):
  """Eager attention probabilities [N, T, T] and keys [K, T, H] per layer, as float64 numpy."""
  cache = DynamicCache(config=model.config)
  out = model.model(input_ids=ids, past_key_values=cache, output_attentions=True)
  attn = [a[0].double().numpy() for a in out.attentions]
  keys = [layer.keys[0].double().numpy() for layer in cache.layers]
  return attn, keys


@torch.no_grad()
def kvpress_kept(model, ids, press, attn_impl: str) -> list:
  """kvpress' kept positions: list over layers of list over KV heads of sorted int arrays."""
  model.set_attn_implementation(attn_impl)
  layers = model.model.layers
  full = {}

  def grab(module, args, kwargs, output):
    full[module.layer_idx] = kwargs["past_key_values"].layers[module.layer_idx].keys.clone()

  hooks = [
    layer.self_attn.register_forward_hook(grab, with_kwargs=True, prepend=True) for layer in layers
  ]
  for layer in layers:
    layer.self_attn.masked_key_indices = None
  cache = DynamicCache(config=model.config)
  try:
    with press(model):
      model.model(input_ids=ids, past_key_values=cache)
  finally:
    for h in hooks:
      h.remove()
    model.set_attn_implementation("eager")
  T = ids.shape[1]
  kept = []
  for li, layer in enumerate(layers):
    k_full = full[li][0]  # [K, T, H]
    masked = getattr(layer.self_attn, "masked_key_indices", None)
    if masked is not None:  # AdaKV: complement of the pruned triples
      _, heads, pos = masked
      keep = np.ones((k_full.shape[0], T), bool)
      keep[heads.numpy(), pos.numpy()] = False
      kept.append([np.flatnonzero(keep[j]) for j in range(k_full.shape[0])])
      layer.self_attn.masked_key_indices = None
      continue
    k_kept = cache.layers[li].keys[0]  # [K, n, H], score order
    heads = []
    for j in range(k_full.shape[0]):
      eq = (k_kept[j][:, None, :] == k_full[j][None, :, :]).all(-1)  # [n, T]
      if not (eq.sum(1) == 1).all():
        raise RuntimeError(f"ambiguous key match in layer {li}, head {j}")
      heads.append(np.sort(eq.int().argmax(1).numpy()))
    kept.append(heads)
  return kept


def agreement(a: list, b: list) -> tuple[int, int]:
  pairs = [(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb)]
  return sum(np.array_equal(x, y) for x, y in pairs), len(pairs)


def counts(kept: list) -> list:
  return [[len(p) for p in layer] for layer in kept]


def run(seeds, T, windows, budgets, kernel, alpha):
  rows = []
  for seed in seeds:
    model = build(seed)
    ids = torch.from_numpy(np.random.default_rng(seed).integers(0, 512, (1, T)))
    attn, keys = dense(model, ids)
    for w in windows:
      for C in budgets:
        if C < w or C >= T:
          continue
        r = 1 - (C + 0.5) / T
        r_pyr = 1 - C / T
        snap_kw = dict(window=w, kernel=kernel, pooling="avg", tokens=C)
        cases = [
          (
            "snapkv",
            SnapKVPress(r, window_size=w, kernel_size=kernel),
            "eager",
            snapkv(attn, keys, **snap_kw),
          ),
          ("streaming", StreamingLLMPress(r, n_sink=4), "eager", streaming(attn, keys, tokens=C)),
          (
            "pyramidkv",
            PyramidKVPress(r_pyr, window_size=w, kernel_size=kernel),
            "eager",
            pyramidkv(attn, keys, **snap_kw),
          ),
          (
            "adakv",
            AdaKVPress(SnapKVPress(r, window_size=w, kernel_size=kernel), alpha_safeguard=alpha),
            "sdpa",
            adakv(attn, keys, alpha_safeguard=alpha, **snap_kw),
          ),
        ]
        for name, press, impl, ref in cases:
          theirs = kvpress_kept(model, ids, press, impl)
          match, total = agreement(ref["kept"], theirs)
          rows.append(
            dict(
              press=name,
              seed=seed,
              T=T,
              window=w,
              C=C,
              ratio=round(C / T, 4),
              match=match,
              total=total,
              counts_ref=counts(ref["kept"]),
              counts_kvpress=counts(theirs),
            )
          )
          if name == "pyramidkv":  # the reference's selection with kvpress' per-layer counts
            sel = []
            for a, k, layer in zip(attn, keys, theirs):
              level, score = window_scores(a, k.shape[0], w, kernel, "avg")
              sel.append(select_layer(level, score, len(layer[0])))
            match, total = agreement(sel, theirs)
            rows.append(
              dict(
                rows[-1], press="pyramidkv-select", match=match, total=total, counts_ref=counts(sel)
              )
            )
  return rows


def summary(rows) -> dict:
  out = {}
  for r in rows:
    key = f"{r['press']} C={r['C']} (ratio {r['ratio']:.2f})"
    m, t = out.get(key, (0, 0))
    out[key] = (m + r["match"], t + r["total"])
  return {k: f"{m}/{t}" for k, (m, t) in out.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="JSON output path")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--T", type=int, default=150)
  p.add_argument("--windows", type=int, nargs="+", default=[16, 32])
  p.add_argument("--budgets", type=int, nargs="+", default=[32, 45, 75, 105, 120])
  p.add_argument("--kernel", type=int, default=5)
  p.add_argument("--alpha", type=float, default=0.2)
  args = p.parse_args()
  rows = run(args.seeds, args.T, args.windows, args.budgets, args.kernel, args.alpha)
  head = f"{'press':18s} {'seed':>4s} {'w':>3s} {'C':>4s} {'ratio':>6s} {'match':>7s}"
  print(head + "  counts: ref | kvpress")
  for r in rows:
    cr = r["counts_ref"] if r["press"] == "adakv" else [c[0] for c in r["counts_ref"]]
    ck = r["counts_kvpress"] if r["press"] == "adakv" else [c[0] for c in r["counts_kvpress"]]
    print(
      f"{r['press']:18s} {r['seed']:4d} {r['window']:3d} {r['C']:4d} {r['ratio']:6.3f} "
      f"{r['match']:3d}/{r['total']:<3d}  {cr} | {ck}"
    )
  totals = {}
  for r in rows:
    m, t = totals.get(r["press"], (0, 0))
    totals[r["press"]] = (m + r["match"], t + r["total"])
  print("\nper press (all seeds, windows, budgets):")
  for name, (m, t) in totals.items():
    print(f"  {name:18s} {m}/{t}")
  import transformers

  result = dict(
    settings=vars(args),
    versions=dict(
      kvpress=importlib.metadata.version("kvpress"),
      transformers=transformers.__version__,
      torch=torch.__version__,
    ),
    totals={k: dict(match=m, total=t) for k, (m, t) in totals.items()},
    by_budget=summary(rows),
    rows=rows,
  )
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
