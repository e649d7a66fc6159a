"""Run by tests/test_sharding.py in a subprocess with 8 emulated CPU devices (XLA_FLAGS must be
set before jax starts). Prints one JSON object: per (family, policy) the single-device and
sharded results, the shardings seen, and the compiled compression's all-gathers."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
  "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
  " --xla_llvm_disable_expensive_passes=true"
)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"

import contextlib
import importlib
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax
import numpy as np

import jmmkv
from mm_models import build_mm_model, make_case

G = importlib.import_module("jmmkv.generate")
# One policy per family (each costs a single-device and a sharded compile): MEDA (gather and
# merge) and MadaKV (per-head budgets; SnapKV-family gathers take the same code path). Both also get
# the compiled-HLO all-gather check.
POLICIES = {"llava": "meda", "qwen2_vl": "madakv"}
ROWS = {  # four rows: the batch splits over the 4-way "data" axis
  "llava": dict(
    rows=[[3, "image", 5, "image", 2], [2, "image", 6], [7, "image", 3], [5, 4]], images=4
  ),
  "qwen2_vl": dict(
    rows=[[3, "image", 4, "video", 3], [2, "image", 6], [7, "image", 3], [5, 4]],
    images=[(1, 4, 6), (1, 2, 2), (1, 4, 4)],
    videos=[(2, 4, 4)],
  ),
}


def spec(x) -> list:
  return [None if d is None else str(d) for d in x.sharding.spec]


def _big_all_gathers(hlo: str, per_layer: int) -> list:
  """The result shapes of the all-gathers in compiled ``hlo`` larger than ``per_layer``
  elements (one device's share of a layer's K)."""
  big = []
  for shape in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo):
    if int(np.prod([int(n) for n in shape.split(",") if n])) > per_layer:
      big.append(shape)
  return big


@contextlib.contextmanager
def _spying(module, name: str, call):
  """``module.name`` (a jitted stage the library calls through its module) replaced, inside the
  block, by ``call(real, args, kwargs)``, which must return what the stage returns."""
  real = getattr(module, name)
  setattr(module, name, lambda *args, **kw: call(real, args, kw))
  try:
    yield real
  finally:
    setattr(module, name, real)


def kv_all_gathers(model, run):
  """``run()`` (a `jmmkv.generate` or `jmmkv.compress` call on the sharded ``model``) and the
  result shapes of the all-gathers in the compiled prefill it ran (with its layer-by-layer
  compression) that are larger than one device's share of a layer's K. The call's own prefill:
  lowered again with the arguments it was called with, it is the executable already compiled."""
  captured = {}

  def call(real, args, kw):
    captured.update(args=args, kw=kw)
    return real(*args, **kw)

  with _spying(G, "prefill_step", call) as real:
    out = run()
  with jax.set_mesh(model.mesh):
    hlo = real.lower(*captured["args"], **captured["kw"]).compile().as_text()
  cfg = captured["kw"]["cfg"]
  b, t = captured["args"][1].shape[:2]
  return out, _big_all_gathers(hlo, b * cfg.num_kv_heads * t * cfg.head_dim // 8)


def turn_all_gathers(model, run):
  """`kv_all_gathers` of a next turn: `jmmkv.turns.turn_step`, which ``run()`` calls, compiled
  from that call's arguments and run as compiled (it donates the cache, so it cannot be lowered
  again afterwards); a layer's K is the cache's slots and the turn's tokens."""
  captured = {}

  def call(real, args, kw):  # every keyword is static: the executable takes the positional ones
    with jax.set_mesh(model.mesh):
      compiled = real.lower(*args, **kw).compile()
    b, kh, c, h = args[7].layer_k[0].shape  # past: [B, K, C, H]
    captured.update(hlo=compiled.as_text(), per_layer=b * kh * (c + args[1].shape[1]) * h // 8)
    return compiled(*args)

  with _spying(importlib.import_module("jmmkv.turns"), "turn_step", call):
    out = run()
  return out, _big_all_gathers(captured["hlo"], captured["per_layer"])


def main() -> None:
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  out = {"devices": len(jax.devices())}
  for family, policy_name in POLICIES.items():
    hf = build_mm_model(family, 0)
    path = Path(tempfile.mkdtemp()) / family
    hf.save_pretrained(path)
    single, sharded = jmmkv.load(path), jmmkv.load(path, mesh=mesh)
    ckpt = jmmkv.save(single, Path(tempfile.mkdtemp()) / "ckpt")
    restored = jmmkv.load(ckpt, mesh=mesh)
    r = ROWS[family]
    case = make_case(
      hf, family, np.random.default_rng(5), r["rows"], r["images"], r.get("videos", ())
    )
    res = {"params": {}}
    for name in ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"):
      res["params"][name] = spec(sharded.params["text"]["params"]["layers_0"][name]["w"])
    res["params"]["lm_head"] = spec(sharded.params["text"]["params"]["lm_head"]["w"])
    res["restored_q_proj"] = spec(restored.params["text"]["params"]["layers_0"]["q_proj"]["w"])
    logits = [
      m.logits(input_ids=case.ids, attention_mask=case.mask, **case.arrays)
      for m in (single, sharded, restored)
    ]
    mask = case.mask.astype(bool)
    res["logits_max_diff"] = float(np.abs(logits[1] - logits[0])[mask].max())
    res["restored_logits_max_diff"] = float(np.abs(logits[2] - logits[0])[mask].max())
    res["logits_scale"] = float(np.abs(logits[0][mask]).max())
    policy, budget = jmmkv.policies.get(policy_name), jmmkv.Budget(ratio=0.5)
    kw = dict(max_new_tokens=6, eos_token_id=[], output_scores=True, return_cache=True)
    rows = [list(x) for x in case.rows]
    batch = single.prepare(input_ids=rows, **case.arrays)
    got = {"single": jmmkv.generate(single, batch, policy, budget, **kw)}
    batch = sharded.prepare(input_ids=rows, **case.arrays)
    got["sharded"], gathers = kv_all_gathers(
      sharded, lambda: jmmkv.generate(sharded, batch, policy, budget, **kw)
    )
    c = got["sharded"].cache
    res[policy_name] = {
      "tokens_single": got["single"].tokens,
      "tokens_sharded": got["sharded"].tokens,
      "scores_max_diff": float(np.abs(got["single"].scores - got["sharded"].scores).max()),
      "kept_equal": bool(
        np.array_equal(got["single"].stats["kept_tokens_per_layer_head"], c.kept_LBK())
      ),
      "cache_layer_k": spec(c.layer_k[0]),
      "cache_append_k": spec(c.append_k),
      "cache_type": type(c).__name__,
      "kv_all_gathers": gathers,
    }
    if family == "llava":
      res["snapkv_interpret"] = top_positions_check(single, sharded, case)
      res["next_turn"] = turn_check(single, sharded, case, policy, budget)
    out[family] = res
  print("RESULT " + json.dumps(out))


def turn_check(single, sharded, case, policy, budget) -> dict:
  """A conversation's second turn (the policy compressing the whole cache again) on one device
  and on the mesh: its tokens, logits and the cache's sharding."""
  rng = np.random.default_rng(9)
  follow = [[int(x) for x in rng.integers(3, 990, n)] for n in (9, 4, 12, 6)]
  out = {}
  for name, model in (("single", single), ("sharded", sharded)):
    chat = jmmkv.Conversation(
      model, policy, budget, max_new_tokens=4, eos_token_id=[], output_scores=True
    )
    chat.ask(input_ids=[list(x) for x in case.rows], **case.arrays)
    ask = lambda: chat.ask(input_ids=follow)
    answer, gathers = turn_all_gathers(model, ask) if name == "sharded" else (ask(), None)
    out[name] = (answer, chat.cache, gathers)
  (one, _, _), (many, cache, gathers) = out["single"], out["sharded"]
  return {
    "tokens_single": one.tokens,
    "tokens_sharded": many.tokens,
    "scores_max_diff": float(np.abs(one.scores - many.scores).max()),
    "cache_layer_k": spec(cache.layer_k[0]),
    "kv_all_gathers": gathers,
  }


def top_positions_check(single, sharded, case) -> dict:
  """SnapKV (`select.top_positions`) on the kernel path (interpret mode), which runs shard-locally
  under the mesh (`sharding.per_head`): the same kept positions as on one device, and no
  K/V-sized all-gather in the compiled compression. (On CPU the interpret-mode kernel is plain
  HLO that XLA could split anyway; on TPU/GPU a kernel call cannot be split, which is why it runs
  shard-locally. This checks the shard-local path is right, not that it is needed.)"""
  os.environ["JMMKV_KERNELS"] = "interpret"  # read when compression is traced
  try:
    policy, budget = jmmkv.policies.get("snapkv", window=8), jmmkv.Budget(ratio=0.5)
    rows = [list(x) for x in case.rows]
    batch = single.prepare(input_ids=rows, **case.arrays)
    kept = jmmkv.compress(single, batch, policy, budget).positions
    batch = sharded.prepare(input_ids=rows, **case.arrays)
    cache, gathers = kv_all_gathers(sharded, lambda: jmmkv.compress(sharded, batch, policy, budget))
    return {
      "kept_equal": bool(np.array_equal(np.asarray(kept), np.asarray(cache.positions))),
      "kv_all_gathers": gathers,
    }
  finally:
    del os.environ["JMMKV_KERNELS"]


if __name__ == "__main__":
  main()
