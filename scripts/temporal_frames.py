"""Which frames does each policy keep on the synthetic temporal-order task, and does that decide
the answer? An analysis, not a test: prints a table and writes JSON.

For every held-out temporal sample ("what colour comes after the red star ?"), the anchor frame j
is the one the question names and frame j + 1 holds the answer. After compression at ``--budget``
it measures the fraction of each frame's 16 tokens kept, averaged over layers and KV heads, and
at the KV head of the bundled model's answer-hop head (layer 3, query head 0, which the training
script guides to the answer frame), split by whether the policy's answer was right.

  python scripts/temporal_frames.py --n 50 --budget 0.2 --out temporal_frames.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import jmmkv
from jmmkv.synthetic import demo, evaluate, tasks

IMAGE_TOKENS = tasks.IMAGE_TOKENS
HOP = (3, 0)  # (layer, query head) of the bundled model's answer hop (GUIDE_HEADS["hop"])
DEFAULT = "snapkv,pyramidkv,adakv,madakv,h2o,streaming,meda,lookm"


def frame_fractions(model, samples, anchors, policy, budget, batch_size=8) -> list[dict]:
  """Per sample: kept fractions of the anchor frame, the next frame and the other frames."""
  heads = model.config.text.num_heads
  rows = []
  for start in range(0, len(samples), batch_size):
    idx = list(range(start, min(len(samples), start + batch_size)))
    batch = model.prepare(
      prompts=[samples[i].prompt for i in idx],
      images=[samples[i].images for i in idx],
      chat_template=False,
    )
    cache = jmmkv.compress(model, batch, jmmkv.policies.from_spec(policy), budget)
    pos = np.asarray(cache.positions)  # [L, B, K, C]
    kv_heads = pos.shape[2]
    for b, i in enumerate(idx):
      media = np.asarray(batch.media_index[b])
      row = {}
      for name, frame in (("anchor", anchors[i]), ("next", anchors[i] + 1)):
        frac_LK = np.isin(pos[:, b], np.nonzero(media == frame)[0]).sum(-1) / IMAGE_TOKENS
        row[name] = float(frac_LK.mean())
        row[name + "_hop"] = float(frac_LK[HOP[0], HOP[1] * kv_heads // heads])
      other = np.nonzero((media >= 0) & (media != anchors[i]) & (media != anchors[i] + 1))[0]
      row["other"] = float(np.isin(pos[:, b], other).sum(-1).mean() / len(other))
      rows.append(row)
  return rows


def mean_of(rows: list[dict], key: str, mask: np.ndarray) -> float:
  """Mean of ``key`` over the rows where ``mask`` holds (NaN when none does)."""
  vals = [r[key] for r, m in zip(rows, mask) if m]
  return float(np.mean(vals)) if vals else float("nan")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--n", type=int, default=50, help="held-out temporal samples")
  p.add_argument("--budget", type=float, default=0.2)
  p.add_argument("--policies", default=DEFAULT, help="comma-separated names or specs")
  p.add_argument("--out", default="temporal_frames.json")
  args = p.parse_args()
  budget = jmmkv.Budget(ratio=args.budget)
  model = demo.load_bundled()
  eps = tasks.episodes("temporal", args.n, 0, tasks.DEFAULTS, 1, split="heldout")
  samples = [e.sample() for e in eps]
  anchors = [e.contents.index(tuple(tasks.echo("temporal", e.qa[0][0]).split())) for e in eps]
  print(
    "| policy | right | anchor kept | next kept | other frames | next at hop head: right | wrong |"
  )
  print("|---|---|---|---|---|---|---|")
  out = {}
  for policy in jmmkv.policies.split_specs(args.policies):
    right = np.array(
      [a == s.answer for a, s in zip(evaluate.predictions(model, samples, policy, budget), samples)]
    )
    rows = frame_fractions(model, samples, anchors, policy, budget)
    every = np.ones(len(rows), bool)
    agg = dict(
      right=float(right.mean()),
      anchor=mean_of(rows, "anchor", every),
      next=mean_of(rows, "next", every),
      other=mean_of(rows, "other", every),
      next_hop_right=mean_of(rows, "next_hop", right),
      next_hop_wrong=mean_of(rows, "next_hop", ~right),
    )
    out[policy] = agg
    print(
      f"| {policy} | {agg['right']:.2f} | {agg['anchor']:.3f} | {agg['next']:.3f} | "
      f"{agg['other']:.3f} | {agg['next_hop_right']:.3f} | {agg['next_hop_wrong']:.3f} |",
      flush=True,
    )
  with open(args.out, "w") as f:
    json.dump(dict(n=args.n, budget=args.budget, hop=HOP, policies=out), f, indent=1)


if __name__ == "__main__":
  main()
