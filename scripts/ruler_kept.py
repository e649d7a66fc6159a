"""Which prompt positions each policy kept on RULER samples (`jmmkv eval ruler`'s prompts): for
every (policy, budget), the fraction of (layer, KV head) pairs that hold every token of an
expected answer where the prompt states it (the needle's value), the kept fraction of the
sentence that states it (and how often it is kept whole), by layer third, the kept slots per
layer, and the answers. This is the "why did it lose" measurement behind docs/ruler.md.

  python scripts/ruler_kept.py --task niah_single_number --length 4096 --n 5 \
      --policies snapkv,adakv,madakv,meda --budget 0.2 --out /tmp/kept.json

Each batch is prefilled once for every policy (`jmmkv.compare.iter_each`, as the eval does).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np


def answer_slots(tok, ids: list[int], answers) -> tuple[list, list]:
  """Per answer, the token slots of each place the prompt states it (whole words), and of the
  sentence around each (from the previous sentence end to the next period)."""
  pieces = [tok.decode([t]) for t in ids]
  starts = np.cumsum([0] + [len(p) for p in pieces])
  text = "".join(pieces)
  slots = lambda a, b: list(
    range(int(np.searchsorted(starts, a, "right") - 1), int(np.searchsorted(starts, b, "left")))
  )
  values, sentences = [], []
  for a in answers:
    found = list(re.finditer(rf"(?<!\w){re.escape(a)}(?!\w)", text))
    values.append([slots(m.start(), m.end()) for m in found])
    bounds = [
      (
        max(text.rfind(".", 0, m.start()), text.rfind("\n", 0, m.start())) + 1,
        text.find(".", m.end()) + 1,
      )
      for m in found
    ]
    sentences.append([slots(a0, b0 if b0 > 0 else m.end()) for (a0, b0), m in zip(bounds, found)])
  return values, sentences


def held(mask_LKT: np.ndarray, spans: list) -> np.ndarray:
  """``[L, K]``: the mean over answers of whether some statement of it is kept whole."""
  per = [np.logical_or.reduce([mask_LKT[:, :, c].all(-1) for c in s]) for s in spans if s]
  return np.mean(per, axis=0)


def covered(mask_LKT: np.ndarray, spans: list) -> np.ndarray:
  """``[L, K]``: the mean over answers of the best kept fraction of a statement's tokens."""
  per = [np.max([mask_LKT[:, :, c].mean(-1) for c in s], axis=0) for s in spans if s]
  return np.mean(per, axis=0)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--task", default="niah_single_number")
  p.add_argument("--length", type=int, default=4096)
  p.add_argument("--n", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--policies", default="snapkv,adakv,madakv,meda")
  p.add_argument("--budget", type=float, default=0.2)
  p.add_argument("--cache-dir", default="~/.cache/jmmkv/smollm2")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)

  import jmmkv
  from jmmkv.compare import iter_each, kept_mask
  from jmmkv.eval import ruler_tasks, smollm2

  _, hf_dir = smollm2.prepare(args.cache_dir)
  model = jmmkv.load(hf_dir)
  tok = model.tokenizer
  prompter = ruler_tasks.Prompter(tok)
  new = ruler_tasks.MAX_NEW_TOKENS[args.task]
  samples = [
    ruler_tasks.make_sample(args.task, prompter, args.length, i, seed=args.seed, max_new_tokens=new)
    for i in range(args.n)
  ]
  specs = jmmkv.policies.spec_list(args.policies)
  jobs = [(jmmkv.policies.from_spec(s), jmmkv.Budget(ratio=args.budget)) for s in specs]
  batch = model.prepare(input_ids=[list(s.ids) for s in samples])
  spans = [answer_slots(tok, list(s.ids), s.answers) for s in samples]
  rows = []
  for i, out in iter_each(model, batch, jobs, max_new_tokens=new, return_cache=True):
    mask = kept_mask(out.cache, max(batch.lengths))  # [L, B, K, T]
    thirds = np.array_split(np.arange(mask.shape[0]), 3)
    value = np.stack([held(mask[:, b], v) for b, (v, _) in enumerate(spans)])  # [B, L, K]
    sentence = np.stack([covered(mask[:, b], s) for b, (_, s) in enumerate(spans)])
    whole = np.stack([held(mask[:, b], s) for b, (_, s) in enumerate(spans)])
    kept = mask.sum(-1).mean(axis=(1, 2))  # [L] slots per (row, head)
    scores = [ruler_tasks.score(t, s.answers) for t, s in zip(out.texts, samples)]
    by_third = lambda x: [round(float(x[:, t].mean()), 3) for t in thirds]
    rows.append(
      dict(
        policy=specs[i],
        budget=args.budget,
        score=float(np.mean(scores)),
        scores=scores,
        kept_fraction=out.stats["kept_fraction"],
        answer_held=float(value.mean()),
        answer_held_by_third=by_third(value),
        sentence_covered=float(sentence.mean()),
        sentence_covered_by_third=by_third(sentence),
        sentence_whole=float(whole.mean()),
        slots_per_layer=[round(float(x), 1) for x in kept],
        slots_per_head=mask.sum(-1).mean(axis=1).round(1).tolist(),  # [L][K]
        value_held_per_head=value.mean(axis=0).round(3).tolist(),  # [L][K]
        answers=[list(s.answers) for s in samples],
        predictions=out.texts,
      )
    )
    r = rows[-1]
    print(
      f"{r['policy']:<24} score {r['score']:.2f}  kept {r['kept_fraction']:.3f}  value held "
      f"{r['answer_held']:.3f} {r['answer_held_by_third']}  sentence covered "
      f"{r['sentence_covered']:.3f} {r['sentence_covered_by_third']} whole {r['sentence_whole']:.3f}"
      f"  slots first/last layer {kept[0]:.0f}/{kept[-1]:.0f}",
      flush=True,
    )
  meta = dict(vars(args), statements=[[len(x) for x in v] for v, _ in spans])
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
