"""A conversation's next turn, prefilled against the cache of the earlier turns.

The new tokens attend to every valid slot of the cache (`jmmkv.cache.stats.Past`) and, causally,
to each other; their positions continue from the cache's RoPE start (M-RoPE included: the
model's own position ids of the turn, shifted). Every new token then joins the prefix after the
kept slots of each (layer, row, KV head) (`jmmkv.cache.extend.append_tokens`), so the cache
grows by the turn: compressing again over the whole cache is the next step. The cache must be
dense, without sliding-window rings, with an empty append buffer: a `jmmkv.compress` result, or
a `generate` cache with its answer folded in (`jmmkv.cache.fold.fold_answer`; `jmmkv.Conversation`
does both).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jmmkv.cache import extend, kv_cache, stats
from jmmkv.kernels import order
from jmmkv.models.configs import DecoderConfig
from jmmkv.models.llama import Decoder, last_logits


def check_past(cache, batch_size: int) -> None:
  """A one-line error unless ``cache`` can take a next turn of ``batch_size`` rows."""
  if not isinstance(cache, kv_cache.KVCache):
    raise TypeError(
      f"cache must be a dense KVCache (generate(..., layout='dense', return_cache=True) or "
      f"jmmkv.compress), got {type(cache).__name__}"
    )
  if cache.ring_layers:
    raise ValueError("a next turn over sliding-window layers (rings) is not supported yet")
  if int(cache.index) != 0:
    raise ValueError(
      "the cache still holds an answer in its append buffer: fold it in first "
      "(jmmkv.cache.fold.fold_answer), or use jmmkv.Conversation"
    )
  rows = int(cache.lengths.shape[0])
  if rows != batch_size:
    raise ValueError(f"the cache has {rows} rows, the new turn {batch_size}")


def turn_capacity(cache: kv_cache.KVCache, lengths_B: np.ndarray) -> int:
  """C: prefix slots (a multiple of 32) that hold every (layer, row, KV head)'s kept slots and
  its row's ``lengths_B`` new tokens."""
  kept_LBK = np.stack([np.asarray(p >= 0).sum(-1) for p in cache.layer_positions])
  need = int((kept_LBK + np.asarray(lengths_B)[None, :, None]).max())
  return max(cache.capacity, kv_cache.capacity_for(need))


@functools.partial(
  jax.jit,
  static_argnames=("cfg", "dtype", "capacity", "append_capacity"),
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
  *,
  cfg: DecoderConfig,
  dtype: str,
  capacity: int,
  append_capacity: int,
):
  """The new turn's forward (embeddings ``x_BTD``, ``positions`` ``[B, T]`` or ``[3, B, T]``
  already continuing from ``past.rope_start``; row b's ``count_B[b]`` tokens) against ``past``
  (donated). Returns the last new token's logits ``[B, V]`` and the cache: every new token after
  the kept slots (``capacity`` slots), lengths moved on, RoPE start ``rope_start_B``, an empty
  append buffer of ``append_capacity`` slots."""
  dec = Decoder(cfg, jnp.dtype(dtype))
  seq_BT = past.lengths[:, None] + jnp.arange(valid_BT.shape[1])[None]

  def on_layer(index, k_BKTH, v_BKTH, st, store):
    layer = (
      past.layer_k[index],
      past.layer_v[index],
      past.layer_positions[index],
      past.layer_modality[index],
    )
    out = extend.append_tokens(layer, k_BKTH, v_BKTH, seq_BT, modality_BT, count_B, capacity)
    return store + (out,), order.token(*out)

  h_BTD, store = dec.apply(
    params,
    x_BTD,
    positions,
    valid_BT,
    modality_BT,
    stats.NONE,
    on_layer,
    (),
    past,
    method=Decoder.prefill,
  )
  k, v, pos, mod = zip(*store)
  cache = kv_cache.from_layers(
    k, v, pos, mod, past.lengths + count_B, rope_start_B, append_capacity
  )
  return last_logits(dec, params, h_BTD, count_B), cache
