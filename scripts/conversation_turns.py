"""Ten turns of a `jmmkv.Conversation` per policy at a fixed token budget (llava-mini shapes,
random weights, greedy, no EOS): what each turn keeps, and what it compiles.

``python scripts/conversation_turns.py --policies all --tokens 256 --turns 10 --out turns.json``

Batch 2: prompts of ``--prompt`` and 70% of it, then turns of ``--turn`` and 60% of it random
tokens, ``--new`` answer tokens each. After every turn (prefill, compression, decode) it records
the prefix slots each (layer, row, KV head) holds (the kept ones, before the answer is folded
in), the prefix capacity, the KV bytes allocated and the compilations the turn caused (a JAX
monitoring listener on backend compiles, eager operations included). Prints one line per policy
and writes every turn's figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import jmmkv
from jmmkv.bench import PRESETS, SMALL_WINDOW
from jmmkv.models.configs import tiny_decoder

COMPILED: list[str] = []


def _count(name, secs, **kw):
  if name == "/jax/core/compile/backend_compile_duration":
    COMPILED.append(name)


def run(model, policy, budget, prompts, turns, new: int) -> list[dict]:
  chat = jmmkv.Conversation(model, policy, budget, max_new_tokens=new, eos_token_id=[])
  rows = []
  for i, ids in enumerate([prompts, *turns], 1):
    before, t0 = len(COMPILED), time.perf_counter()
    out = chat.ask(input_ids=ids)
    seconds = time.perf_counter() - t0
    cache = chat.cache
    kept = np.stack([(np.asarray(p) >= 0).sum(-1) for p in cache.layer_positions])
    rows.append(
      dict(
        turn=i,
        context_tokens=out.stats["prompt_tokens"],
        kept_max=int(kept.max()),
        kept_mean=round(float(kept.mean()), 2),
        capacity=cache.capacity,
        kv_mib_allocated=round(out.stats["kv_bytes_allocated"] / 2**20, 3),
        compilations=len(COMPILED) - before,
        seconds=round(seconds, 3),
      )
    )
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--policies", default="all")
  p.add_argument("--tokens", type=int, default=256, help="Budget(tokens=...) per layer, KV head")
  p.add_argument("--turns", type=int, default=10)
  p.add_argument("--prompt", type=int, default=1024, help="first-turn tokens of row 0")
  p.add_argument("--turn", type=int, default=64, help="tokens of each later turn of row 0")
  p.add_argument("--new", type=int, default=16, help="answer tokens per turn")
  p.add_argument("--out", default="turns.json")
  args = p.parse_args()
  jax.monitoring.register_event_duration_secs_listener(_count)
  cfg = tiny_decoder(**PRESETS["llava-mini"])
  model = jmmkv.random_model(cfg, seed=0)
  rng = np.random.default_rng(0)
  ids = lambda n: [int(x) for x in rng.integers(3, cfg.vocab_size, n)]
  prompts = [[1] + ids(args.prompt - 1), [1] + ids(int(0.7 * args.prompt) - 1)]
  turns = [[ids(args.turn), ids(int(0.6 * args.turn))] for _ in range(args.turns - 1)]
  budget = jmmkv.Budget(tokens=args.tokens)
  result = {}
  for spec in jmmkv.policies.spec_list(args.policies):
    name = spec.split(":")[0]
    policy = jmmkv.policies.from_spec(spec, **SMALL_WINDOW.get(name, {}))
    rows = run(model, policy, None if name == "full" else budget, prompts, turns, args.new)
    result[spec] = rows
    late = rows[2:]
    print(
      f"{spec:<10} kept max {max(r['kept_max'] for r in rows):>5} "
      f"(mean {np.mean([r['kept_mean'] for r in late]):7.1f}), capacity "
      f"{sorted({r['capacity'] for r in rows})}, compilations per turn "
      f"{[r['compilations'] for r in rows]}, s per turn 3-{args.turns} "
      f"{np.median([r['seconds'] for r in late]):.3f}"
    )
  meta = dict(args=vars(args), device=jax.devices()[0].device_kind)
  with open(args.out, "w") as f:
    json.dump(dict(meta=meta, policies=result), f, indent=1)


if __name__ == "__main__":
  main()
