"""A conversation's next turn, prefilled against the cache of the earlier turns.

The new tokens attend to every valid slot of the cache (`jmmkv.cache.stats.Past`) and, causally,
to each other; their positions continue from the cache's RoPE start (M-RoPE included: the
model's own position ids of the turn, shifted). Each layer's new tokens then join its slots after
the kept ones of each (layer, row, KV head) (`jmmkv.cache.extend.append_tokens`):

- with Full, that is the new cache (it grows by the turn);
- with a policy, the layer is compressed again as a whole, under the budget of the whole
  conversation so far: the policy sees its slots per KV head (`jmmkv.cache.prompt.Heads`: the
  kept slots of the earlier turns, then the new tokens) and statistics of the new turn's queries
  over all of them (an observation window is at most the new turn's tokens; column sums sum the
  new queries only: the earlier turns' queries are gone).

The cache must be dense, without sliding-window rings, with an empty append buffer: a
`jmmkv.compress` result, or a `generate` cache with its answer folded in
(`jmmkv.cache.fold.fold_answer`; `jmmkv.Conversation` does both).
"""

from __future__ import annotations

import functools

import einops
import jax
import jax.numpy as jnp
import numpy as np

from jmmkv.cache import extend, kv_cache, select, stats
from jmmkv.cache.policies.base import Context, HostPrompt
from jmmkv.cache.prompt import Heads, PromptKV
from jmmkv.kernels import order
from jmmkv.models.configs import DecoderConfig
from jmmkv.models.llama import Decoder, last_logits
from jmmkv.typing import PAD, TEXT, Array


def check_past(cache, batch_size: int) -> None:
  """A one-line error unless ``cache`` can take a next turn of ``batch_size`` rows."""
  kv_cache.require_dense(cache, "a next turn")
  if int(cache.index) != 0:
    raise ValueError(
      "the cache still holds an answer in its append buffer: fold it in first "
      "(jmmkv.cache.fold.fold_answer), or use jmmkv.Conversation"
    )
  rows = int(cache.lengths.shape[0])
  if rows != batch_size:
    raise ValueError(f"the cache has {rows} rows, the new turn {batch_size}")


def host_prompt(cache: kv_cache.KVCache, lengths_B, modality_BT, kept_B, survey, num_layers: int):
  """The `HostPrompt` a policy plans a next turn from (NumPy): every token of the conversation
  so far in sequence order, with the modality each kept slot or new token has; a token no
  (layer, head) kept counts as text, so that text-keeping bounds stay above what is kept."""
  old_B = np.asarray(cache.lengths).astype(np.int64)
  n_B = old_B + np.asarray(lengths_B)
  width = int(n_B.max())
  valid_BT = np.arange(width)[None] < n_B[:, None]
  mod_BT = np.where(valid_BT, TEXT, PAD).astype(np.int32)
  pos = np.stack([np.asarray(p) for p in cache.layer_positions])  # [L, B, K, C]
  mod = np.stack([np.asarray(m) for m in cache.layer_modality])
  for b in range(len(n_B)):
    kept = pos[:, b] >= 0
    mod_BT[b, pos[:, b][kept]] = mod[:, b][kept]
    mod_BT[b, old_B[b] : n_B[b]] = np.asarray(modality_BT)[b, : n_B[b] - old_B[b]]
  kh = pos.shape[2]
  host_survey = {name: np.asarray(x) for name, x in survey.items()}
  return HostPrompt(n_B.astype(np.int32), kept_B, valid_BT, mod_BT, num_layers, kh, host_survey)


def _compacted(st_BNS: Array, kept_BK: Array, offset: int) -> Array:
  """A per-key statistic over [the cache's ``offset`` slots | the new tokens] laid out as the
  layer's slots per KV head (kept slots, then the new tokens: `extend.append_tokens`)."""
  b, kh = kept_BK.shape
  s = st_BNS.shape[-1]
  j_S = jnp.arange(s)
  src_BKS = jnp.where(j_S < kept_BK[..., None], j_S, offset + j_S - kept_BK[..., None])
  st_BKGS = einops.rearrange(st_BNS, "B (K G) S -> B K G S", K=kh)
  out = jnp.take_along_axis(st_BKGS, jnp.minimum(src_BKS, s - 1)[:, :, None, :], axis=3)
  return einops.rearrange(out, "B K G S -> B (K G) S")


