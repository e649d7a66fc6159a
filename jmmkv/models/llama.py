"""Llama-family decoder (Llama, Vicuna, Qwen2, Qwen3, Mistral, Gemma 3's text) in Flax linen,
used pure-functionally.

Params are an explicit pytree; the prompt K/V come out of `Decoder.prefill` and the decode cache
goes in and out of `Decoder.decode`. Dimension key: see `jmmkv.typing`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmmkv.cache import kv_cache, paged, stats
from jmmkv.kernels import order
from jmmkv.models import attention, rope
from jmmkv.models.configs import DecoderConfig
from jmmkv.models.layers import Einsum, RMSNorm, activation
from jmmkv.typing import IMAGE, Array, DType


# Prompt tokens per MLP chunk in the prefill (a power of two: prompt buckets divide by it).
MLP_CHUNK = 1024


class Embedded(NamedTuple):
  """A prompt's decoder input when the first layers' outputs get more added (Qwen3-VL's
  DeepStack): the embeddings ``[B, T, D]`` and ``added_LBTD``, whose entry i is added to the
  output of layer i (zero away from the visual tokens). `Decoder.prefill` takes it in place of
  the embeddings."""

  x_BTD: Array
  added_LBTD: Array


class Block(nn.Module):
  """Pre-norm attention + gated MLP (SwiGLU; Gemma: gelu-tanh, and norms on both outputs)."""

  cfg: DecoderConfig
  dtype: DType = jnp.float32

  def setup(self):
    c, dt = self.cfg, self.dtype
    d, n, kh, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    norm = lambda: RMSNorm(c.rms_norm_eps, dt, c.norm_plus_one)
    self.input_norm = norm()
    self.q_proj = Einsum((d, n, h), (n, h) if c.qkv_bias else None, dt)
    self.k_proj = Einsum((d, kh, h), (kh, h) if c.qkv_bias else None, dt)
    self.v_proj = Einsum((d, kh, h), (kh, h) if c.qkv_bias else None, dt)
    self.o_proj = Einsum((n, h, d), (d,) if c.o_bias else None, dt)
    self.post_norm = norm()  # before the MLP (Gemma's pre_feedforward_layernorm)
    if c.qk_norm:
      self.q_norm, self.k_norm = norm(), norm()
    if c.sandwich_norms:
      self.attn_out_norm, self.mlp_out_norm = norm(), norm()
    self.gate_proj = Einsum((d, c.intermediate_size), None, dt)
    self.up_proj = Einsum((d, c.intermediate_size), None, dt)
    self.down_proj = Einsum((c.intermediate_size, d), None, dt)

  def _qkv(self, x_BTD, cos_BTH, sin_BTH):
    h_BTD = self.input_norm(x_BTD)
    q_BTNH = self.q_proj("BTD,DNH->BTNH", h_BTD)
    k_BTKH = self.k_proj("BTD,DKH->BTKH", h_BTD)
    if self.cfg.qk_norm:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    q_BTNH = rope.apply_rope(q_BTNH, cos_BTH, sin_BTH)
    k_BTKH = rope.apply_rope(k_BTKH, cos_BTH, sin_BTH)
    if self.cfg.query_pre_attn_scalar is not None:  # attention scales by head_dim ** -0.5
      factor = math.sqrt(self.cfg.head_dim / self.cfg.query_pre_attn_scalar)
      q_BTNH = q_BTNH * jnp.asarray(factor, q_BTNH.dtype)
    v_BTKH = self.v_proj("BTD,DKH->BTKH", h_BTD)
    return q_BTNH, k_BTKH, v_BTKH

  def _finish(self, x_BTD, o_BTNH):
    c = self.cfg
    o_BTA = o_BTNH.reshape(*o_BTNH.shape[:2], -1)  # A = N * H (heads merged)
    attn_BTD = self.o_proj("BTA,AD->BTD", o_BTA, merge_leading=2)
    x_BTD = x_BTD + (self.attn_out_norm(attn_BTD) if c.sandwich_norms else attn_BTD)
    h_BTD = self.post_norm(x_BTD)
    gate_BTF = activation(c.hidden_act)(self.gate_proj("BTD,DF->BTF", h_BTD))
    up_BTF = self.up_proj("BTD,DF->BTF", h_BTD)
    mlp_BTD = self.down_proj("BTF,FD->BTD", gate_BTF * up_BTF)
    return x_BTD + (self.mlp_out_norm(mlp_BTD) if c.sandwich_norms else mlp_BTD)

  def _whole(self, t: int) -> bool:
    """Whether a ``t``-token prompt runs in one piece rather than in `MLP_CHUNK`-token chunks."""
    return t <= MLP_CHUNK or t % MLP_CHUNK != 0 or self.is_initializing()

  def _finish_in_chunks(self, x_BTD, o_BTNH):
    """`_finish` over `MLP_CHUNK`-token chunks in turn (a scan), so that the MLP's ``[B, T, F]``
    activations of a long prompt are never all alive: at most ``[B, MLP_CHUNK, F]``. Each chunk's
    result overwrites its rows of the residual stream (no new ``[B, T, D]`` buffer)."""
    b, t, d = x_BTD.shape
    if self._whole(t):
      return self._finish(x_BTD, o_BTNH)

    def body(block, x_BTD, start):
      chunk = lambda x: jax.lax.dynamic_slice_in_dim(x, start, MLP_CHUNK, axis=1)
      y_BQD = block._finish(chunk(x_BTD), chunk(o_BTNH))
      return jax.lax.dynamic_update_slice_in_dim(x_BTD, y_BQD, start, axis=1), None

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
    x_BTD, _ = scan(self, x_BTD, jnp.arange(0, t, MLP_CHUNK))
    return x_BTD

  def _qkv_in_chunks(self, x_BTD, cos_BTH, sin_BTH):
    """`_qkv` over `MLP_CHUNK`-token chunks in turn, written into q ``[B, T, N, H]`` and K/V
    ``[B, K, T, H]`` buffers: the normed input, the pre-RoPE projections and the transposes
    exist per chunk only. The K/V buffers are materialised once, so the compression reads them
    and XLA does not keep the pre-RoPE keys alive to recompute RoPE inside it."""
    b, t, _ = x_BTD.shape
    c = self.cfg
    if self._whole(t):
      q_BTNH, k_BTKH, v_BTKH = self._qkv(x_BTD, cos_BTH, sin_BTH)
      k_BKTH, v_BKTH = (x.transpose(0, 2, 1, 3) for x in (k_BTKH, v_BTKH))
      return q_BTNH, *(order.after(x, x[0, 0, 0, 0]) for x in (k_BKTH, v_BKTH))

    def body(block, bufs, start):
      q_BTNH, k_BKTH, v_BKTH = bufs
      chunk = lambda x: jax.lax.dynamic_slice_in_dim(x, start, MLP_CHUNK, axis=1)
      q_BQNH, k_BQKH, v_BQKH = block._qkv(chunk(x_BTD), chunk(cos_BTH), chunk(sin_BTH))
      put = lambda buf, y, axis: jax.lax.dynamic_update_slice_in_dim(buf, y, start, axis=axis)
      return (
        put(q_BTNH, q_BQNH.astype(q_BTNH.dtype), 1),
        put(k_BKTH, k_BQKH.transpose(0, 2, 1, 3).astype(k_BKTH.dtype), 2),
        put(v_BKTH, v_BQKH.transpose(0, 2, 1, 3).astype(v_BKTH.dtype), 2),
      ), None

    dt = jnp.dtype(self.dtype)
    # Made from this layer's input, so that XLA allocates them when the layer runs.
    empty = lambda shape: order.after(jnp.zeros(shape, dt), x_BTD[0, 0, 0])
    bufs = (
      empty((b, t, c.num_heads, c.head_dim)),
      empty((b, c.num_kv_heads, t, c.head_dim)),
      empty((b, c.num_kv_heads, t, c.head_dim)),
    )
    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
    bufs, _ = scan(self, bufs, jnp.arange(0, t, MLP_CHUNK))
    return bufs

  def prefill(
    self,
    x_BTD,
    cos_BTH,
    sin_BTH,
    valid_BT,
    modality_BT,
    spec,
    window=None,
    bidirectional_BT=None,
    past: stats.Past | None = None,
  ):
    q_BTNH, k_BKTH, v_BKTH = self._qkv_in_chunks(x_BTD, cos_BTH, sin_BTH)
    o_BTNH, st = stats.attention(
      q_BTNH,
      k_BKTH,
      v_BKTH,
      valid_BT,
      modality_BT,
      spec,
      window=window,
      bidirectional_BT=bidirectional_BT,
      past=past,
    )
    return self._finish_in_chunks(x_BTD, o_BTNH), k_BKTH, v_BKTH, st

  def decode(self, x_B1D, cos_B1H, sin_B1H, cache, layer: int):
    """``cache``: a dense `KVCache` or a `PagedKVCache` (same append buffer, other prefix)."""
    q_B1NH, k_B1KH, v_B1KH = self._qkv(x_B1D, cos_B1H, sin_B1H)
    if layer in self.cfg.window_layers:  # a ring: no append row
      cache = kv_cache.write_ring(cache, layer, k_B1KH[:, 0], v_B1KH[:, 0])
      o_BNH = attention.ring_decode_attention(
        q_B1NH[:, 0],
        cache.layer_k[layer],
        cache.layer_v[layer],
        kv_cache.ring_valid(cache, layer),
      )
      return self._finish(x_B1D, o_BNH[:, None]), cache
    cache = kv_cache.write_append(cache, layer, k_B1KH[:, 0], v_B1KH[:, 0])
    row = cache.append_row(layer)
    b, kh, m = cache.append_k.shape[1:4]
    append_valid_BKM = jnp.broadcast_to(cache.append_valid(cache.index + 1), (b, kh, m))
    append = (cache.append_k[row], cache.append_v[row], append_valid_BKM)
    if isinstance(cache, paged.PagedKVCache):
      o_BNH = attention.paged_decode_attention(
        q_B1NH[:, 0],
        cache.k[layer],
        cache.v[layer],
        cache.positions[layer] >= 0,
        cache.owner[layer],
        *append,
      )
    else:
      o_BNH = attention.decode_attention(
        q_B1NH[:, 0],
        cache.layer_k[layer],
        cache.layer_v[layer],
        cache.layer_positions[layer] >= 0,
        *append,
      )
    return self._finish(x_B1D, o_BNH[:, None]), cache


class Decoder(nn.Module):
  """Embedding, ``num_layers`` blocks (a Python list: each layer is its own cache entry), norm, head."""

  cfg: DecoderConfig
  dtype: DType = jnp.float32

  def setup(self):
    c = self.cfg
    self.embedding = self.param(
      "embedding", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size), self.dtype
    )
    self.layers = [Block(c, self.dtype, name=f"layers_{i}") for i in range(c.num_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_plus_one)
    if not c.tie_word_embeddings:
      self.lm_head = Einsum((c.hidden_size, c.vocab_size), None, self.dtype)

  def __call__(self, ids_BT, positions_BT, key_valid_BT):
    """Full forward (used by `init`): logits ``[B, T, V]`` in float32."""
    h_BTD = self.prefill(self.embed(ids_BT), positions_BT, key_valid_BT)[0]
    return self.unembed(h_BTD)

  def embed(self, ids_BT: Array) -> Array:
    x_BTD = jnp.take(self.embedding, ids_BT, axis=0)
    if self.cfg.embed_scale:  # sqrt(D) rounded to the params' dtype first, as transformers
      x_BTD = x_BTD * jnp.asarray(math.sqrt(self.cfg.hidden_size), jnp.float32).astype(x_BTD.dtype)
    return x_BTD

  def unembed(self, h_BTD: Array) -> Array:
    if self.cfg.tie_word_embeddings:
      logits = jnp.einsum("BTD,VD->BTV", h_BTD, self.embedding, preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head("BTD,DV->BTV", h_BTD).astype(jnp.float32)
    cap = self.cfg.final_logit_softcap
    return logits if cap is None else cap * jnp.tanh(logits / cap)

  def _cos_sin(self, positions):
    """cos / sin of the layers' RoPE, and of `DecoderConfig.local_rope` (None without one)."""
    c = self.cfg
    table = lambda r: rope.cos_sin(
      positions, rope.inv_frequencies(r, c.head_dim), c.mrope_section, c.mrope_interleaved
    )
    return table(c.rope), (table(c.local_rope) if c.local_layers else None)

  def prefill(
    self,
    x_BTD: Array,
    positions: Array,
    valid_BT: Array,
    modality_BT: Array | None = None,
    spec: stats.StatsSpec = stats.NONE,
    on_layer=None,
    state=None,
    past: kv_cache.KVCache | None = None,
  ):
    """Prompt forward from embeddings (or an `Embedded`). ``positions``: ``[B, T]``, or
    ``[3, B, T]`` M-RoPE ids. With a ``past`` cache (dense, no rings, empty append buffer), the
    tokens also attend to its valid slots (a conversation's next turn).

    Without ``on_layer``: returns final-normed hidden ``[B, T, D]``, K/V ``[L, B, K, T, H]`` and
    the `stats.Stats` that ``spec`` asks for, stacked over layers (``{name: [L, ...]}``).
    With it (`jmmkv.cache.stream`): after each layer,
    ``state, token = on_layer(index, k_BKTH, v_BKTH, stats, state)``, where ``token`` is a finite
    float32 scalar computed from everything the callback stored; the next layer's input gets
    ``0 * token`` added to one element, so that it cannot start before the callback is done and
    the layer's K/V can die there (XLA CPU drops optimisation barriers, and schedules work no
    later layer needs as late as it can). Returns the hidden states and the final ``state``.
    """
    added_LBTD = None
    if isinstance(x_BTD, Embedded):
      x_BTD, added_LBTD = x_BTD
    tables = self._cos_sin(positions)
    modality_BT = valid_BT.astype(jnp.int32) if modality_BT is None else modality_BT
    bidirectional_BT = (modality_BT == IMAGE) if self.cfg.bidirectional_images else None
    ks, vs, sts = [], [], []
    for index, block in enumerate(self.layers):
      cos_BTH, sin_BTH = tables[index in self.cfg.local_layers]
      ring = index in self.cfg.window_layers  # no statistics: a policy never scores it
      earlier = None
      if past is not None:
        pos_BKC = past.layer_positions[index]
        earlier = stats.Past(
          past.layer_k[index],
          past.layer_v[index],
          pos_BKC >= 0,
          past.layer_modality[index],
          pos_BKC,
          past.lengths,
        )
      x_BTD, k_BKTH, v_BKTH, st = block.prefill(
        x_BTD,
        cos_BTH,
        sin_BTH,
        valid_BT,
        modality_BT,
        stats.NONE if ring else spec,
        self.cfg.sliding_window if ring else None,
        bidirectional_BT,
        earlier,
      )
      if added_LBTD is not None and index < added_LBTD.shape[0]:
        x_BTD = x_BTD + added_LBTD[index].astype(x_BTD.dtype)
      if on_layer is not None:
        state, token = on_layer(index, k_BKTH, v_BKTH, st, state)
        x_BTD = order.after(x_BTD, token)
        continue
      ks.append(k_BKTH)
      vs.append(v_BKTH)
      sts.append(st)
    if on_layer is not None:
      return self.norm(x_BTD), state
    sts = self.cfg.of_global_layers(sts)  # the others have none
    return self.norm(x_BTD), jnp.stack(ks), jnp.stack(vs), stats.stack(sts)

  def decode(self, x_B1D: Array, cache: kv_cache.KVCache):
    """One new token per row at position ``lengths + index``. Returns logits ``[B, V]`` and the cache."""
    positions_B1 = (cache.rope_start + cache.index)[..., None]  # [B, 1] or M-RoPE [3, B, 1]
    tables = self._cos_sin(positions_B1)
    for layer, block in enumerate(self.layers):
      cos_B1H, sin_B1H = tables[layer in self.cfg.local_layers]
      x_B1D, cache = block.decode(x_B1D, cos_B1H, sin_B1H, cache, layer)
    logits_B1V = self.unembed(self.norm(x_B1D))
    if isinstance(cache, kv_cache.KVCache):
      cache = kv_cache.constrain(cache)  # stays split over batch and KV heads on a mesh
    return logits_B1V[:, 0], cache.replace(index=cache.index + 1)


def last_logits(dec: Decoder, params, h_BTD: Array, lengths_B: Array) -> Array:
  """``[B, V]`` float32: the logits of each row's last valid token (rows right-padded)."""
  h_B1D = jnp.take_along_axis(h_BTD, (lengths_B - 1)[:, None, None], axis=1)
  return dec.apply(params, h_B1D, method=Decoder.unembed)[:, 0]


def init_params(cfg: DecoderConfig, rng: Array, dtype: DType = jnp.float32):
  """Random params (for presets and tests), in the layout `jmmkv.models.convert` produces."""
  ids = jnp.zeros((1, 4), jnp.int32)
  params = Decoder(cfg, dtype).init(rng, ids, jnp.arange(4)[None], jnp.ones((1, 4), bool))
  return jax.tree.map(lambda x: x.astype(dtype), params)
