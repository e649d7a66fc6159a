"""Which prompt positions each policy kept on RULER samples (`jmmkv eval ruler`'s prompts): for
every (policy, budget), the fraction of (layer, KV head) pairs that hold every token of an
expected answer where the prompt states it (the needle's value), by layer third, the kept slots
per layer, and the answers. This is the "why did it lose" measurement behind docs/ruler.md.

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


def answer_slots(tok, ids: list[int], answers) -> list[list[list[int]]]:
  """Per answer, the token slots of each place the prompt states it (whole words)."""
  pieces = [tok.decode([t]) for t in ids]
  starts = np.cumsum([0] + [len(p) for p in pieces])
  text = "".join(pieces)
  out = []
  for a in answers:
    spans = []
    for m in re.finditer(rf"(?<!\w){re.escape(a)}(?!\w)", text):
      first = int(np.searchsorted(starts, m.start(), side="right") - 1)
      last = int(np.searchsorted(starts, m.end(), side="left") - 1)
      spans.append(list(range(first, last + 1)))
    out.append(spans)
  return out


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
  slots = [answer_slots(tok, list(s.ids), s.answers) for s in samples]
  rows = []
  for i, out in iter_each(model, batch, jobs, max_new_tokens=new, return_cache=True):
    mask = kept_mask(out.cache, max(batch.lengths))  # [L, B, K, T]
    layers = mask.shape[0]
    thirds = np.array_split(np.arange(layers), 3)
    held = []  # [B] of [L, K]: every answer held (some statement of it whole)
    for b, per_answer in enumerate(slots):
      per = [
        np.logical_or.reduce([mask[:, b][:, :, c].all(-1) for c in spans])
        for spans in per_answer
        if spans
      ]
      held.append(np.mean(per, axis=0))
    held = np.stack(held)  # [B, L, K]
    kept = mask.sum(-1).mean(axis=(1, 2))  # [L] slots per (row, head)
    scores = [ruler_tasks.score(t, s.answers) for t, s in zip(out.texts, samples)]
    rows.append(
      dict(
        policy=specs[i],
        budget=args.budget,
        score=float(np.mean(scores)),
        kept_fraction=out.stats["kept_fraction"],
        answer_held=float(held.mean()),
        answer_held_by_third=[float(held[:, t].mean()) for t in thirds],
        slots_per_layer=[round(float(x), 1) for x in kept],
        answers=[list(s.answers) for s in samples],
        predictions=out.texts,
      )
    )
    r = rows[-1]
    thirds_s = " / ".join(f"{x:.2f}" for x in r["answer_held_by_third"])
    print(
      f"{r['policy']:<24} score {r['score']:.2f}  kept {r['kept_fraction']:.3f}  answer held "
      f"{r['answer_held']:.3f} (layer thirds {thirds_s})  slots first/last layer "
      f"{kept[0]:.0f}/{kept[-1]:.0f}",
      flush=True,
    )
  meta = dict(vars(args), statements=[[len(x) for x in s] for s in slots])
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
