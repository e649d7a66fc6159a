"""`jmmkv bench --max-length LIMIT`: the longest prompt each policy x budget fits in LIMIT bytes.

Each candidate length's peak is estimated, not run: running every candidate would be slow on a
CPU and could exhaust the memory being probed. A `jmmkv.generate` call holds, stage by stage:

- survey (MEDA's first pass): parameters, the embeddings, the survey forward's buffers;
- prefill with compression: parameters, the embeddings, the forward's buffers and its outputs
  (the stored cache: a dense prefix per layer or a page pool);
- layout: parameters, the stored cache and its re-laid copy: a pool's pages, or Full's dense
  cache cut to the prompt (`kv_cache.shrink`; no copy when the prompt fills its bucket, nor for
  a dense store as tight as its plan: the donated buffers are reused. A policy keeping fewer
  slots than its plan allows everywhere would be cut too, uncounted);
- decode: parameters and one cache, updated in place (donated), plus one token's activations.
  Below the prefill (which holds the same cache, the embeddings and T-sized activations), so it
  is not estimated.

Survey and prefill bytes are XLA's own figures for the compiled step at the prompt's bucket
(``memory_analysis()``: argument + output + temporary bytes, minus outputs aliased to
arguments). `prefill_stage` runs as in `generate`, but with its jitted steps replaced by stand-ins
that compile them ahead of time and return their output shapes, so nothing T-sized is allocated
but the embeddings. MEDA's layer budgets come from its survey's entropies, unknown without
running it: the stand-in survey returns zeros (equal entropies: every layer keeps the budget's
count; the kept total is the same for any split, only the largest layer differs). The layout
bytes are counted from the prefill's output shapes. Not counted: host-side prompt arrays (bytes
per token) and compiled code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import jmmkv
from jmmkv import memory
from jmmkv import bench
from jmmkv.bench import PRESETS, SMALL_WINDOW, prompt
from jmmkv.cache import kv_cache
from jmmkv.generate import as_budget, as_policy, prefill_stage
from jmmkv.inputs import DEFAULT_MIN_BUCKET
from jmmkv.models.configs import tiny_decoder

# The length grid: the smallest bucket, and the rounding of static capacities
# (`jmmkv.cache.stream.CAPACITY_MULTIPLE`) and decode capacities (`kv_cache.capacity_for`).
STEP = DEFAULT_MIN_BUCKET
MiB = 2**20


def size_text(n: int) -> str:
  """``n`` bytes for people: ``"64.0 KiB"``, ``"1.5 GiB"``."""
  unit = max((u for u in range(4) if n >= 1024**u), default=0)
  return f"{n / 1024**unit:.1f} {['B', 'KiB', 'MiB', 'GiB'][unit]}"


def tree_bytes(tree) -> int:
  """Bytes of the arrays (or shape-dtype structs) of ``tree``."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class Compiled:
  """Jitted stages compiled ahead of time from their arguments: peak bytes and output shapes,
  memoized (for the process) per argument shapes and static arguments: lengths that share a
  bucket and a capacity share one compilation. Counts its own compilations and their seconds."""

  _memo: dict = {}  # the executables themselves are dropped

  def __init__(self):
    self.compilations = 0
    self.seconds = 0.0
    cpu = jax.devices()[0].platform == "cpu"
    # XLA CPU's LLVM optimisation does not change buffer assignment: skipping it compiles ~40%
    # faster with the same memory analysis (the executables are never run).
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    self._options = options if cpu else None

  def analyse(self, fn, args, kwargs) -> tuple[int, object]:
    """``(peak bytes, output shape-dtype structs)`` of ``fn(*args, **kwargs)``."""
    leaves, tree = jax.tree.flatten(args)
    shapes = tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)
    key = (fn, tree, shapes, tuple(sorted(kwargs.items())))
    if key not in self._memo:
      t0 = time.perf_counter()
      traced = fn.trace(*args, **kwargs)
      m = traced.lower().compile(self._options).memory_analysis()
      if m is None:
        raise ValueError(
          f"{jax.devices()[0].platform}: the backend reports no memory analysis of compiled code, "
          "which --max-length estimates from"
        )
      peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
      )
      self._memo[key] = int(peak), traced.out_info
      self.compilations += 1
      self.seconds += time.perf_counter() - t0
      # JAX keeps every executable it compiled, each with its own memory mappings (~300 for the
      # llava-mini prefill): a search's worth passes the kernel's vm.max_map_count (65530) and
      # the next compilation fails ("LLVM compilation error: Cannot allocate memory").
      jax.clear_caches()
    return self._memo[key]


