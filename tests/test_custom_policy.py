"""docs/adding_a_policy.md's example runs as written and keeps what it says; register() errors."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from references import stats_ref

import jmmkv
from jmmkv.cache import policies


def _doc_blocks() -> list[str]:
  text = (REPO_ROOT / "docs" / "adding_a_policy.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert len(blocks) == 2
  return blocks


def _run_block(index: int) -> dict:
  namespace: dict = {}
  exec(compile(_doc_blocks()[index], "adding_a_policy.md", "exec"), namespace)
  return namespace


@pytest.fixture
def knorm():
  yield _run_block(0)["KNorm"]
  policies.POLICIES.pop("knorm", None)


@pytest.fixture
def peak():
  yield _run_block(1)["PeakAttention"]
  policies.POLICIES.pop("peak", None)


@pytest.mark.parametrize("seed", [0, 1])
def test_documented_statistic_keeps_the_most_attended_keys(peak, jmmkv_model, tiny_model, seed):
  """The second example (a policy with a `ProbabilityStatistic` of its own) against the largest
  probability per key of transformers' own eager attention, row by row (no padding there)."""
  model = jmmkv_model("llama_gqa", seed)
  hf = tiny_model("llama_gqa", seed).torch_model
  rng = np.random.default_rng(seed)
  rows = [rng.integers(3, 200, n).tolist() for n in (41, 26)]
  batch = model.prepare(input_ids=rows)
  cache = jmmkv.compress(model, batch, jmmkv.policies.get("peak"), jmmkv.Budget(ratio=0.3))
  checked = 0
  for b, row in enumerate(rows):
    n, keep = len(row), int(np.ceil(0.3 * len(row)))
    layers = stats_ref.capture(hf, "LlamaAttention", input_ids=torch.tensor([row]))
    for layer, (probs, _, k, _) in enumerate(layers):
      kh = k.shape[1]
      peak_NT = np.asarray(probs[0], np.float64).max(axis=1)  # [N, T] over queries
      score_KT = peak_NT.reshape(kh, -1, n).mean(axis=1)
      for h in range(kh):
        got = np.asarray(cache.positions[layer, b, h])
        kept = got[got >= 0]
        assert len(kept) == keep and np.all(np.diff(kept) > 0)
        evicted = np.setdiff1d(np.arange(n), kept)
        s = score_KT[h]
        assert s[kept].min() >= s[evicted].max() - 1e-6, (layer, b, h)
        checked += 1
  assert checked == 2 * len(layers) * kh


@pytest.mark.parametrize("seed", [0, 1])
def test_documented_policy_keeps_the_smallest_key_norms(knorm, jmmkv_model, seed):
  model = jmmkv_model("llama_gqa", seed)
  rng = np.random.default_rng(seed)
  rows = [rng.integers(3, 200, n).tolist() for n in (37, 29)]
  batch = model.prepare(input_ids=rows)
  full = jmmkv.compress(model, batch)  # every prompt key, in position order
  budget = jmmkv.Budget(ratio=0.25)
  cache = jmmkv.compress(model, batch, jmmkv.policies.get("knorm"), budget)
  # The scorer under AdaKV's head allocation, by name (one line): each layer keeps K * n in all.
  ada = jmmkv.compress(model, batch, jmmkv.policies.get("adakv", scorer="knorm"), budget)
  keys = np.asarray(full.k, np.float64)  # [L, B, K, C, H]
  l, _, kh = keys.shape[:3]
  for b, row in enumerate(rows):
    n, keep = len(row), int(np.ceil(0.25 * len(row)))
    norms = np.linalg.norm(keys[:, b, :, :n], axis=-1)  # [L, K, n]
    assert (ada.kept_LBK()[:, b].sum(-1) == kh * keep).all()
    for layer in range(l):
      for h in range(kh):
        nk = norms[layer, h]  # near-ties (fp32 vs fp64 norms) may go either way
        for c, count in ((cache, keep), (ada, None)):
          got = np.asarray(c.positions[layer, b, h])
          kept = got[got >= 0]
          assert count is None or len(kept) == count
          assert np.all(np.diff(kept) > 0)  # ascending, no repeats
          evicted = np.setdiff1d(np.arange(n), kept)
          if len(kept) and len(evicted):
            assert nk[kept].max() <= nk[evicted].min() + 1e-5 * nk.max()
  out = jmmkv.generate(
    model,
    batch,
    jmmkv.policies.get("knorm"),
    jmmkv.Budget(ratio=0.25),
    max_new_tokens=3,
    eos_token_id=[],
  )
  assert [len(t) for t in out.tokens] == [3, 3]


def test_register_rejects_what_is_not_a_policy():
  from jmmkv.cache.policies.base import Scorer

  @dataclasses.dataclass  # not frozen
  class Loose(Scorer):
    name = "loose"

  with pytest.raises(TypeError, match="frozen dataclass"):
    policies.register("loose", Loose)
  with pytest.raises(
    TypeError, match="lacks name, stats, survey, needs_budget, plan, start, compress_layer"
  ):
    policies.register("nothing", dataclasses.dataclass(frozen=True)(type("N", (), {})))
  with pytest.raises(ValueError, match="already exists"):
    policies.register("snapkv", policies.POLICIES["h2o"])
  assert "loose" not in policies.POLICIES


