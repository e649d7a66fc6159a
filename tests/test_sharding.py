"""Sharded generation on 8 emulated CPU devices equals single-device generation, with params
split over heads / MLP width and the cache over batch and KV heads (tests/sharded_check.py runs
in a subprocess: the device count is fixed when jax starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jmmkv
from jmmkv import sharding

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def result():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
    [sys.executable, str(HERE / "sharded_check.py")],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_params_are_split(result, family):
  r = result[family]
  assert result["devices"] == 8
  # tiny configs: 4 query heads, 2 KV heads, F=128, V=1000 on a (data=4, model=2) mesh
  assert r["params"]["q_proj"] == [None, "model", None]
  assert r["params"]["k_proj"] == [None, "model", None]
  assert r["params"]["o_proj"] == ["model", None, None]
  assert r["params"]["gate_proj"] == [None, "model"]
  assert r["params"]["down_proj"] == ["model", None]
  assert r["params"]["lm_head"] == [None, "model"]
  assert r["restored_q_proj"] == [None, "model", None]  # orbax restores onto the mesh


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_logits_equal_single_device(result, family):
  r = result[family]
  tol = 1e-5 * max(1.0, r["logits_scale"])  # fp32; only the reduction order differs
  assert r["logits_max_diff"] <= tol
  assert r["restored_logits_max_diff"] <= tol


@pytest.mark.parametrize("family,policy", [("llava", "meda"), ("qwen2_vl", "madakv")])
def test_generate_equals_single_device_and_cache_stays_split(result, family, policy):
  r = result[family][policy]
  assert r["tokens_sharded"] == r["tokens_single"]
  assert r["scores_max_diff"] <= 1e-4
  assert r["kept_equal"]
  assert r["cache_type"] == "KVCache"  # pages mix heads: dense under a mesh
  assert r["cache_layer_k"] == ["data", "model"]  # [B, K, C, H]
  assert r["cache_append_k"] == [None, "data", "model"]  # [L, B, K, M, H]
  assert r["kv_all_gathers"] == []  # compression never gathers K/V to every device


def test_a_next_turn_equals_single_device(result):
  """A conversation's second turn with MEDA compressing the whole cache again (`jmmkv.turns`)."""
  r = result["llava"]["next_turn"]
  assert r["tokens_sharded"] == r["tokens_single"]
  assert r["scores_max_diff"] <= 1e-4
  assert r["cache_layer_k"] == ["data", "model"]  # still split over batch and KV heads
  assert r["kv_all_gathers"] == []  # nor does the turn's compression gather K/V


def test_param_specs_only_split_what_divides():
  mesh = jax.make_mesh((1,), ("model",))
  fake = type("FakeMesh", (), {"shape": {"data": 2, "model": 4}})()
  params = {
    "layers_0": {
      "q_proj": {"w": np.zeros((8, 8, 2))},  # 8 heads: split
      "k_proj": {"w": np.zeros((8, 2, 2))},  # 2 KV heads on 4: replicated
      "gate_proj": {"w": np.zeros((8, 12))},
      "input_norm": {"scale": np.zeros((8,))},
    }
  }
  specs = sharding.param_specs(params, fake)["layers_0"]
  assert tuple(specs["q_proj"]["w"]) == (None, "model", None)
  assert tuple(specs["k_proj"]["w"]) == (None, None, None)
  assert tuple(specs["gate_proj"]["w"]) == (None, "model")
  assert tuple(specs["input_norm"]["scale"]) == ()
  assert sharding.check_mesh(mesh).axis_names == ("model",)


def test_bad_mesh_is_a_clear_error(tiny_model):
  bad = jax.make_mesh((1,), ("tp",))
  with pytest.raises(ValueError, match="mesh axes must be named"):
    jmmkv.load(tiny_model("llama_gqa").path, mesh=bad)
  with pytest.raises(TypeError, match="jax.sharding.Mesh"):
    jmmkv.load(tiny_model("llama_gqa").path, mesh="8 devices")


def test_snapkv_selection_kernel_runs_shard_locally(result):
  r = result["llava"]["snapkv_interpret"]
  assert r["kept_equal"]
  assert r["kv_all_gathers"] == []
