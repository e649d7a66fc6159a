"""`generate_each`: one batch generated under several (policy, budget) pairs from one prompt forward.

A policy changes what the cache keeps, never the prompt's forward: every layer's attention reads
the whole prompt whatever the policy keeps (`jmmkv.cache.stream`). So a comparison of policies on
the same prompts needs one forward, not one per pair: `capture_step` keeps every layer's full
K/V and the union of the policies' statistics, then each policy compresses them layer by layer
through the driver `generate` uses (`compress_step`), and decodes. Each output equals
`jmmkv.generate`'s for its pair (greedy): the attention with probability statistics does the same
arithmetic as without. Pairs whose statistics conflict (one name, different settings, e.g. two
observation windows) get one forward per group. The forward holds every layer's full K/V, as an
uncompressed prefill does: this is for benchmarks over many policies, not for fitting long prompts.
"""

from __future__ import annotations

import functools
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmmkv.generate import (
  GenerateOutput,
  check_batch,
  check_layout,
  decode_settings,
  decode_stage,
  embed_prompt,
  finish,
  kept_counts,
  last_logits,
  layout_stage,
  plan_storage,
  resolve,
)
from jmmkv import inputs, sharding
from jmmkv.cache import kv_cache, stats, stream
from jmmkv.cache.policies.base import Context
from jmmkv.cache.stats import Stats, StatsSpec
from jmmkv.models.configs import DecoderConfig
from jmmkv.models.llama import Decoder


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "spec"))
def capture_step(
  params,
  x_BTD,
  positions,
  valid_BT,
  modality_BT,
  lengths_B,
  *,
  cfg: DecoderConfig,
  dtype: str,
  spec: StatsSpec,
):
  """The prompt forward keeping everything: the last valid token's logits ``[B, V]``, each
  layer's K/V (tuples of ``[B, K, T, H]``: no stacked copy) and the ``spec`` statistics
  ``{name: [L, ...]}``."""
  dec = Decoder(cfg, jnp.dtype(dtype))
  keep = lambda index, k, v, st, acc: (acc + ((k, v, st),), jnp.zeros(()))
  h_BTD, layers = dec.apply(
    params, x_BTD, positions, valid_BT, modality_BT, spec, keep, (), method=Decoder.prefill
  )
  ks, vs, sts = zip(*layers)
  sts = cfg.of_global_layers(sts)  # the others have none
  return last_logits(dec, params, h_BTD, lengths_B), ks, vs, stats.stack(sts)


@functools.partial(jax.jit, static_argnames=("policy", "storage", "append_capacity"))
def compress_step(
  ks: tuple,
  vs: tuple,
  own: Stats,
  valid_BT,
  modality_BT,
  lengths_B,
  rope_start_B,
  kept_B,
  survey: Stats,
  *,
  policy,
  storage: stream.Storage,
  append_capacity: int,
):
  """What `generate.prefill_step` stores, from captured K/V (per layer ``[B, K, T, H]``) and
  statistics (``own``: the policy's, ``[L', ...]`` over the layers it compresses): the decode
  cache and, for a pool, the `Pool`."""
  shape, dtype, rings = ks[0].shape, ks[0].dtype, storage.ring_layers
  compressed = len(ks) - len(rings)
  ctx = Context(kept_B, lengths_B, survey, compressed)
  state = (policy.start(ctx), stream.start(storage, compressed, shape, dtype))
  hook = stream.on_layer(policy, storage, ctx, valid_BT, modality_BT, lengths_B)
  for index in range(len(ks)):
    at = kv_cache.ordinal(index, rings)
    layer_stats = {} if index in rings else {name: x[at] for name, x in own.items()}
    state, _ = hook(index, ks[index], vs[index], layer_stats, state)
  return stream.stored(storage, state[1], lengths_B, rope_start_B, append_capacity, shape, dtype)


def _pick(st: Stats, spec: StatsSpec) -> Stats:
  return {x.name: st[x.name] for x in spec}


def groups(specs: Sequence[StatsSpec]) -> list[tuple[list[int], StatsSpec]]:
  """The pairs' indices in groups whose statistics can be computed together (no name with two
  settings), each with its union; in order of first appearance."""
  out: list[tuple[list[int], dict]] = []
  for i, spec in enumerate(specs):
    for members, union in out:
      if all(union.get(x.name, x) == x for x in spec):
        members.append(i)
        union.update({x.name: x for x in spec})
        break
    else:
      out.append(([i], {x.name: x for x in spec}))
  return [(members, stats.spec(*union.values())) for members, union in out]


