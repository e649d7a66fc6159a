"""An answer's K/V folded into the prefix: the first step of continuing a conversation from a
cache (a next turn is prefilled against the prefix; issue "Conversations over a compressed
context").

After decoding, the append buffer holds the K/V of the generated tokens fed back (token m in slot
``m mod M``; the last sampled token was never fed back), one write index for all rows, so rows
that stopped early hold tokens past their EOS. `fold_answer` moves each row's own answer tokens
into the prefix as ordinary slots (sequence position ``length + m``, modality text), drops the
rest, and leaves an empty append buffer with the lengths and RoPE start moved past the answer.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jmmkv.cache import extend, kv_cache
from jmmkv.typing import TEXT


def fold_answer(cache: kv_cache.KVCache, answered_B) -> kv_cache.KVCache:
  """``cache`` (dense; as `jmmkv.generate` returns it) with the K/V of each row's answer in the
  prefix. ``answered_B`` ``[B]``: row b's answer length (its tokens up to and including EOS).

  Row b keeps the answer tokens ``m < min(answered_B[b], index)`` still in the buffer (with
  ``decode_window`` only the last M were); its length and RoPE start move on by that many. The
  prefix capacity grows to the next multiple of 32 that holds every (layer, row, KV head)'s
  slots. Not for sliding-window models yet: the decode loop runs every row to the last step, so
  a row that stopped early has lost ring slots to tokens decoded after its EOS.
  """
  kv_cache.require_dense(cache, "fold_answer")
  b, kh, m_slots = cache.append_k.shape[1:4]
  answered = np.asarray(answered_B, np.int64).reshape(-1)
  if answered.shape != (b,) or (answered < 0).any():
    raise ValueError(f"answered_B must be {b} non-negative answer lengths, got {answered_B!r}")
  index = int(cache.index)
  fed_B = np.minimum(answered, index)  # answer tokens whose K/V were computed
  first = max(0, index - m_slots)  # the oldest token still in the buffer
  moved_B = np.maximum(fed_B - first, 0)  # tokens m in [first, fed_B) join the prefix
  lengths_B = np.asarray(cache.lengths).astype(np.int64)
  capacity = kv_cache.capacity_with(cache, moved_B)

  m_T = first + np.arange(int(moved_B.max(initial=0)))  # the answer token of each moved slot
  pos_BT = jnp.asarray(lengths_B[:, None] + m_T[None], jnp.int32)
  mod_BT = jnp.full(pos_BT.shape, TEXT, jnp.int32)
  count_B = jnp.asarray(moved_B, jnp.int32)
  layers = [
    extend.append_tokens(
      (cache.layer_k[l], cache.layer_v[l], cache.layer_positions[l], cache.layer_modality[l]),
      cache.append_k[l][:, :, m_T % m_slots],
      cache.append_v[l][:, :, m_T % m_slots],
      pos_BT,
      mod_BT,
      count_B,
      capacity,
    )
    for l in range(len(cache.layer_k))
  ]
  ks, vs, ps, mods = zip(*layers)
  return kv_cache.constrain(
    cache.replace(
      layer_k=tuple(ks),
      layer_v=tuple(vs),
      layer_positions=tuple(ps),
      layer_modality=tuple(mods),
      append_k=jnp.zeros_like(cache.append_k),
      append_v=jnp.zeros_like(cache.append_v),
      lengths=jnp.asarray(lengths_B + fed_B, jnp.int32),
      rope_start=cache.rope_start + jnp.asarray(fed_B, jnp.int32),
      index=jnp.zeros((), jnp.int32),
    )
  )
