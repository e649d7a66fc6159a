"""generate(): host bucketing -> jitted prefill -> jitted compression -> jitted decode loop.

The decode loop is one `lax.while_loop` over a fixed output buffer with the cache donated; it stops
when every row has produced EOS or ``max_new_tokens`` are out. Compiled code is reused for every
call with the same (batch size, prompt bucket, policy, capacity, max_new_tokens, sampling).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
import time
import warnings
from typing import Any, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jmmkv import inputs, sharding, turns
from jmmkv.cache import kv_cache, paged, policies, stats, stream
from jmmkv.cache.budget import Budget
from jmmkv.cache.policies.base import Context, HostPrompt
from jmmkv.cache.stats import Stats, StatsSpec
from jmmkv.models.configs import DecoderConfig
from jmmkv.models.llama import Decoder, Embedded, last_logits
from jmmkv.sampling import Sampling
from jmmkv.typing import Array


@dataclasses.dataclass
class GenerateOutput:
  tokens: list[list[int]]  # new ids per row, EOS included, nothing after it
  texts: list[str] | None  # decoded tokens when the model has a tokenizer
  stats: dict[str, Any]
  cache: kv_cache.KVCache | None = None  # with return_cache=True
  scores: np.ndarray | None = None  # [B, M, V] float32 logits of each step (output_scores=True)


@flax.struct.dataclass
class _LoopState:
  step: Array  # [] int32 tokens produced so far
  tokens_BM: Array  # [B, M] int32 output buffer, -1 after EOS / unused
  done_B: Array  # [B] bool
  last_B: Array  # [B] int32 last sampled token
  cache: kv_cache.KVCache
  rng: Array
  scores_BMV: Array | None  # float32 logits per step, only with output_scores


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "spec"))
def survey_step(
  params,
  x_BTD,
  positions,
  valid_BT,
  modality_BT,
  past: kv_cache.KVCache | None = None,
  *,
  cfg: DecoderConfig,
  dtype: str,
  spec: StatsSpec,
):
  """A prompt forward that keeps no K/V: the statistics ``spec`` asks for, of every layer
  (`Stats` stacked ``[L', ...]`` over `DecoderConfig.global_layers`), for a policy whose
  ``survey`` needs them before compressing (of a next turn against ``past``: `jmmkv.turns`)."""
  dec = Decoder(cfg, jnp.dtype(dtype))
  keep_stats = lambda index, k, v, st, acc: (acc + (st,), jnp.zeros(()))
  _, sts = dec.apply(
    params,
    x_BTD,
    positions,
    valid_BT,
    modality_BT,
    spec,
    keep_stats,
    (),
    past,
    method=Decoder.prefill,
  )
  return stats.stack(cfg.of_global_layers(sts))  # the others have none


@functools.partial(
  jax.jit, static_argnames=("cfg", "dtype", "spec", "policy", "storage", "append_capacity")
)
def prefill_step(
  params,
  x_BTD,
  positions,
  valid_BT,
  modality_BT,
  lengths_B,
  rope_start_B,
  kept_B,
  survey: Stats,
  *,
  cfg: DecoderConfig,
  dtype: str,
  spec: StatsSpec,
  policy,
  storage: stream.Storage,
  append_capacity: int,
):
  """Prompt forward from embeddings (``positions``: ``[B, T]`` or M-RoPE ``[3, B, T]``) that
  compresses each layer's K/V as soon as its attention is done (`jmmkv.cache.stream`).

  Returns the last valid token's logits ``[B, V]``, the decode cache (empty append buffer) and,
  when ``storage`` is a pool, the `Pool` (the cache's prefix is then empty: `stream.from_pool`).
  """
  dec = Decoder(cfg, jnp.dtype(dtype))
  compressed = len(cfg.global_layers)  # the policy's layers (sliding-window ones keep rings)
  ctx = Context(kept_B, lengths_B, survey, compressed)
  k_shape = (valid_BT.shape[0], cfg.num_kv_heads, valid_BT.shape[1], cfg.head_dim)
  state = (policy.start(ctx), stream.start(storage, compressed, k_shape, jnp.dtype(dtype)))
  hook = stream.on_layer(policy, storage, ctx, valid_BT, modality_BT, lengths_B)
  h_BTD, (_, store) = dec.apply(
    params, x_BTD, positions, valid_BT, modality_BT, spec, hook, state, method=Decoder.prefill
  )
  logits_BV = last_logits(dec, params, h_BTD, lengths_B)
  cache, pool = stream.stored(
    storage, store, lengths_B, rope_start_B, append_capacity, k_shape, jnp.dtype(dtype)
  )
  return logits_BV, cache, pool


@functools.partial(
  jax.jit,
  static_argnames=("cfg", "dtype", "sampling", "max_new_tokens", "output_scores"),
  donate_argnames=("cache",),
)
def decode_loop(
  params,
  first_logits_BV,
  cache: kv_cache.KVCache,
  rng,
  eos_E,
  *,
  cfg: DecoderConfig,
  dtype: str,
  sampling: Sampling,
  max_new_tokens: int,
  output_scores: bool = False,
):
  """Samples up to ``max_new_tokens`` per row from the prefill logits onwards.

  Returns tokens ``[B, M]`` (-1 after EOS and for steps not run), the cache, and the logits of each
  step ``[B, M, V]`` (or None).
  """
  dec = Decoder(cfg, jnp.dtype(dtype))
  b = first_logits_BV.shape[0]

  def emit(state: _LoopState, logits_BV) -> _LoopState:
    tok_B = sampling(logits_BV, jax.random.fold_in(state.rng, state.step))
    out_B = jnp.where(state.done_B, -1, tok_B)
    done_B = state.done_B | jnp.isin(tok_B, eos_E)
    tokens_BM = jax.lax.dynamic_update_slice(state.tokens_BM, out_B[:, None], (0, state.step))
    scores = state.scores_BMV
    if output_scores:
      scores = jax.lax.dynamic_update_slice(
        scores, logits_BV.astype(jnp.float32)[:, None], (0, state.step, 0)
      )
    return state.replace(
      step=state.step + 1, tokens_BM=tokens_BM, done_B=done_B, last_B=tok_B, scores_BMV=scores
    )

  def cond(state: _LoopState):
    return (state.step < max_new_tokens) & ~jnp.all(state.done_B)

  def body(state: _LoopState):
    x_B1D = dec.apply(params, state.last_B[:, None], method=Decoder.embed)
    logits_BV, cache = dec.apply(params, x_B1D, state.cache, method=Decoder.decode)
    return emit(state.replace(cache=cache), logits_BV)

  state = _LoopState(
    step=jnp.zeros((), jnp.int32),
    tokens_BM=jnp.full((b, max_new_tokens), -1, jnp.int32),
    done_B=jnp.zeros((b,), bool),
    last_B=jnp.zeros((b,), jnp.int32),
    cache=cache,
    rng=rng,
    scores_BMV=jnp.zeros((b, max_new_tokens, cfg.vocab_size), jnp.float32)
    if output_scores
    else None,
  )
  state = jax.lax.while_loop(cond, body, emit(state, first_logits_BV))
  return state.tokens_BM, state.cache, state.scores_BMV


as_policy = policies.as_policy  # (kept here: older code imports it from jmmkv.generate)


def as_budget(budget) -> Budget | None:
  """``budget`` as a `Budget`: None stays None, a number is ``Budget(ratio=budget)``."""
  if budget is None or isinstance(budget, Budget):
    return budget
  if isinstance(budget, numbers.Real) and not isinstance(budget, bool):
    return Budget(ratio=budget)
  raise TypeError(
    f"budget must be a jmmkv.Budget, a ratio in (0, 1] or None, got {type(budget).__name__}"
  )


def check_rng(rng) -> None:
  """Raises unless ``rng`` is one JAX PRNG key: typed (`jax.random.key`) or legacy uint32[2]."""
  dtype, shape = getattr(rng, "dtype", None), getattr(rng, "shape", None)
  typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  if (typed and shape == ()) or (not typed and dtype == np.uint32 and shape == (2,)):
    return
  got = type(rng).__name__ if dtype is None else f"{type(rng).__name__} {dtype}{list(shape)}"
  raise TypeError(f"rng must be one JAX PRNG key, e.g. rng=jax.random.key(seed); got {got}")


def _timed(fn, *args, **kwargs):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - t0


def generate(
  model,
  batch: inputs.Batch,
  policy=None,
  budget: Budget | float | None = None,
  *,
  max_new_tokens: int = 64,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  rng: Array | None = None,
  eos_token_id: int | Sequence[int] | None = None,
  return_cache: bool = False,
  output_scores: bool = False,
  layout: str = "auto",
  decode_window: int | None = None,
  cache: kv_cache.KVCache | None = None,
) -> GenerateOutput:
  """Generates up to ``max_new_tokens`` per prompt of ``batch`` (see `jmmkv.Model.prepare`).

  ``policy`` compresses the prompt cache after prefill to ``budget``: a policy object
  (``jmmkv.policies.get("snapkv")``), a name or spec string (``"snapkv:window=8"``), or None
  (`Full`). ``budget``: a `Budget`, a float ratio in (0, 1], or None. ``eos_token_id``
  defaults to the model's EOS ids; pass ``[]`` to never stop early. Sampling with
  ``temperature > 0`` needs an explicit ``rng`` (a `jax.random.key`). Prompts are right-padded to
  a power-of-two bucket; padding is masked everywhere, so each row equals its output alone.
  ``output_scores`` returns each step's logits; ``return_cache`` the final cache.
  ``layout``: the decode prefix as a dense `KVCache` (padded to the largest kept count), a
  `PagedKVCache` (exactly the kept pages; per-layer/-head budgets), or ``"auto"``: paged when it
  saves more than 10% of the prefix bytes. A model loaded with a ``mesh`` runs everything under
  it, with the cache split over batch and KV heads (dense layout: pages mix heads).
  ``decode_window``: keep the K/V of only the last ``decode_window`` generated tokens (the append
  buffer becomes a ring), so that a long answer decodes in a fixed cache: the compressed prompt
  plus a recent window (StreamingLLM's rule on the answer, the prompt's kept tokens in the place
  of its sinks; any policy and layout). None keeps every generated token.
  ``cache``: continue a conversation: ``batch`` is the next turn, prefilled against this cache
  (dense, its answer folded in; it is consumed). With a policy, each layer is compressed again
  as a whole, the budget taken of the whole conversation so far (`jmmkv.turns`); Full keeps
  every token. `jmmkv.Conversation` keeps the turns for you.
  """
  sampling, rng, eos_E = decode_settings(
    model, max_new_tokens, temperature, top_k, top_p, rng, eos_token_id
  )
  fed_back = max(1, max_new_tokens - 1)  # the last sampled token is never fed back
  append_capacity = append_slots(fed_back, decode_window)
  with sharding.context(model.mesh):
    if cache is None:
      logits_BV, cache, prefill_s, layout_s = _prefill_and_compress(
        model,
        batch,
        policy,
        budget,
        append_capacity=append_capacity,
        layout=layout,
        decode_tokens=fed_back,
      )
    else:
      logits_BV, cache, prefill_s = turn_stage(
        model, batch, cache, policy, budget, append_capacity, layout
      )
      layout_s = 0.0
    out, cache, decode_s = decode_stage(
      model, logits_BV, cache, rng, eos_E, sampling, max_new_tokens, output_scores
    )
  return finish(model, out, cache, (prefill_s, layout_s, decode_s), return_cache)


def turn_stage(model, batch, past: kv_cache.KVCache, policy, budget, append_capacity: int, layout):
  """A conversation's next turn (`jmmkv.turns`): ``batch`` prefilled against ``past`` (donated);
  Full keeps every new token, a policy compresses each layer again under the budget of the
  whole conversation. Returns ``(logits_BV, cache, seconds)``."""
  check_batch(batch)
  check_layout(layout)
  if layout == "paged":
    raise ValueError("a next turn keeps the dense layout: use layout='dense' or 'auto'")
  turns.check_past(past, len(batch.input_ids))
  padded = inputs.pad(batch, pad_id=0)
  new_B = np.asarray(padded.lengths_B)
  total_B = np.asarray(past.lengths) + new_B
  policy, budget = resolve(policy, budget, total_B)
  mesh, kw = model.mesh, dict(cfg=model.text_config, dtype=model.dtype_name)
  t0 = time.perf_counter()
  prompt = embed_prompt(model, padded, np.asarray(past.rope_start))
  rope = prompt.rope_start_B
  args = (
    *prompt.args,
    sharding.put_batch(padded.lengths_B, mesh),
    sharding.put_batch(rope, mesh, axis=rope.ndim - 1),
    past,
  )
  if policy.name == "full":
    kw.update(capacity=kv_cache.capacity_with(past, new_B))
  else:
    kept_B = kept_counts(policy, budget, total_B)
    survey = {}
    if policy.survey:
      survey = survey_step(*prompt.args, past, spec=prompt.bound(policy.survey), **kw)
    host = turns.host_prompt(
      past, new_B, padded.modality_BT, kept_B, survey, len(model.text_config.global_layers)
    )
    up = stream.CAPACITY_MULTIPLE
    capacity = min(
      past.capacity + padded.valid_BT.shape[1], -(-policy.plan(host).capacity // up) * up
    )
    args += (sharding.put_batch(kept_B, mesh), survey)
    kw.update(capacity=capacity, policy=policy, spec=prompt.bound(policy.stats))
  held = past.capacity  # before the call consumes it
  with _donation_quiet():
    logits_BV, cache = turns.turn_step(*args, append_capacity=append_capacity, **kw)
    if policy.name != "full":
      # Per-head or per-layer allocations bound a head by far more than any keeps: cut the
      # prefix to its longest (layer, row, head), but not below what the cache held, so that
      # turns settle on one capacity (it grows when a head needs more: a new compilation).
      fit = max(held, kv_cache.compact_capacity(cache))
      cache = kv_cache.shrink(cache, min(cache.capacity, fit))
  logits_BV = jax.block_until_ready(logits_BV)
  return logits_BV, jax.block_until_ready(cache), time.perf_counter() - t0


def append_slots(fed_back: int, decode_window: int | None) -> int:
  """M, the append buffer's slots: the generated tokens fed back, at most ``decode_window``."""
  if decode_window is None:
    return fed_back
  ok = isinstance(decode_window, numbers.Integral) and not isinstance(decode_window, bool)
  if not ok or decode_window < 1:
    raise ValueError(f"decode_window must be a positive integer or None, got {decode_window!r}")
  return min(fed_back, int(decode_window))


def decode_settings(model, max_new_tokens, temperature, top_k, top_p, rng, eos_token_id):
  """`generate`'s decoding arguments checked: ``(Sampling, rng, eos ids [E])``."""
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
  sampling = Sampling(temperature, top_k, top_p)
  if not sampling.greedy and rng is None:
    raise ValueError("sampling with temperature > 0 needs an explicit rng=jax.random.key(seed)")
  if rng is not None:
    check_rng(rng)
  rng = jax.random.key(0) if rng is None else rng
  eos = model.text_config.eos_token_ids if eos_token_id is None else eos_token_id
  eos_E = jnp.asarray(np.atleast_1d(np.asarray(eos, np.int32)).reshape(-1))
  return sampling, rng, eos_E


def decode_stage(model, logits_BV, cache, rng, eos_E, sampling, max_new_tokens, output_scores):
  """The last stage of `generate`: `decode_loop` from the prefill's logits (the cache is
  donated). Returns ``((tokens_BM, scores_BMV or None), cache, seconds)``."""
  cfg = model.text_config
  _warn_past_max_positions(cache.rope_start, max_new_tokens, cfg.max_position_embeddings)
  (tokens_BM, cache, scores), decode_s = _timed(
    decode_loop,
    model.params["text"],
    logits_BV,
    cache,
    rng,
    eos_E,
    cfg=cfg,
    dtype=model.dtype_name,
    sampling=sampling,
    max_new_tokens=max_new_tokens,
    output_scores=output_scores,
  )
  return (tokens_BM, scores), cache, decode_s


def finish(model, out, cache, seconds, return_cache: bool):
  """The `GenerateOutput` of `decode_stage`'s ``out`` and ``cache``; ``seconds``: (prefill,
  layout, decode)."""
  tokens_BM, scores = out
  tokens = [[int(x) for x in row if x >= 0] for row in np.asarray(tokens_BM)]
  texts = model.decode_text(tokens) if model.tokenizer is not None else None
  return GenerateOutput(
    tokens,
    texts,
    _stats(cache, tokens, *seconds),
    cache if return_cache else None,
    None if scores is None else np.asarray(scores),
  )


def _warn_past_max_positions(rope_start, max_new_tokens: int, max_positions: int) -> None:
  """Warns when decoding would feed RoPE positions at or past ``max_positions`` (the model's
  ``max_position_embeddings``): the model never saw them in training."""
  last = int(np.asarray(rope_start).max()) + max_new_tokens - 2  # the last token fed back
  if last >= max_positions:
    warnings.warn(
      f"the prompt plus max_new_tokens={max_new_tokens} reach position {last}, past the model's "
      f"max_position_embeddings={max_positions}: output beyond it may be meaningless (shorten the "
      "prompt or lower max_new_tokens)",
      stacklevel=4,  # the caller of generate (via decode_stage)
    )


@contextlib.contextmanager
def _donation_quiet():
  """A prefix smaller than the prompt cannot reuse the donated buffers: that is expected."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    yield


LAYOUTS = ("auto", "dense", "paged")


def check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


class Prompt(NamedTuple):
  """A padded batch embedded for the prompt forward (`embed_prompt`)."""

  padded: inputs.Padded
  args: tuple  # (params, x_BTD, positions, valid_BT, modality_BT), placed for the mesh
  rope_start_B: np.ndarray  # [B] (or M-RoPE [3, B]): the first new token's position

  def bound(self, spec: StatsSpec) -> StatsSpec:
    """``spec`` with the prompt's static settings (`stats.for_prompt`, e.g. the cross
    entropies' sizes)."""
    valid_BT, mod_BT = np.asarray(self.padded.valid_BT), np.asarray(self.padded.modality_BT)
    return stats.for_prompt(spec, valid_BT, mod_BT)


def check_batch(batch) -> None:
  """A TypeError unless ``batch`` is a `jmmkv.Batch`."""
  if not isinstance(batch, inputs.Batch):
    raise TypeError(f"batch must be a jmmkv Batch (from model.prepare), got {type(batch).__name__}")


def embed_prompt(model, padded: inputs.Padded, rope_offset_B: np.ndarray | None = None) -> Prompt:
  """The prompt's embeddings (vision features spliced in) and positions, on the model's mesh.
  ``rope_offset_B`` ``[B]`` (M-RoPE ``[3, B]``) is added to every row's positions (a next turn
  continues from its cache's `KVCache.rope_start`)."""
  x_BTD = model.embed(padded.ids_BT, padded.media)
  positions = model.positions(padded.ids_BT, padded.valid_BT, padded.media)
  if rope_offset_B is not None:
    positions = positions + np.asarray(rope_offset_B, positions.dtype)[..., None]
  # New tokens continue from the last prompt token's position + 1, on each M-RoPE axis (as
  # transformers' generate; with M-RoPE this can be below the prompt length).
  lengths = np.asarray(padded.lengths_B)
  rows = np.arange(len(lengths))
  rope_start_B = (positions[..., rows, lengths - 1] + 1).astype(np.int32)  # [B], or [3, B]
  mesh = model.mesh
  if isinstance(x_BTD, Embedded):  # DeepStack: [L', B, T, D] additions, batch on axis 1
    put = Embedded(
      sharding.put_batch(x_BTD.x_BTD, mesh), sharding.put_batch(x_BTD.added_LBTD, mesh, 1)
    )
  else:
    put = sharding.put_batch(x_BTD, mesh)
  args = (
    model.params["text"],
    put,
    sharding.put_batch(positions.astype(np.int32), mesh, axis=positions.ndim - 2),
    sharding.put_batch(padded.valid_BT, mesh),
    sharding.put_batch(padded.modality_BT, mesh),
  )
  return Prompt(padded, args, rope_start_B)


def kept_counts(policy, budget: Budget | None, lengths_B: np.ndarray) -> np.ndarray:
  """``[B]`` int32: the budget's kept count per (layer, KV head) of each row (the lengths
  without a budget); a ValueError when ``policy`` needs a budget and has none."""
  if budget is None and policy.needs_budget:
    raise ValueError(
      f"policy {policy.name!r} needs a budget: jmmkv.Budget(ratio=...) or Budget(tokens=...)"
    )
  return np.array([budget.kept(int(n)) for n in lengths_B] if budget else lengths_B, np.int32)


def plan_storage(
  model, prompt: Prompt, policy, kept_B: np.ndarray, survey: Stats, decode_tokens: int
):
  """Where the policy's kept slots go (`stream.storage_for` of its `Plan`; rings for
  sliding-window layers, sized for ``decode_tokens`` generated tokens fed back), and the device
  arguments the compressing prefill takes after the prompt's (lengths, rope start, kept counts,
  survey)."""
  cfg, mesh, padded = model.text_config, model.mesh, prompt.padded
  lengths = np.asarray(padded.lengths_B)
  valid_BT = np.asarray(padded.valid_BT)
  compressed = len(cfg.global_layers)
  host = HostPrompt(
    lengths,
    kept_B,
    valid_BT,
    np.asarray(padded.modality_BT),
    compressed,
    cfg.num_kv_heads,
    {name: np.asarray(x) for name, x in survey.items()},
  )
  rings = cfg.window_layers
  storage = stream.storage_for(
    policy.plan(host),
    compressed,
    len(lengths),
    cfg.num_kv_heads,
    valid_BT.shape[1],
    mesh is None and not rings,  # a pool holds every layer's pages: not with rings
  )
  if rings:
    size = kv_cache.ring_size(cfg.sliding_window, valid_BT.shape[1], decode_tokens)
    storage = dataclasses.replace(storage, ring_layers=rings, window=cfg.sliding_window, ring=size)
  args = (
    sharding.put_batch(padded.lengths_B, mesh),
    sharding.put_batch(prompt.rope_start_B, mesh, axis=prompt.rope_start_B.ndim - 1),
    sharding.put_batch(kept_B, mesh),
    survey,
  )
  return storage, args


def prefill_stage(
  model,
  batch: inputs.Batch,
  policy,
  budget: Budget | None,
  append_capacity: int,
  compile_first: bool = False,
  decode_tokens: int | None = None,
):
  """The first stage of `generate`: host padding, then the jitted prompt forward that compresses
  each layer as it goes (then `layout_stage`, then `decode_loop`; benchmarks time each). A
  policy with a ``survey`` gets a first forward that only computes it (timed with the rest).

  ``policy`` and ``budget`` must be resolved (`as_policy`, `as_budget`). Returns ``(padded,
  logits_BV, (cache, pool), storage, prefill_s)``. ``compile_first`` compiles the embedding and
  the forward ahead of time, outside the timed seconds (benchmarks). ``decode_tokens``: the
  generated tokens that will be fed back (sliding-window rings hold up to their window of them;
  default ``append_capacity``, which may be smaller: a ``decode_window``).
  """
  check_batch(batch)
  padded = inputs.pad(batch, pad_id=0)
  kept_B = kept_counts(policy, budget, np.asarray(padded.lengths_B))
  if compile_first:  # the first embed call compiles it (and the vision tower)
    jax.block_until_ready(model.embed(padded.ids_BT, padded.media))
    model.positions(padded.ids_BT, padded.valid_BT, padded.media)
  t0 = time.perf_counter()
  prompt = embed_prompt(model, padded)
  args = prompt.args
  kw = dict(cfg=model.text_config, dtype=model.dtype_name)
  survey = {}
  if policy.survey:
    if compile_first:
      seconds = time.perf_counter() - t0
      survey_step.lower(
        *jax.block_until_ready(args), spec=prompt.bound(policy.survey), **kw
      ).compile()
      t0 = time.perf_counter() - seconds
    survey = survey_step(*args, spec=prompt.bound(policy.survey), **kw)
  fed = append_capacity if decode_tokens is None else decode_tokens
  storage, more = plan_storage(model, prompt, policy, kept_B, survey, fed)
  args += more
  kw.update(
    spec=prompt.bound(policy.stats), policy=policy, storage=storage, append_capacity=append_capacity
  )
  if compile_first:
    seconds = time.perf_counter() - t0
    prefill_step.lower(*jax.block_until_ready(args), **kw).compile()  # fills the jit cache
    t0 = time.perf_counter() - seconds
  logits_BV, cache, pool = jax.block_until_ready(prefill_step(*args, **kw))
  return padded, logits_BV, (cache, pool), storage, time.perf_counter() - t0


def layout_stage(stored, storage: stream.Storage, layout: str):
  """The second stage of `generate`: the smallest decode layout of what the prefill kept (a
  pool's pages per layer or a dense prefix; a dense prefix cut to its longest (layer, row, head),
  or paged when that saves over 10%). Returns the cache and the seconds taken."""
  check_layout(layout)
  if not jax.sharding.get_abstract_mesh().empty:  # pages mix KV heads: no head split
    if layout == "paged":
      raise ValueError("layout='paged' is not supported under a mesh; use 'dense' or 'auto'")
    layout = "dense"
  cache, pool = stored
  if cache.ring_layers:  # rings are not paged
    if layout == "paged":
      raise ValueError("layout='paged' is not supported with sliding-window layers; use 'dense'")
    layout = "dense"
  t0 = time.perf_counter()
  with _donation_quiet():
    if pool is not None:
      return jax.block_until_ready(
        stream.from_pool(cache, pool, storage, layout)
      ), time.perf_counter() - t0
    kept_LBK = cache.kept_LBK()
    if cache.capacity > 32:  # drop trailing slots no row, layer or head uses
      cache = kv_cache.shrink(cache, kv_cache.compact_capacity(cache))
    size = paged.page_size_for(kept_LBK)
    slot = kv_cache.slot_bytes(cache.append_k)
    if layout == "paged" or (layout == "auto" and paged.pages_pay(kept_LBK, slot, size)):
      plan = paged.page_plan(kept_LBK, cache.capacity, size)
      cache = paged.to_paged(cache, *plan, page_size=size)
    cache = jax.block_until_ready(cache)
  return cache, time.perf_counter() - t0


def resolve(policy, budget, lengths):
  """``(policy, budget)`` as objects (`as_policy`, `as_budget`); `Full` when the budget keeps
  every prompt of ``lengths`` whole (an exact no-op)."""
  policy, budget = policies.as_policy(policy), as_budget(budget)
  if budget is not None and all(budget.kept(int(n)) >= n for n in lengths):
    policy = policies.as_policy(None)
  return policy, budget


def _prefill_and_compress(
  model,
  batch: inputs.Batch,
  policy,
  budget,
  append_capacity: int,
  layout: str = "dense",
  decode_tokens: int | None = None,
):
  check_layout(layout)  # before any work
  check_batch(batch)
  policy, budget = resolve(policy, budget, batch.lengths)
  _, logits_BV, stored, storage, prefill_s = prefill_stage(
    model, batch, policy, budget, append_capacity, decode_tokens=decode_tokens
  )
  cache, layout_s = layout_stage(stored, storage, layout)
  return logits_BV, cache, prefill_s, layout_s


def compress(
  model,
  batch: inputs.Batch,
  policy=None,
  budget: Budget | float | None = None,
  *,
  cache: kv_cache.KVCache | None = None,
) -> kv_cache.KVCache:
  """Prefill + compression only: the compressed cache of ``batch`` (empty append buffer).

  ``policy`` and ``budget`` as `generate`'s (an object, a name / spec string or a ratio).
  ``cache.positions`` / ``cache.modality`` ``[L, B, K, C]`` say what was kept (-1 / 0 where empty);
  ``cache.k`` / ``cache.v`` ``[L, B, K, C, H]`` hold it. ``cache``: ``batch`` is a next turn,
  prefilled against it (consumed) as `generate`'s ``cache`` says.
  """
  with sharding.context(model.mesh):
    if cache is not None:
      return turn_stage(model, batch, cache, policy, budget, 0, "dense")[1]
    return _prefill_and_compress(model, batch, policy, budget, append_capacity=0)[1]


def kept_fraction(kept_LBK, prompt_tokens: int) -> float:
  """Kept prompt KV (``cache.kept_LBK()``) over the prompt's KV (``prompt_tokens`` summed over
  rows), pooled over rows, layers and KV heads."""
  return float(kept_LBK.sum() / (prompt_tokens * kept_LBK.shape[0] * kept_LBK.shape[2]))


def _stats(cache, tokens, prefill_s, layout_s, decode_s):
  kept_LBK = cache.kept_LBK()
  prompt_tokens = int(np.asarray(cache.lengths).sum())  # every turn's, after a next turn
  new_tokens = sum(len(r) for r in tokens)
  decode_steps = max(0, int(cache.index))
  return {
    "prompt_tokens": prompt_tokens,
    "new_tokens": new_tokens,
    "kept_tokens_per_layer_head": kept_LBK,  # [L, B, K]
    "kept_fraction": kept_fraction(kept_LBK, prompt_tokens),
    "kv_bytes_allocated": cache.kv_bytes_allocated(),
    "kv_bytes_used": cache.kv_bytes_used(),
    "prefill_s": prefill_s,  # the prompt forward, the layer-by-layer compression included
    "layout_s": layout_s,  # the kept slots laid out for decoding (pages or a dense prefix)
    "decode_s": decode_s,
    "decode_tokens_per_s": new_tokens / decode_s if decode_s > 0 else float("nan"),
    "decode_steps": decode_steps,
  }
