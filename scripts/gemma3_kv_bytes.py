"""The KV cache of Gemma 3's layer pattern, measured from the arrays: how much the local layers'
rings save, with Full and with a compressing policy. An analysis, not a test: prints a table and
writes JSON.

A random-weight Gemma 3 text model with a released checkpoint's KV shapes (by default
Gemma-3-4B's: 34 layers, every 6th global, 4 KV heads of 256, a 1024-token window) but a tiny
width, so that it runs on a CPU; the cache does not depend on the width. For each prompt length
it runs `jmmkv.generate` with the window and, for comparison, the same model with every layer
global (``--no-window-up-to`` limits those slower runs), and reports the KV bytes allocated
(float32) and the slots of each kind of layer.

  python scripts/gemma3_kv_bytes.py --lengths 2048,8192 --policies full,snapkv --budgets 0.2,0.05
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np

import jmmkv
from jmmkv.models import configs
from jmmkv.models.llama import init_params
from jmmkv.models.model import Model


def model_for(layers: int, pattern: int, kv_heads: int, head_dim: int, window: int | None):
  local = tuple(i for i in range(layers) if (i + 1) % pattern)
  cfg = configs.DecoderConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    num_layers=layers,
    num_heads=kv_heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    max_position_embeddings=131072,
    architecture="Gemma3ForCausalLM",
    qk_norm=True,
    norm_plus_one=True,
    sandwich_norms=True,
    hidden_act="gelu_pytorch_tanh",
    embed_scale=True,
    query_pre_attn_scalar=float(head_dim),
    tie_word_embeddings=True,
    local_layers=local,
    local_rope=configs.RopeConfig(theta=10_000.0),
    sliding_window=window,
  )
  params = {"text": init_params(cfg, jax.random.key(0))}
  return Model(cfg, params)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--lengths", default="2048,8192")
  ap.add_argument("--policies", default="full,snapkv")
  ap.add_argument("--budgets", default="0.2,0.05", help="kept fractions of the policies but full")
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--layers", type=int, default=34)
  ap.add_argument("--pattern", type=int, default=6, help="every n-th layer is global")
  ap.add_argument("--kv-heads", type=int, default=4)
  ap.add_argument("--head-dim", type=int, default=256)
  ap.add_argument("--window", type=int, default=1024)
  ap.add_argument("--no-window-up-to", type=int, default=2048)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  shape = (args.layers, args.pattern, args.kv_heads, args.head_dim)
  windowed = model_for(*shape, args.window)
  plain = dataclasses.replace(
    windowed, config=dataclasses.replace(windowed.config, sliding_window=None)
  )
  rng = np.random.default_rng(0)
  rows = []
  for n in (int(x) for x in args.lengths.split(",")):
    batch = windowed.prepare(input_ids=[rng.integers(3, 256, n).tolist()])
    budgets = [float(x) for x in args.budgets.split(",")]
    jobs = [(p, None if p == "full" else b) for p in args.policies.split(",") for b in budgets]
    for name, budget in dict.fromkeys(jobs):
      for label, model in (("window", windowed), ("all global", plain)):
        if label == "all global" and n > args.no_window_up_to:
          continue
        out = jmmkv.generate(
          model,
          batch,
          name,
          budget,
          max_new_tokens=args.new_tokens,
          eos_token_id=[],
          return_cache=True,
          layout="dense",
        )
        c = out.cache
        ring = [c.layer_k[i].shape[2] for i in c.ring_layers]
        rest = [x.shape[2] for i, x in enumerate(c.layer_k) if i not in c.ring_layers]
        rows.append(
          dict(
            tokens=n,
            policy=name,
            budget=budget,
            layers=label,
            ring_slots=sorted(set(ring)),
            global_slots=sorted(set(rest)),
            append_rows=int(c.append_k.shape[0]),
            kv_bytes_allocated=out.stats["kv_bytes_allocated"],
            kv_mib=out.stats["kv_bytes_allocated"] / 2**20,
          )
        )
        r = rows[-1]
        print(
          f"{n:>6} {name:>8} {budget or 1:>5} {label:>10}  rings {r['ring_slots']} global {r['global_slots']} "
          f"append rows {r['append_rows']}  {r['kv_mib']:.1f} MiB",
          flush=True,
        )
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
