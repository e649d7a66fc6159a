"""`jmmkv bench`: KV memory and latency of every policy x budget on a random-weight preset.

Per prompt length: prefill ms (statistics included), compression ms (selection + gather + merge),
decode ms per token (median over repeats after a warm-up, block_until_ready), KV bytes allocated /
used from the cache arrays, each as a ratio to Full measured in the same run, and a floor for a
decode step: the bytes it must read (parameters + allocated KV) over this machine's measured read
bandwidth (a reduction over a 256 MiB array). Prompts mix text and 576-token image spans (modality ids), so multimodal policies see
images. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jmmkv
from jmmkv.inputs import Batch
from jmmkv.models.configs import tiny_decoder
from jmmkv.typing import IMAGE, TEXT

PRESETS = {
  # A LLaVA-1.5-shaped decoder (MHA, SwiGLU, Llama RoPE), scaled down to run on a CPU.
  "llava-mini": dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1376,
    num_layers=8,
    num_heads=8,
    num_kv_heads=8,
    head_dim=64,
  ),
  "tiny": dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
  ),
}
SMALL_WINDOW = {"snapkv": dict(window=32), "pyramidkv": dict(window=32), "adakv": dict(window=32)}


def prompt(
  length: int, vocab: int, image_tokens: int = 576, text_run: int = 64, seed: int = 0
) -> Batch:
  """One prompt of ``length`` tokens: text runs and image spans alternating, text at the end."""
  rng = np.random.default_rng(seed)
  mod = np.full(length, TEXT, np.int32)
  pos = text_run
  while pos + image_tokens + text_run <= length:
    mod[pos : pos + image_tokens] = IMAGE
    pos += image_tokens + text_run
  ids = rng.integers(3, vocab, length).astype(np.int32)
  return Batch((ids,), (mod,), (np.where(mod == IMAGE, 0, -1).astype(np.int32),))


def read_bandwidth(nbytes: int = 256 << 20) -> float:
  """Measured bytes / s of reading an array once (a sum; median of 5 after a warm-up)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return nbytes / statistics.median(times)


def run(
  preset: str, lengths, policies, budgets, max_new_tokens: int, repeats: int, dtype: str = "float32"
):
  cfg = tiny_decoder(**PRESETS[preset])
  model = jmmkv.random_model(cfg, seed=0, dtype=dtype)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
  bandwidth = read_bandwidth()
  rows = []
  for length in lengths:
    batch = prompt(length, cfg.vocab_size)
    full_ref = None
    for name in policies:
      for ratio in budgets if name != "full" else [1.0]:
        policy = jmmkv.policies.get(name, **SMALL_WINDOW.get(name, {}))
        budget = None if name == "full" else jmmkv.Budget(ratio=ratio)
        kw = dict(max_new_tokens=max_new_tokens, eos_token_id=[])
        jmmkv.generate(model, batch, policy, budget, **kw)  # warm-up: compile everything
        stats = [jmmkv.generate(model, batch, policy, budget, **kw).stats for _ in range(repeats)]
        med = lambda key: statistics.median(s[key] for s in stats)
        decode_ms = (
          statistics.median(s["decode_s"] / max(1, s["decode_steps"]) for s in stats) * 1e3
        )
        s0 = stats[0]
        row = dict(
          length=length,
          policy=name,
          budget=ratio,
          prefill_ms=med("prefill_s") * 1e3,
          compress_ms=med("compress_s") * 1e3,
          decode_ms_per_token=decode_ms,
          kv_bytes_allocated=s0["kv_bytes_allocated"],
          kv_bytes_used=s0["kv_bytes_used"],
          kept_fraction=s0["kept_fraction"],
          floor_ms_per_token=(param_bytes + s0["kv_bytes_allocated"]) / bandwidth * 1e3,
        )
        if name == "full":
          full_ref = row
        if full_ref is not None:
          for key in ("decode_ms_per_token", "kv_bytes_allocated", "kv_bytes_used", "prefill_ms"):
            row[f"{key}_vs_full"] = row[key] / full_ref[key]
        rows.append(row)
        print(_line(row), flush=True)
  meta = dict(
    preset=preset,
    config=PRESETS[preset],
    dtype=dtype,
    max_new_tokens=max_new_tokens,
    repeats=repeats,
    param_bytes=param_bytes,
    read_bandwidth_GBps=bandwidth / 1e9,
    jax=jax.__version__,
    jmmkv=jmmkv.__version__,
    device=str(jax.devices()[0]),
    machine=platform.machine(),
    cpu_count=__import__("os").cpu_count(),
  )
  return dict(meta=meta, rows=rows)


HEADER = (
  f"{'T':>6} {'policy':>10} {'budget':>6} {'prefill ms':>10} {'compr ms':>8} {'decode ms/tok':>13} "
  f"{'x full':>7} {'floor ms':>8} {'KV alloc MiB':>12} {'x full':>7} {'KV used MiB':>11} {'kept':>5}"
)


def _line(r) -> str:
  return (
    f"{r['length']:6d} {r['policy']:>10} {r['budget']:6.2f} {r['prefill_ms']:10.1f} {r['compress_ms']:8.1f} "
    f"{r['decode_ms_per_token']:13.2f} {r.get('decode_ms_per_token_vs_full', float('nan')):7.3f} "
    f"{r['floor_ms_per_token']:8.2f} {r['kv_bytes_allocated'] / 2**20:12.2f} "
    f"{r.get('kv_bytes_allocated_vs_full', float('nan')):7.3f} {r['kv_bytes_used'] / 2**20:11.2f} "
    f"{r['kept_fraction']:5.2f}"
  )


def main(args) -> int:
  policies = list(jmmkv.policies.NAMES) if args.policies == "all" else args.policies.split(",")
  for name in policies:
    jmmkv.policies.get(name)  # unknown names fail before any work
  budgets = [float(b) for b in args.budgets.split(",")]
  for b in budgets:
    jmmkv.Budget(ratio=b)
  if "full" in policies:  # Full first: the other rows are ratios to it
    policies = ["full"] + [p for p in policies if p != "full"]
  print(HEADER)
  result = run(
    args.preset,
    [int(x) for x in args.lengths.split(",")],
    policies,
    budgets,
    args.max_new_tokens,
    args.repeats,
    args.dtype,
  )
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=1)
  print(
    f"wrote {args.out}; decode floor uses a measured read bandwidth of "
    f"{result['meta']['read_bandwidth_GBps']:.1f} GB/s and {result['meta']['param_bytes'] / 2**20:.1f} MiB of params"
  )
  return 0