@contextlib.contextmanager
def _stand_ins(compiled: Compiled, record: dict):
  """`jmmkv.generate`'s ``survey_step`` and ``prefill_step`` replaced, inside the block, by
  stand-ins that put their peak bytes in ``record`` and return their output shapes (zeros for
  the survey, whose values the host plan reads)."""
  gen = importlib.import_module("jmmkv.generate")
  survey_step, prefill_step = gen.survey_step, gen.prefill_step

  def stand_in(fn, stage: str, zeros: bool):
    def call(*args, **kwargs):
      record[stage], out = compiled.analyse(fn, args, kwargs)
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out) if zeros else out

    return call

  gen.survey_step = stand_in(survey_step, "survey", True)
  gen.prefill_step = stand_in(prefill_step, "prefill", False)
  try:
    yield
  finally:
    gen.survey_step, gen.prefill_step = survey_step, prefill_step


@dataclasses.dataclass(frozen=True)
class Estimate:
  """The estimated peak of one `jmmkv.generate` call (parameters included)."""

  length: int
  peak_bytes: int
  stages: dict  # stage name -> its bytes (survey, prefill, layout)
  store: str  # how the prefill stores the kept slots: "dense C" or "pool PxS"

  @property
  def peak_stage(self) -> str:
    return max(self.stages, key=self.stages.get)


class Estimator:
  """`Estimate` of `jmmkv.generate` on `jmmkv.bench.prompt` prompts of a given length (a batch of
  ``batch_size`` equal rows) for one model, policy spec and budget ratio (None: Full)."""

  def __init__(
    self,
    model,
    spec: str,
    ratio: float | None,
    batch_size: int,
    max_new_tokens: int,
    compiled: Compiled,
  ):
    name = jmmkv.policies.spec_kwargs(spec)[0]
    self.model, self.batch_size, self.compiled = model, batch_size, compiled
    self.policy = as_policy(jmmkv.policies.from_spec(spec, **SMALL_WINDOW.get(name, {})))
    self.budget = as_budget(ratio)
    self.append_capacity = max(1, max_new_tokens - 1)  # as generate
    self.param_bytes = tree_bytes(model.params)
    self.memo: dict[int, Estimate] = {}

  def __call__(self, length: int) -> Estimate:
    if length not in self.memo:
      self.memo[length] = self._estimate(length)
    return self.memo[length]

  def _estimate(self, length: int) -> Estimate:
    batch = prompt(length, self.model.text_config.vocab_size, batch_size=self.batch_size)
    policy, budget = self.policy, self.budget
    if budget is not None and all(budget.kept(int(n)) >= n for n in batch.lengths):
      policy = as_policy(None)  # as generate: a budget that keeps every prompt whole is Full
    stages = {}
    with _stand_ins(self.compiled, stages):
      _, logits, (cache, pool), storage, _ = prefill_stage(
        self.model, batch, policy, budget, self.append_capacity
      )
    if "prefill" not in stages:
      raise RuntimeError("jmmkv.generate.prefill_stage no longer calls prefill_step: see bench_fit")
    stored = tree_bytes((logits, cache, pool))
    if pool is not None:  # pages or a dense prefix, from the pool's kept slots
      relaid, store = tree_bytes(pool), f"pool {storage.pages}x{storage.page_size}"
    else:  # cut to the longest kept count: known for a store sized by the whole prompt (Full)
      c = kv_cache.capacity_for(min(cache.capacity, int(batch.lengths.max())))
      prefix = (cache.layer_k, cache.layer_v, cache.layer_positions, cache.layer_modality)
      relaid = tree_bytes(prefix) * c // cache.capacity if c < cache.capacity else 0
      store = f"dense {cache.capacity}"
    stages["layout"] = self.param_bytes + stored + relaid
    return Estimate(length, max(stages.values()), stages, store)