def on_layer(past, policy, ctx: Context | None, capacity: int, seq_BT, modality_BT, count_B, spec):
  """The decoder's per-layer callback for a next turn (`jmmkv.cache.stream.on_layer`'s
  signature): appends the layer's new tokens after its kept slots and, with a policy (``ctx``
  not None), compresses the result to ``capacity`` slots. The state is (carry, stored layers)."""
  per_key = {x.name for x in spec if x.per_key}

  def step(index, k_BKTH, v_BKTH, st, state):
    carry, store = state
    layer = (
      past.layer_k[index],
      past.layer_v[index],
      past.layer_positions[index],
      past.layer_modality[index],
    )
    c, t = layer[2].shape[2], k_BKTH.shape[2]
    if ctx is None:  # Full: every new token joins
      out = extend.append_tokens(layer, k_BKTH, v_BKTH, seq_BT, modality_BT, count_B, capacity)
      return (carry, store + (out,)), order.token(*out)
    kept_BK = (layer[2] >= 0).sum(-1)
    k, v, pos, mod = extend.append_tokens(
      layer, k_BKTH, v_BKTH, seq_BT, modality_BT, count_B, c + t
    )
    valid_BKS = pos >= 0
    lead = {x: (_compacted(y, kept_BK, c) if x in per_key else y)[None] for x, y in st.items()}
    whole = PromptKV(
      k[None],
      v[None],
      valid_BKS.any(1),
      mod.max(1),
      ctx.lengths_B,
      lead,
      Heads(valid_BKS, mod, pos),
    )
    ordinal = kv_cache.ordinal(index, past.ring_layers)
    kept, carry = policy.compress_layer(whole, ordinal, ctx, capacity, carry)
    if kept.positions is None:
      raise ValueError(f"{policy.name}: keeping every token after a cache needs policy 'full'")
    prefix = select.gather(whole, kept.positions)
    if kept.k is not None:  # merged K/V
      prefix = prefix._replace(k=kept.k, v=kept.v)
    out = tuple(x[0] for x in prefix)
    return (carry, store + (out,)), order.token(*out)

  return step


@functools.partial(
  jax.jit,
  static_argnames=("cfg", "dtype", "capacity", "append_capacity", "policy", "spec"),
  donate_argnames=("past",),
)
def turn_step(
  params,
  x_BTD,
  positions,
  valid_BT,
  modality_BT,
  count_B,
  rope_start_B,
  past: kv_cache.KVCache,
  kept_B=None,
  survey=None,
  *,
  cfg: DecoderConfig,
  dtype: str,
  capacity: int,
  append_capacity: int,
  policy=None,
  spec: stats.StatsSpec = stats.NONE,
):
  """The new turn's forward (embeddings ``x_BTD``, ``positions`` ``[B, T]`` or ``[3, B, T]``
  already continuing from ``past.rope_start``; row b's ``count_B[b]`` tokens) against ``past``
  (donated). Without a ``policy`` every new token joins the prefix; with one, each layer is
  compressed again to the budget's ``kept_B`` over the whole conversation (the statistics of
  ``spec``; MEDA's ``survey`` of every layer). Returns the last new token's logits ``[B, V]``
  and the cache: ``capacity`` prefix slots, lengths moved on, RoPE start ``rope_start_B``, an
  empty append buffer of ``append_capacity`` slots."""
  dec = Decoder(cfg, jnp.dtype(dtype))
  seq_BT = past.lengths[:, None] + jnp.arange(valid_BT.shape[1])[None]
  lengths_B = past.lengths + count_B
  ctx = None
  carry = None
  if policy is not None:
    ctx = Context(kept_B, lengths_B, survey or {}, len(cfg.global_layers))
    carry = policy.start(ctx)
  hook = on_layer(past, policy, ctx, capacity, seq_BT, modality_BT, count_B, spec)
  h_BTD, (_, store) = dec.apply(
    params,
    x_BTD,
    positions,
    valid_BT,
    modality_BT,
    spec,
    hook,
    (carry, ()),
    past,
    method=Decoder.prefill,
  )
  k, v, pos, mod = zip(*store)
  cache = kv_cache.from_layers(k, v, pos, mod, lengths_B, rope_start_B, append_capacity)
  return last_logits(dec, params, h_BTD, count_B), cache
