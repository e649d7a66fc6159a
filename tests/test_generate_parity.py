"""Greedy jmmkv.generate is token-identical to transformers' generate (PyTorch, fp32, eager)."""

from __future__ import annotations

import numpy as np
import pytest

from hf_models import GENERATE_CONFIG_NAMES, hf_greedy_generate, random_ids

MAX_NEW = 32
PROMPT_LENGTHS = (5, 11, 17)
MIN_MARGIN = 1e-4  # a top-2 logit gap below this makes greedy parity fragile in fp32


def _prompts(seed: int) -> list[list[int]]:
  rng = np.random.default_rng(2000 + seed)
  return [[1] + random_ids(rng, n - 1) for n in PROMPT_LENGTHS]  # BOS + random ids


def _check_margins(margins, name):
  low = min(min(m) for m in margins)
  assert low > MIN_MARGIN, (
    f"{name}: test data has a near tie in HF greedy ({low:.2g}); change the seed"
  )


@pytest.fixture(scope="module")
def hf_reference(tiny_model):
  """(config name) -> (prompts, HF no-EOS greedy tokens), cached for the module."""
  cache = {}

  def get(name):
    if name not in cache:
      prompts = _prompts(0)
      tokens, margins = hf_greedy_generate(tiny_model(name, 0).torch_model, prompts, MAX_NEW)
      _check_margins(margins, name)
      cache[name] = (prompts, tokens)
    return cache[name]

  return get


def _generate(model, prompts, **kw):
  import jmmkv

  out = jmmkv.generate(model, model.prepare(input_ids=prompts), max_new_tokens=MAX_NEW, **kw)
  assert isinstance(out.stats, dict)
  tokens = [[int(t) for t in row] for row in out.tokens]
  assert len(tokens) == len(prompts)
  return tokens


@pytest.mark.parametrize("name", GENERATE_CONFIG_NAMES)
def test_greedy_matches_hf_without_eos(name, hf_reference, jmmkv_model):
  prompts, want = hf_reference(name)
  got = _generate(jmmkv_model(name, 0), prompts, eos_token_id=[])
  for b in range(len(prompts)):
    assert len(got[b]) == MAX_NEW, f"{name} row {b}: {len(got[b])} tokens, expected {MAX_NEW}"
    assert got[b] == want[b], (
      f"{name} row {b} (prompt length {len(prompts[b])}):\n jmmkv {got[b]}\n HF    {want[b]}"
    )


@pytest.mark.parametrize("name", ["llama_tied_llama3"])  # the policy path is model-independent
def test_greedy_full_policy_matches_hf(name, hf_reference, jmmkv_model):
  """An explicit Full policy (with a ratio budget, which Full ignores) changes nothing."""
  import jmmkv

  prompts, want = hf_reference(name)
  got = _generate(
    jmmkv_model(name, 0),
    prompts,
    eos_token_id=[],
    policy=jmmkv.policies.get("full"),
    budget=jmmkv.Budget(ratio=0.5),
  )
  assert got == want


def _first_new_token_step(row: list[int], start: int) -> int:
  """The step whose token does not occur earlier in the row: the first one >= start, else
  the last one before start (tiny random models sometimes repeat a token for long)."""
  fresh = [i for i in range(1, len(row)) if row[i] not in row[:i]]
  later = [i for i in fresh if i >= start]
  if later:
    return later[0]
  if fresh:
    return fresh[-1]
  pytest.fail(f"row {row} repeats one token: change the prompt seed")


def _check_eos_run(name, prompts, eos, tiny_model, jmmkv_model):
  want, margins = hf_greedy_generate(
    tiny_model(name, 0).torch_model, prompts, MAX_NEW, eos_token_id=eos
  )
  _check_margins(margins, name)
  got = _generate(jmmkv_model(name, 0), prompts, eos_token_id=eos)
  eos_set = {eos} if isinstance(eos, int) else set(eos)
  for b in range(len(prompts)):
    assert got[b] == want[b], f"{name} row {b}, eos={eos}:\n jmmkv {got[b]}\n HF    {want[b]}"
    stopped = [i for i, t in enumerate(got[b]) if t in eos_set]
    # ends right after the first EOS (EOS included), or runs to max_new_tokens without one
    assert (stopped and stopped[0] == len(got[b]) - 1) or (not stopped and len(got[b]) == MAX_NEW)
  return got


# Stopping is model-independent (generate's loop): one config each keeps the suite short.
@pytest.mark.parametrize("name", ["llama_gqa"])
def test_greedy_stops_per_row_at_eos(name, hf_reference, tiny_model, jmmkv_model):
  prompts, free = hf_reference(name)
  step = _first_new_token_step(free[0], 5)
  eos = free[0][step]
  got = _check_eos_run(name, prompts, eos, tiny_model, jmmkv_model)
  assert got[0] == free[0][: step + 1] and got[0][-1] == eos


@pytest.mark.parametrize("name", ["qwen2_bias"])
def test_greedy_stops_at_any_of_several_eos(name, hf_reference, tiny_model, jmmkv_model):
  prompts, free = hf_reference(name)
  s1 = _first_new_token_step(free[1], 3)
  s2 = _first_new_token_step(free[2], 8)
  eos = [free[1][s1], free[2][s2]]
  got = _check_eos_run(name, prompts, eos, tiny_model, jmmkv_model)
  assert len(got[1]) <= s1 + 1 and len(got[2]) <= s2 + 1
