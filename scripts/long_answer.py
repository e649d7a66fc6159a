"""A long answer with and without `jmmkv.generate`'s ``decode_window`` (llava-mini shapes, random
weights, greedy, no EOS).

``python scripts/long_answer.py --new 2048 --window 256 --prompt 1024 --policy snapkv --budget 0.2``

Prints and writes (``--out``) JSON: KV bytes allocated and used by each run, the first answer
token where the two differ (the bound first acts on the step that feeds token ``window``, so
tokens ``0..window`` must be equal), and ms per decode step (median and fastest) over the first
and the last ``--span`` steps of each run, timed one jitted step at a time (each step's output
fed back).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import jmmkv
from jmmkv.bench import PRESETS, SMALL_WINDOW, prompt
from jmmkv.models.configs import tiny_decoder
from jmmkv.models.llama import Decoder

G = importlib.import_module("jmmkv.generate")  # the module (jmmkv.generate is the function)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _step(params, tok_B, cache, *, cfg):
  dec = Decoder(cfg, jnp.float32)
  x_B1D = dec.apply(params, tok_B[:, None], method=Decoder.embed)
  logits_BV, cache = dec.apply(params, x_B1D, cache, method=Decoder.decode)
  return jnp.argmax(logits_BV, -1).astype(jnp.int32), cache


def step_times(model, batch, policy, budget, new: int, window: int | None) -> list[float]:
  """Seconds of each decode step of a ``new``-token answer (``new - 1`` tokens fed back; the
  first step, which compiles, is not timed), from a fresh compressed prefill."""
  policy, budget = G.resolve(policy, budget, batch.lengths)
  steps = new - 1
  _, logits_BV, stored, storage, _ = G.prefill_stage(
    model, batch, policy, budget, G.append_slots(steps, window), decode_tokens=steps
  )
  cache, _ = G.layout_stage(stored, storage, "dense")
  params, cfg = model.params["text"], model.text_config
  tok_B = jnp.argmax(logits_BV, -1).astype(jnp.int32)
  tok_B, cache = jax.block_until_ready(_step(params, tok_B, cache, cfg=cfg))  # compiles
  seconds = []
  for _ in range(steps - 1):  # the first step compiled
    t0 = time.perf_counter()
    tok_B, cache = jax.block_until_ready(_step(params, tok_B, cache, cfg=cfg))
    seconds.append(time.perf_counter() - t0)
  return seconds


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--new", type=int, default=2048, help="answer tokens")
  p.add_argument("--window", type=int, default=256, help="decode_window")
  p.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
  p.add_argument("--policy", default="snapkv")
  p.add_argument("--budget", type=float, default=0.2)
  p.add_argument("--span", type=int, default=256, help="steps timed at the start and the end")
  p.add_argument("--out", default="long_answer.json")
  args = p.parse_args()
  cfg = tiny_decoder(**PRESETS["llava-mini"])
  model = jmmkv.random_model(cfg, seed=0)
  batch = prompt(args.prompt, cfg.vocab_size)
  name = args.policy.split(":")[0]
  policy = jmmkv.policies.from_spec(args.policy, **SMALL_WINDOW.get(name, {}))
  budget = None if name == "full" else jmmkv.Budget(ratio=args.budget)
  kw = dict(max_new_tokens=args.new, eos_token_id=[])
  runs = {}
  for label, window in (("unbounded", None), ("bounded", args.window)):
    out = jmmkv.generate(model, batch, policy, budget, decode_window=window, **kw)
    seconds = step_times(model, batch, policy, budget, args.new, window)
    first, last = seconds[: args.span], seconds[-args.span :]
    runs[label] = dict(
      tokens=out.tokens[0],
      kv_mib_allocated=round(out.stats["kv_bytes_allocated"] / 2**20, 2),
      kv_mib_used=round(out.stats["kv_bytes_used"] / 2**20, 2),
      kept_fraction=round(out.stats["kept_fraction"], 4),
      ms_per_step_first=round(1e3 * float(np.median(first)), 3),
      ms_per_step_last=round(1e3 * float(np.median(last)), 3),
      fastest_ms_first=round(1e3 * float(np.min(first)), 3),
      fastest_ms_last=round(1e3 * float(np.min(last)), 3),
    )
  a, b = runs["unbounded"]["tokens"], runs["bounded"]["tokens"]
  differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
  result = dict(
    args=vars(args),
    first_differing_token=differ[0] if differ else None,
    bound_first_acts_at_token=args.window + 1,
    equal_until_the_bound=a[: args.window + 1] == b[: args.window + 1],
    **{k: {n: v for n, v in r.items() if n != "tokens"} for k, r in runs.items()},
    device=jax.devices()[0].device_kind,
  )
  print(json.dumps(result, indent=1))
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