def test_policy_specs_parse_values_and_reject_bad_ones():
  assert jmmkv.policies.spec_kwargs("lookm") == ("lookm", {})
  name, kw = jmmkv.policies.spec_kwargs(" meda:keep_all_text=false:split=(1, 1):variant=code ")
  assert (name, kw) == ("meda", dict(keep_all_text=False, split=(1, 1), variant="code"))
  policy = jmmkv.policies.from_spec("lookm:merge=none:recent_ratio=0.3", important_ratio=0.2)
  assert (policy.merge, policy.recent_ratio, policy.important_ratio) == (None, 0.3, 0.2)
  assert jmmkv.policies.from_spec("snapkv:window=8", window=32).window == 8  # spec wins
  assert jmmkv.policies.setting("w=[1, null]", "--hp") == ("w", [1, None])  # JSON
  assert jmmkv.policies.setting("v=code", "--hp") == ("v", "code")  # a bare word
  specs = jmmkv.policies.split_specs("full, meda:split=(1,1):variant=code,h2o:x=[1,2]")
  assert specs == ["full", "meda:split=(1,1):variant=code", "h2o:x=[1,2]"]
  assert jmmkv.policies.from_spec(specs[1]).split == (1, 1)
  with pytest.raises(ValueError, match="expected key=value"):
    jmmkv.policies.spec_kwargs("lookm:keep_all_text")
  with pytest.raises(ValueError, match="--hp: expected key=value"):
    jmmkv.policies.setting("=1", "--hp")
  with pytest.raises(ValueError, match="unknown policy"):
    jmmkv.policies.from_spec("nope:x=1")
  with pytest.raises(ValueError, match="^policy 'h2o' has no setting 'bogus'; its settings: "):
    jmmkv.policies.from_spec("h2o:bogus=1")


def test_specs_take_several_settings_separated_by_commas():
  """``snapkv:window=8,kernel=5`` is one spec, alone and inside a comma-separated list."""
  P = jmmkv.policies
  assert P.spec_kwargs("snapkv:window=8,kernel=5") == ("snapkv", {"window": 8, "kernel": 5})
  assert P.spec_kwargs("meda:split=(1,1),merge=false:variant=code") == (
    "meda",
    {"split": (1, 1), "merge": False, "variant": "code"},
  )
  policy = P.from_spec("snapkv:window=8,kernel=5")
  assert (policy.window, policy.kernel) == (8, 5)
  assert P.spec_list("full,snapkv:window=8,kernel=5,h2o") == [
    "full",
    "snapkv:window=8,kernel=5",
    "h2o",
  ]
  assert P.spec_list("lookm:merge=none,meda:split=(1,1),variant=code") == [
    "lookm:merge=none",
    "meda:split=(1,1),variant=code",
  ]
  with pytest.raises(ValueError, match="setting 'window=8' comes before any policy name"):
    P.spec_list("window=8,snapkv")
  with pytest.raises(ValueError, match=r"expected key=value, got '1' .*split=\(1,1\)"):
    P.from_spec("meda:split=1,1")


@pytest.mark.parametrize(
  "name, hp, message",
  [
    (
      "snapkv",
      {"kernal": 5},
      "policy 'snapkv' has no setting 'kernal'; its settings: window, kernel, pooling, gqa",
    ),
    ("full", {"window": 8}, "policy 'full' has no setting 'window'; it takes none"),
    (
      "adakv",
      {"beta": 1},
      "policy 'adakv' has no setting 'beta'; its settings: alpha_safeguard, scorer, window, "
      "kernel, pooling, gqa",
    ),
  ],
)
def test_an_unknown_setting_lists_the_valid_ones(name, hp, message):
  with pytest.raises(ValueError) as e:
    jmmkv.policies.get(name, **hp)
  assert str(e.value) == message


def test_every_policy_takes_exactly_its_listed_settings():
  for name in jmmkv.policies.NAMES:
    for key in jmmkv.policies.settings(name):  # each listed setting is accepted as it is
      default = jmmkv.policies.get(name)
      owner = default if hasattr(default, key) else default.scorer  # wrappers route to it
      value = getattr(owner, key)
      jmmkv.policies.get(name, **{key: value})


@pytest.mark.parametrize(
  "spec, match",
  [
    ("meda:merge=pivot", "merge must be true or false, got 'pivot'"),
    ("meda:keep_all_text=1", "keep_all_text must be true or false"),
    ("madakv:mpa=no", "mpa must be true or false"),
    ("lookm:merge=3", "merge must be a string or None"),
    ("snapkv:window=32.0", "window must be an integer"),
    ("adakv:window=true", "window must be an integer"),
    ("streaming:sinks=4.5", "sinks must be an integer"),
    ("pyramidkv:beta=NaN", "beta must be a finite number"),
    ("lookm:recent_ratio=Infinity", "recent_ratio must be a finite number"),
    ("h2o:gqa=1", "gqa must be a string"),
    ("meda:split=7", "split must be a tuple or None"),
  ],
)
def test_settings_of_the_wrong_type_are_refused(spec, match):
  with pytest.raises(ValueError, match=match):
    jmmkv.policies.from_spec(spec)


def test_every_bool_and_int_setting_refuses_a_string():
  """No built-in policy reads a string such as "no" as true (or a float as an integer)."""
  import dataclasses

  for name in jmmkv.policies.NAMES:
    cls = jmmkv.policies.POLICIES[name]
    for f in dataclasses.fields(cls):
      if f.type in ("bool", "int"):
        with pytest.raises(ValueError, match=f.name):
          jmmkv.policies.get(name, **{f.name: "no"})
      if f.type == "int":
        with pytest.raises(ValueError, match=f.name):
          jmmkv.policies.get(name, **{f.name: 2.0})


def test_a_list_for_a_tuple_setting_becomes_a_hashable_tuple():
  policy = jmmkv.policies.from_spec("meda:split=[1,1]")  # JSON, as `setting` reads it first
  assert policy.split == (1, 1) and hash(policy) == hash(jmmkv.policies.get("meda", split=(1, 1)))
