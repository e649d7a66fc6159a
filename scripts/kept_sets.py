"""Kept sets of every policy on random models and prompts, to compare two versions of jmmkv.

``python scripts/kept_sets.py dump OUT.npz`` writes, for 3 seeds x policy settings x budgets, the
compressed cache's positions ``[L, B, K, C]`` and kept K/V of ``jmmkv.compress`` (dense layout
order: ascending positions per (layer, row, KV head)); ``python scripts/kept_sets.py compare
A.npz B.npz`` says, per case, whether every (layer, row, KV head) keeps the same positions and
the kept K/V agree within 1e-5 (relative to the largest value). Run ``dump`` from two checkouts
(``PYTHONPATH=<checkout>``) to check a change that must not alter what policies keep.
"""

from __future__ import annotations

import sys

import numpy as np

CASES = [
  "streaming",
  "h2o",
  "snapkv",
  "snapkv:pooling=max,gqa=max",
  "pyramidkv",
  "adakv",
  "lookm",
  "lookm:keep_all_text=false,merge=average",
  "lookm:merge=none",
  "meda",
  "meda:variant=code",
  "meda:keep_all_text=false,renormalise=true",
  "madakv",
  "madakv:reading=A",
  "madakv:reading=B",
  "madakv:hcc=false",
  "madakv:mpa=false",
]
BUDGETS = (0.5, 0.2, 0.05)


def _batch(seed: int, vocab: int):
  """Two rows of different lengths mixing text and image spans (one text-only row for seed 2)."""
  from jmmkv.inputs import Batch
  from jmmkv.typing import IMAGE, TEXT

  rng = np.random.default_rng(seed)
  rows, mods = [], []
  for b, length in enumerate((int(rng.integers(300, 420)), int(rng.integers(150, 290)))):
    mod = np.full(length, TEXT, np.int32)
    if not (seed == 2 and b == 1):
      for start in sorted(rng.choice(length - 60, 3, replace=False)):
        mod[start + 5 : start + 5 + int(rng.integers(20, 50))] = IMAGE
    rows.append(rng.integers(3, vocab, length).astype(np.int32))
    mods.append(mod)
  media = tuple(np.where(m == IMAGE, 0, -1).astype(np.int32) for m in mods)
  return Batch(tuple(rows), tuple(mods), media)


def dump(path: str) -> None:
  import jmmkv
  from jmmkv.models.configs import tiny_decoder

  out = {}
  for seed in range(3):
    cfg = tiny_decoder(
      vocab_size=512,
      hidden_size=64,
      intermediate_size=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
    )
    model = jmmkv.random_model(cfg, seed=seed)
    batch = _batch(seed, cfg.vocab_size)
    for spec in CASES:
      for ratio in BUDGETS:
        cache = jmmkv.compress(model, batch, spec, ratio)
        key = f"{seed}|{spec}|{ratio}"
        out[key + "|positions"] = np.asarray(cache.positions)
        out[key + "|k"] = np.asarray(cache.k)
        out[key + "|v"] = np.asarray(cache.v)
        print(key, flush=True)
  np.savez_compressed(path, **out)


def _sets(positions, k, v):
  """Per (layer, row, head): sorted kept positions and their K/V rows."""
  out = {}
  for idx in np.ndindex(*positions.shape[:3]):
    pos = positions[idx]
    order = np.argsort(pos[pos >= 0])
    out[idx] = (pos[pos >= 0][order], k[idx][pos >= 0][order], v[idx][pos >= 0][order])
  return out


def compare(a_path: str, b_path: str) -> int:
  a, b = np.load(a_path), np.load(b_path)
  keys = sorted({k.rsplit("|", 1)[0] for k in a.files})
  bad = 0
  for key in keys:
    sa = _sets(*(a[f"{key}|{x}"] for x in ("positions", "k", "v")))
    sb = _sets(*(b[f"{key}|{x}"] for x in ("positions", "k", "v")))
    worst, same = 0.0, sa.keys() == sb.keys()
    for idx in sa if same else ():
      pa, ka, va = sa[idx]
      pb, kb, vb = sb[idx]
      if not np.array_equal(pa, pb):
        same = False
        break
      scale = max(1e-30, float(np.abs(ka).max(initial=0)), float(np.abs(va).max(initial=0)))
      worst = max(worst, float(np.abs(ka - kb).max(initial=0)) / scale)
      worst = max(worst, float(np.abs(va - vb).max(initial=0)) / scale)
    ok = same and worst <= 1e-5
    bad += not ok
    print(f"{'ok ' if ok else 'BAD'} {key}: same sets {same}, K/V max rel diff {worst:.2e}")
  print(f"{len(keys) - bad}/{len(keys)} cases identical")
  return 1 if bad else 0


if __name__ == "__main__":
  if sys.argv[1:2] == ["dump"] and len(sys.argv) == 3:
    dump(sys.argv[2])
  elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
    sys.exit(compare(sys.argv[2], sys.argv[3]))
  else:
    sys.exit(__doc__)