def iter_each(
  model,
  batch,
  jobs: Sequence[tuple],
  *,
  max_new_tokens: int = 64,
  eos_token_id: int | Sequence[int] | None = None,
  layout: str = "auto",
  return_cache: bool = False,
) -> Iterator[tuple[int, GenerateOutput]]:
  """`generate_each`'s outputs as they are made: ``(index in jobs, output)``, grouped by shared
  forward (so a caller can reduce each cache before the next is made)."""
  sampling, rng, eos_E = decode_settings(model, max_new_tokens, 0.0, None, None, None, eos_token_id)
  check_layout(layout)
  check_batch(batch)
  padded = inputs.pad(batch, pad_id=0)
  lengths = np.asarray(padded.lengths_B)
  resolved = [resolve(p, b, lengths) for p, b in jobs]
  kept = [kept_counts(p, b, lengths) for p, b in resolved]  # a missing budget fails here
  kw = dict(cfg=model.text_config, dtype=model.dtype_name)
  with sharding.context(model.mesh):
    prompt = embed_prompt(model, padded)
    wanted = [prompt.bound(p.stats | p.survey) for p, _ in resolved]
    lengths_B = sharding.put_batch(padded.lengths_B, model.mesh)
    for members, union in groups(wanted):
      t0 = time.perf_counter()
      logits_BV, k, v, st = jax.block_until_ready(
        capture_step(*prompt.args, lengths_B, spec=union, **kw)
      )
      forward_s = time.perf_counter() - t0
      for i in members:
        policy = resolved[i][0]
        storage, more = plan_storage(
          model,
          prompt,
          policy,
          kept[i],
          _pick(st, prompt.bound(policy.survey)),
          max(1, max_new_tokens - 1),
        )
        t0 = time.perf_counter()
        stored = jax.block_until_ready(
          compress_step(
            k,
            v,
            _pick(st, prompt.bound(policy.stats)),
            *prompt.args[3:],
            *more,
            policy=policy,
            storage=storage,
            append_capacity=max(1, max_new_tokens - 1),
          )
        )
        compress_s = time.perf_counter() - t0
        cache, layout_s = layout_stage(stored, storage, layout)
        out, cache, decode_s = decode_stage(
          model, logits_BV, cache, rng, eos_E, sampling, max_new_tokens, False
        )
        seconds = (forward_s + compress_s, layout_s, decode_s)
        done = finish(model, out, cache, seconds, return_cache)
        done.stats["compress_s"] = compress_s
        yield i, done
      del k, v, st  # this group's full K/V


def generate_each(model, batch, jobs: Sequence[tuple], **options) -> list[GenerateOutput]:
  """``[jmmkv.generate(model, batch, policy, budget, ...) for policy, budget in jobs]`` (greedy),
  from one prompt forward per group of pairs (module docstring). ``jobs``: (policy, budget)
  pairs as `generate` takes them; ``options``: `iter_each`'s (``max_new_tokens``,
  ``eos_token_id``, ``layout``, ``return_cache``). Each output's ``stats["prefill_s"]`` is the
  shared forward's seconds plus its own compression's (``stats["compress_s"]``). Errors in
  ``jobs`` are raised before any work."""
  outs: list = [None] * len(jobs)
  for i, out in iter_each(model, batch, jobs, **options):
    outs[i] = out
  return outs


def kept_mask(cache, t: int) -> np.ndarray:
  """``[L, B, K, t]`` bool (NumPy): the prompt positions below ``t`` that each (layer, row, KV
  head) of a dense or paged ``cache`` kept."""
  _, b, kh = cache.append_k.shape[:3]
  out = np.zeros((len(cache.positions), b, kh, t), bool)
  if hasattr(cache, "owner"):  # PagedKVCache: pages owned by b * K + head
    for layer, (owner, pos) in enumerate(zip(cache.owner, cache.positions)):
      owner, pos = np.asarray(owner), np.asarray(pos)
      for page in np.nonzero(owner < b * kh)[0]:
        p = pos[page][(pos[page] >= 0) & (pos[page] < t)]
        out[layer, owner[page] // kh, owner[page] % kh, p] = True
  else:
    pos = np.asarray(cache.positions)  # [L, B, K, C]
    ll, bb, kk, cc = np.nonzero((pos >= 0) & (pos < t))
    out[ll, bb, kk, pos[ll, bb, kk, cc]] = True
  return out
