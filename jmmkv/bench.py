"""`jmmkv bench`: KV memory and latency of every policy x budget on a random-weight preset.

Per prompt length: prefill ms (statistics and the layer-by-layer compression included), layout
ms (the kept slots re-laid out for decoding: pages or a dense prefix) and decode ms per token (medians over repeats after a warm-up, block_until_ready), KV
bytes allocated / used from the cache arrays, each as a ratio to Full measured in the same run,
and a floor for a decode step: the bytes it must read (parameters + allocated KV) over this
machine's measured read bandwidth (a reduction over a 256 MiB array), and the peak memory of a
whole `jmmkv.generate` call above what was held before it (`jmmkv.memory`: the device's peak
where the backend reports one, else the process's peak RSS on Linux). Prompts mix text and
576-token image spans (modality ids), so multimodal policies see images. Prints a table and
writes JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import jmmkv
import jmmkv.inputs
from jmmkv import memory, runinfo
from jmmkv.generate import (
  as_budget,
  as_policy,
  decode_loop,
  kept_fraction,
  layout_stage,
  prefill_stage,
)
from jmmkv.cache.paged import PagedKVCache
from jmmkv.inputs import Batch
from jmmkv.sampling import Sampling
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
    max_position_embeddings=1 << 20,  # a benchmark of long prompts: no warning past 4096
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


def run_meta(preset: str, model, batch_size: int, max_new_tokens: int, **fields) -> dict:
  """What a benchmark's JSON says of its run: the preset, batch, dtype, ``fields``, versions and
  the machine."""
  return dict(
    preset=preset,
    config=PRESETS[preset],
    batch=batch_size,
    dtype=model.dtype_name,
    max_new_tokens=max_new_tokens,
    **{"versions": runinfo.versions(), **fields},
    device=str(jax.devices()[0]),
    machine=platform.machine(),
    cpu_count=os.cpu_count(),
    peak_memory=memory.method(),
  )


def prompt(
  length: int,
  vocab: int,
  image_tokens: int = 576,
  text_run: int = 64,
  seed: int = 0,
  batch_size: int = 1,
) -> Batch:
  """``batch_size`` prompts of ``length`` tokens: text runs and image spans alternating, text at
  the end (random ids; one seed per row)."""
  mod = np.full(length, TEXT, np.int32)
  pos = text_run
  while pos + image_tokens + text_run <= length:
    mod[pos : pos + image_tokens] = IMAGE
    pos += image_tokens + text_run
  rows = [np.random.default_rng(seed + i).integers(3, vocab, length) for i in range(batch_size)]
  media = np.where(mod == IMAGE, 0, -1).astype(np.int32)
  return Batch(tuple(r.astype(np.int32) for r in rows), (mod,) * batch_size, (media,) * batch_size)


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


def _copy(tree):
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


def _decode_ms(model, logits_BV, cache, max_new_tokens: int, repeats: int):
  """Median decode ms per step over ``repeats`` runs after a warm-up (each on a copy of the
  cache). The first new token comes from the prefill logits: ``max_new_tokens - 1`` steps."""
  kw = dict(
    cfg=model.text_config,
    dtype=model.dtype_name,
    sampling=Sampling(),
    max_new_tokens=max_new_tokens,
  )
  eos = jnp.zeros((0,), jnp.int32)
  times = []
  for i in range(repeats + 1):
    c = jax.block_until_ready(_copy(cache))
    t0 = time.perf_counter()
    jax.block_until_ready(
      decode_loop(model.params["text"], logits_BV, c, jax.random.key(0), eos, **kw)
    )
    if i:  # the first run compiles
      times.append((time.perf_counter() - t0) / max(1, max_new_tokens - 1))
  return statistics.median(times) * 1e3


def run(
  preset: str,
  lengths,
  policies,
  budgets,
  max_new_tokens: int,
  repeats: int,
  dtype: str = "float32",
  batch_size: int = 1,
  compare_hf: bool = False,
):
  """Every policy x budget at every length. Prefill (with compression) runs once per policy and
  budget (compiled ahead of time); the layout (on a copy) and decode are the medians over
  ``repeats`` after a warm-up. Ratios are to Full at the same length."""
  cfg = tiny_decoder(**PRESETS[preset])
  model = jmmkv.random_model(cfg, seed=0, dtype=dtype)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
  bandwidth = read_bandwidth()
  hf_model = None
  if compare_hf:
    from jmmkv import bench_hf

    hf_model = bench_hf.hf_llama_from_jmmkv(model)
  rows = []
  runs = len(lengths) * sum(1 if p == "full" else len(budgets) for p in policies)
  bar = tqdm.tqdm(total=runs, desc="bench", unit="run", file=sys.stderr, leave=False)
  for length in lengths:
    batch = prompt(length, cfg.vocab_size, batch_size=batch_size)
    full_ref = None
    for spec in policies:
      name = jmmkv.policies.spec_kwargs(spec)[0]
      for ratio in budgets if name != "full" else [1.0]:
        policy = jmmkv.policies.from_spec(spec, **SMALL_WINDOW.get(name, {}))
        budget = None if name == "full" else jmmkv.Budget(ratio=ratio)
        padded, logits_BV, stored, storage, prefill_s = prefill_stage(
          model, batch, as_policy(policy), as_budget(budget), max(1, max_new_tokens - 1), True
        )
        layout_s = []
        for _ in range(1 + repeats):  # warm-up (compiles), then the timed runs, each on a copy
          cache, seconds = layout_stage(_copy(stored), storage, "auto")
          layout_s.append(seconds)
        decode_ms = _decode_ms(model, logits_BV, cache, max_new_tokens, repeats)
        row = dict(
          length=length,
          batch=batch_size,
          policy=spec,
          budget=ratio,
          layout="paged" if isinstance(cache, PagedKVCache) else "dense",
          prefill_ms=prefill_s * 1e3,
          layout_ms=statistics.median(layout_s[1:]) * 1e3,
          decode_ms_per_token=decode_ms,
          kv_bytes_allocated=cache.kv_bytes_allocated(),
          kv_bytes_used=cache.kv_bytes_used(),
          kept_fraction=kept_fraction(cache.kept_LBK(), int(padded.lengths_B.sum())),
          floor_ms_per_token=(param_bytes + cache.kv_bytes_allocated()) / bandwidth * 1e3,
        )
        row["layout_vs_prefill"] = row["layout_ms"] / row["prefill_ms"]
        peak = memory.peak_bytes(
          jmmkv.generate,
          model,
          batch,
          policy,
          budget,
          max_new_tokens=max_new_tokens,
          eos_token_id=[],
        )[1]  # a whole generate call (its stages compiled above), from host batch to tokens
        row["peak_bytes"] = peak
        if name == "full":
          full_ref = row
          if hf_model is not None:
            steps = max(1, max_new_tokens - 1)  # as many decode forwards as jmmkv runs
            hf = bench_hf.hf_decode_ms(hf_model, batch.input_ids[0], steps, repeats)
            row["hf_decode_ms_per_token"] = hf["decode_ms_per_token"]
            row["hf_prefill_ms"] = hf["prefill_ms"]
            row["hf_threads"] = hf["threads"]
        if full_ref is not None:
          for key in ("decode_ms_per_token", "kv_bytes_allocated", "kv_bytes_used", "prefill_ms"):
            row[f"{key}_vs_full"] = row[key] / full_ref[key]
          if row["peak_bytes"] and full_ref["peak_bytes"]:
            row["peak_bytes_vs_full"] = row["peak_bytes"] / full_ref["peak_bytes"]
        rows.append(row)
        tqdm.tqdm.write(_line(row), file=sys.stdout)
        bar.update()
  bar.close()
  meta = run_meta(
    preset,
    model,
    batch_size,
    max_new_tokens,
    repeats=repeats,
    param_bytes=param_bytes,
    read_bandwidth_GBps=bandwidth / 1e9,
    versions=runinfo.versions("torch"),
  )
  return dict(meta=meta, rows=rows)


HEADER = (
  f"{'T':>6} {'policy':>24} {'budget':>6} {'layout':>6} {'prefill ms':>10} {'layout ms':>9} "
  f"{'/prefill':>8} {'decode ms/tok':>13} {'x full':>7} {'floor ms':>8} {'KV alloc MiB':>12} "
  f"{'x full':>7} {'KV used MiB':>11} {'kept':>5} {'peak MiB':>9} {'x full':>7}"
)


def _line(r) -> str:
  return (
    f"{r['length']:6d} {r['policy']:>24} {r['budget']:6.2f} {r['layout']:>6} "
    f"{r['prefill_ms']:10.1f} {r['layout_ms']:9.1f} {r['layout_vs_prefill']:8.3f} "
    f"{r['decode_ms_per_token']:13.2f} {r.get('decode_ms_per_token_vs_full', float('nan')):7.3f} "
    f"{r['floor_ms_per_token']:8.2f} {r['kv_bytes_allocated'] / 2**20:12.2f} "
    f"{r.get('kv_bytes_allocated_vs_full', float('nan')):7.3f} {r['kv_bytes_used'] / 2**20:11.2f} "
    f"{r['kept_fraction']:5.2f} {_mib(r['peak_bytes']):>9} "
    f"{r.get('peak_bytes_vs_full', float('nan')):7.3f}"
  )


def _mib(n) -> str:
  return "-" if n is None else f"{n / 2**20:.1f}"


def main(args) -> int:
  from jmmkv.arguments import numbers, ratios
  from jmmkv.files import output_path, write_atomic

  policies = jmmkv.policies.spec_list(args.policies)  # bad arguments fail before any work
  lengths = numbers("4096" if args.lengths is None else args.lengths, "--lengths", int, minimum=1)
  budgets = ratios(args.budgets)
  out = output_path(args.out)
  if args.compare_hf:
    from jmmkv import bench_hf

    bench_hf.require_torch()
  if "full" in policies:  # Full first: the other rows are ratios to it
    policies = ["full"] + [p for p in policies if p != "full"]
  print(HEADER)
  result = run(
    args.preset,
    lengths,
    policies,
    budgets,
    args.max_new_tokens,
    args.repeats,
    args.dtype,
    batch_size=args.batch,
    compare_hf=args.compare_hf,
  )
  for r in result["rows"]:
    if "hf_decode_ms_per_token" in r:
      print(
        f"T={r['length']}: Full decode ms/token jmmkv {r['decode_ms_per_token']:.2f} vs "
        f"transformers (SDPA, DynamicCache, {r['hf_threads']} threads) "
        f"{r['hf_decode_ms_per_token']:.2f}"
      )
  write_atomic(out, json.dumps(result, indent=1))
  print(
    f"wrote {out}; decode floor uses a measured read bandwidth of "
    f"{result['meta']['read_bandwidth_GBps']:.1f} GB/s and {result['meta']['param_bytes'] / 2**20:.1f} MiB of params"
  )
  return 0
