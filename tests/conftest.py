"""Shared test setup: CPU-only JAX, offline HF, and cached tiny random models.

Plain helpers (configs, model building, padding) live in tests/hf_models.py; this file only
holds the environment setup and fixtures.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Before jax / transformers are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _cores() -> int:
  n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return n or 1


# Under pytest-xdist every worker is a process: with a worker per core, XLA and torch run their
# ops on one thread each rather than all of them contending for every core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, _cores() // _WORKERS))
# The suite compiles hundreds of small programs (a prefill per policy, budget and shape) whose run
# time is negligible: LLVM's optimisation of them costs more than it saves (about 20% of the
# suite's time; skipping LLVM's expensive passes too saves another 5-10%).
_FLAGS = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
if _THREADS == 1:
  _FLAGS.append("--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("XLA_FLAGS", " ".join(_FLAGS))

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # jmmkv importable without an editable install
  sys.path.insert(0, str(REPO_ROOT))

torch.set_num_threads(_THREADS)

import hf_models  # noqa: E402  (tests/ is on sys.path: rootdir conftest, no __init__.py)


def pytest_xdist_auto_num_workers(config) -> int:
  """``-n auto``: one worker per core, at most 4 (each imports jax and torch, about 1 GB)."""
  return min(4, _cores())


@pytest.fixture
def dense_store(monkeypatch):
  """The compressing prefill stores every policy's kept slots as a dense prefix, never a pool
  (`jmmkv.cache.stream.storage_for`). Reference tests use it: a dense store's shape depends on
  the rounded capacity only, so the cases of a policy share compiled prefills, where a pool's
  size (static) follows each prompt and budget. tests/cache/test_stream.py checks that a pool
  keeps exactly what a dense prefix keeps, for every policy."""
  from jmmkv.cache import stream

  monkeypatch.setattr(stream, "POOL_GAIN", 0.0)


@dataclass(frozen=True)
class TinyModel:
  """A tiny random HF model (fp32, eager, eval) and the directory it was saved to."""

  name: str
  seed: int
  torch_model: torch.nn.Module
  path: Path  # HF dir: config.json, model.safetensors, generation_config.json


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  """Factory (config name, seed) -> TinyModel, built and saved once per session.

  The saved directory is shared: tests that break a checkpoint must copy it first
  (see `tiny_model_copy`).
  """
  cache: dict[tuple[str, int], TinyModel] = {}

  def get(name: str, seed: int = 0) -> TinyModel:
    key = (name, seed)
    if key not in cache:
      model = hf_models.build_model(name, seed)
      path = tmp_path_factory.mktemp(f"{name}_s{seed}")
      model.save_pretrained(path)
      cache[key] = TinyModel(name, seed, model, path)
    return cache[key]

  return get


@pytest.fixture(scope="session")
def tiny_model_sharded(tiny_model, tmp_path_factory):
  """Factory (config name, seed) -> directory holding the same weights saved in shards
  (model.safetensors.index.json + several model-XXXXX-of-YYYYY.safetensors)."""
  cache: dict[tuple[str, int], Path] = {}

  def get(name: str, seed: int = 0) -> Path:
    key = (name, seed)
    if key not in cache:
      tm = tiny_model(name, seed)
      path = tmp_path_factory.mktemp(f"{name}_s{seed}_sharded")
      tm.torch_model.save_pretrained(path, max_shard_size="100KB")
      cache[key] = path
    return cache[key]

  return get


@pytest.fixture
def tiny_model_copy(tiny_model, tmp_path):
  """Factory (config name, seed, src=None) -> a private copy of a saved tiny model directory
  (or of `src`, e.g. a sharded directory) under this test's tmp_path, free to be broken."""
  import shutil

  def get(name: str, seed: int = 0, src: Path | None = None) -> Path:
    src = Path(src) if src is not None else tiny_model(name, seed).path
    dst = tmp_path / f"{src.name}_copy"
    shutil.copytree(src, dst)
    return dst

  return get


@pytest.fixture(scope="session")
def jmmkv_model(tiny_model):
  """Factory (config name, seed, dtype="float32") -> jmmkv.Model loaded from the saved
  tiny model, cached for the session (the loaded model is never mutated by tests)."""
  cache: dict = {}

  def get(name: str, seed: int = 0, dtype: str = "float32"):
    import jmmkv

    key = (name, seed, dtype)
    if key not in cache:
      cache[key] = jmmkv.load(str(tiny_model(name, seed).path), dtype=dtype)
    return cache[key]

  return get


@pytest.fixture(scope="session")
def mm_model(tmp_path_factory):
  """Factory (family, seed) -> (HF model, jmmkv model, saved dir) of a tiny multimodal model of
  tests/mm_models.py, built once per session (neither model is mutated by tests)."""
  from mm_models import build_mm_model

  cache: dict = {}

  def get(family: str, seed: int):
    import jmmkv

    if (family, seed) not in cache:
      hf = build_mm_model(family, seed)
      path = tmp_path_factory.mktemp(f"{family}_s{seed}")
      hf.save_pretrained(path)
      cache[family, seed] = (hf, jmmkv.load(path, dtype="float32"), path)
    return cache[family, seed]

  return get


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drop JAX's compiled executables after each test module. Every CPU executable holds its own
  memory mappings; a whole suite's worth (tens of thousands) passes the kernel's vm.max_map_count
  (65530) and the next compilation segfaults."""
  yield
  import jax

  jax.clear_caches()