def longest_fit(peak, limit: int, max_length: int, step: int = STEP):
  """The longest prompt length on the grid of multiples of ``step`` up to ``max_length`` whose
  ``peak(length)`` is at most ``limit``, every shorter length taken to fit as well: ``(length,
  capped)``, ``capped`` when ``max_length`` fits (the search stopped there); None when ``step``
  tokens do not fit.

  Every bucket (powers of two) is probed, shortest first, at its last two grid lengths: the
  peak need not grow from one bucket to the next (a prompt of up to 512 tokens is one attention
  tile), and Full's layout copies its cache unless the prompt fills its bucket, so the last
  length can need less than the one before. The first bucket that does not fit is probed at its
  first grid length (its T-sized buffers are most often what does not fit), then narrowed on the
  grid by interpolation (inside a bucket the peak grows about linearly with the length), every
  other step a bisection when that did not halve the interval, to a length that fits whose next
  grid length does not.
  """
  top = max_length // step * step
  fits = lambda n: peak(n) <= limit
  bucket_fits = lambda t: fits(t) and (t - step < step or fits(t - step))
  if top < step or not fits(step):
    return None
  lo = step
  while lo < top:
    hi = min(2 * lo, top)  # the next bucket, or as much of it as is searched
    if not bucket_fits(hi):
      break
    lo = hi
  else:
    return lo, True
  if not fits(lo + step):  # most often the new bucket's T-sized buffers alone do not fit
    return lo, False
  lo += step
  if hi - step > lo:  # hi or the length before it does not fit
    if fits(hi - step):
      return hi - step, False
    hi -= step
  bisect = False
  while hi - lo > step:
    flo, fhi = peak(lo), peak(hi)
    guess = (lo + hi) / 2 if bisect or fhi <= flo else lo + (limit - flo) * (hi - lo) / (fhi - flo)
    m = min(hi - step, max(lo + step, int(guess) // step * step))
    width = hi - lo
    if fits(m):
      lo = m
    else:
      hi = m
    bisect = not bisect and hi - lo > width / 2
  return lo, False


def measure(
  model, spec: str, ratio: float | None, length: int, batch_size: int, max_new_tokens: int
):
  """Measured peak bytes of one `jmmkv.generate` call (`jmmkv.memory.peak_bytes`: above what was
  held before it; None when not measured) on the prompts an `Estimator` sees. Measured on the
  host, the call is made once before, to compile every stage (compiling takes host memory)."""
  name = jmmkv.policies.spec_kwargs(spec)[0]
  policy = jmmkv.policies.from_spec(spec, **SMALL_WINDOW.get(name, {}))
  batch = prompt(length, model.text_config.vocab_size, batch_size=batch_size)
  kw = dict(max_new_tokens=max_new_tokens, eos_token_id=[])
  if memory.method() == memory.HOST:
    jmmkv.generate(model, batch, policy, ratio, **kw)
  return memory.peak_bytes(jmmkv.generate, model, batch, policy, ratio, **kw)[1]


def run(
  preset: str,
  limit: int,
  policies,
  budgets,
  max_new_tokens: int = 32,
  dtype: str = "float32",
  batch_size: int = 1,
  max_search_length: int = 1 << 20,
  check_length: int = 3072,
):
  """Per policy x budget (Full once) the longest prompt whose estimated `generate` peak fits in
  ``limit`` bytes (`longest_fit`); then, at ``check_length`` (or the length found, if shorter;
  0: no check), one measured call beside its estimate, in increasing order of the estimate (a
  device's peak counter is never reset: only a call above every earlier one is measured). Full's
  row, when asked for, must come first (the ratios are to it)."""
  t_start = time.perf_counter()
  cfg = tiny_decoder(**PRESETS[preset])
  model = jmmkv.random_model(cfg, seed=0, dtype=dtype)
  compiled = Compiled()
  param_bytes = tree_bytes(model.params)
  searches = []
  for spec in policies:
    name = jmmkv.policies.spec_kwargs(spec)[0]
    for ratio in budgets if name != "full" else [1.0]:
      searches.append((spec, ratio, None if name == "full" else ratio))
  estimators = []
  for spec, ratio, budget in searches:  # a limit below the shortest prompt fails first
    est = Estimator(model, spec, budget, batch_size, max_new_tokens, compiled)
    if est(STEP).peak_bytes > limit:
      raise ValueError(
        f"--max-length {size_text(limit)} is below the estimated peak of the shortest prompt "
        f"({STEP} tokens) with {spec}{'' if budget is None else f' at budget {ratio:g}'}: "
        f"{size_text(est(STEP).peak_bytes)}, {size_text(param_bytes)} of it parameters"
      )
    estimators.append(est)
  bar = tqdm.tqdm(
    total=len(searches) * (2 if check_length else 1),
    desc="bench --max-length",
    unit="step",
    file=sys.stderr,
    leave=False,
  )
  rows, checks, full = [], [], None
  for (spec, ratio, budget), est in zip(searches, estimators):
    length, capped = longest_fit(lambda n: est(n).peak_bytes, limit, max_search_length)
    at = est(length)
    row = dict(
      policy=spec,
      budget=ratio,
      max_length=length,
      capped=capped,
      peak_bytes=at.peak_bytes,
      peak_stage=at.peak_stage,
      stages=at.stages,
      store=at.store,
      next_length=None if capped else length + STEP,
      next_peak_bytes=None if capped else est(length + STEP).peak_bytes,
      probes=[[n, est.memo[n].peak_bytes] for n in sorted(est.memo)],
    )
    if budget is None and full is None:
      full = row
    if full is not None:
      row["max_length_vs_full"] = length / full["max_length"]
    rows.append(row)
    if check_length:
      v = min(check_length, length)
      checks.append((est(v).peak_bytes - param_bytes, v, budget, row))  # the call's own
    bar.update()
  for estimated, v, budget, row in sorted(checks, key=lambda c: c[0]):
    measured = measure(model, row["policy"], budget, v, batch_size, max_new_tokens)
    row["check"] = dict(
      length=v,
      estimated_bytes=estimated,
      measured_bytes=measured,
      measured_vs_estimated=None if measured is None else measured / estimated,
    )
    bar.update()
  bar.close()
  meta = bench.run_meta(
    preset,
    model,
    batch_size,
    max_new_tokens,
    limit_bytes=limit,
    max_search_length=max_search_length,
    grid_step=STEP,
    param_bytes=param_bytes,
    estimate="max over generate's stages of XLA's compiled memory analysis (survey, prefill: "
    "argument + output + temp - alias bytes at the prompt's bucket) and the layout (parameters + "
    "stored cache + its re-laid copy); MEDA with equal layer entropies",
    check_length=check_length,
    compilations=compiled.compilations,
    compile_seconds=compiled.seconds,
    seconds=time.perf_counter() - t_start,
  )
  return dict(meta=meta, rows=rows)


HEADER = (
  f"{'policy':>24} {'budget':>6} {'max T':>8} {'x full':>7} {'peak MiB':>9} {'at':>7} "
  f"{'store':>14} {'check T':>7} {'est MiB':>8} {'meas MiB':>8} {'meas/est':>8}"
)


def line(r) -> str:
  """One table row of `run`'s result row ``r``."""
  check = r.get("check")
  tail = f"{'-':>7} {'-':>8} {'-':>8} {'-':>8}"
  if check is not None:
    measured, ratio = check["measured_bytes"], check["measured_vs_estimated"]
    tail = (
      f"{check['length']:7d} {check['estimated_bytes'] / MiB:8.1f} "
      f"{'-' if measured is None else f'{measured / MiB:.1f}':>8} "
      f"{'-' if ratio is None else f'{ratio:.2f}':>8}"
    )
  return (
    f"{r['policy']:>24} {r['budget']:6.2f} {('>=' if r['capped'] else '') + str(r['max_length']):>8} "
    f"{r.get('max_length_vs_full', float('nan')):7.2f} {r['peak_bytes'] / MiB:9.1f} "
    f"{r['peak_stage']:>7} {r['store']:>14} {tail}"
  )


def main(args) -> int:
  """``jmmkv bench --max-length``: arguments checked before any work, then `run`."""
  from jmmkv.arguments import byte_size, ratios
  from jmmkv.files import output_path, write_atomic

  limit = byte_size(args.max_length, "--max-length")
  if args.lengths is not None:
    raise ValueError("--lengths and --max-length exclude each other: --max-length searches lengths")
  if args.compare_hf:
    raise ValueError("--compare-hf times decoding, which --max-length does not run")
  if args.max_search_length < STEP:
    raise ValueError(f"--max-search-length must be >= {STEP}, got {args.max_search_length}")
  if args.check_length < 0:
    raise ValueError(f"--check-length must be >= 0 (0: no check), got {args.check_length}")
  policies = jmmkv.policies.spec_list(args.policies)
  budgets = ratios(args.budgets)
  out = output_path(args.out)
  if "full" in policies:  # Full first: the other rows are ratios to it
    policies = ["full"] + [p for p in policies if p != "full"]
  result = run(
    args.preset,
    limit,
    policies,
    budgets,
    args.max_new_tokens,
    args.dtype,
    args.batch,
    args.max_search_length,
    args.check_length,
  )
  write_atomic(out, json.dumps(result, indent=1))
  print(HEADER)
  for r in result["rows"]:
    print(line(r))
  meta = result["meta"]
  print(
    f"wrote {out}; limit {size_text(limit)}, {size_text(meta['param_bytes'])} of it "
    f"parameters; max T: the longest prompt (a multiple of {STEP}) whose estimated peak fits; "
    f"peak MiB: that estimate, parameters included, at its largest stage; check: the peak of one "
    f"generate call above what it held before, estimated and measured ({meta['peak_memory']}); "
    f"{meta['compilations']} compilations, {meta['seconds']:.0f} s"
  )
  return 0
