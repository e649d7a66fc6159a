"""jmmkv.load on HF directories: sharded checkpoints, and clear errors for broken ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_models import hf_logits, pad_batch, positions_from_mask, random_ids
from cli_errors import cli_error

NAME = "llama_gqa"  # the checkpoint the error cases break (hidden 64, 4 heads of 16, 2 layers)


def _batch(seed: int = 5):
  rng = np.random.default_rng(seed)
  return pad_batch([random_ids(rng, 11), random_ids(rng, 6)], "left")


def _rewrite_safetensors(path: Path, edit) -> None:
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


def _load(path):
  import jmmkv

  return jmmkv.load(str(path))


# ---------------------------------------------------------------- sharded checkpoints


@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied_llama3", "qwen2_bias"])
def test_sharded_load_equals_single_file(name, tiny_model, tiny_model_sharded, jmmkv_model):
  import jmmkv

  path = tiny_model_sharded(name, 0)
  index = json.loads((path / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and not (path / "model.safetensors").exists()  # really sharded

  sharded = jmmkv.load(str(path))
  single = jmmkv_model(name, 0)
  ids, mask = _batch()
  m = mask.astype(bool)
  got = np.asarray(sharded.logits(input_ids=ids, attention_mask=mask))
  want = np.asarray(single.logits(input_ids=ids, attention_mask=mask))
  np.testing.assert_allclose(got[m], want[m], rtol=0, atol=1e-6)
  ref = hf_logits(tiny_model(name, 0).torch_model, ids, mask, positions_from_mask(mask))
  assert float(np.max(np.abs(got[m] - ref[m]))) <= 1e-4


def test_load_accepts_pathlib_path(tiny_model):
  import jmmkv

  model = jmmkv.load(tiny_model(NAME, 0).path)
  ids, mask = _batch()
  assert np.asarray(model.logits(input_ids=ids, attention_mask=mask)).shape == (*ids.shape, 1000)


# ---------------------------------------------------------------- load errors


def test_error_no_config_json(tiny_model_copy):
  path = tiny_model_copy(NAME)
  (path / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match=re.escape("config.json")) as exc:
    _load(path)
  assert str(path) in str(exc.value)


def test_error_empty_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape("config.json")) as exc:
    _load(tmp_path)
  assert str(tmp_path) in str(exc.value)


def test_error_no_safetensors(tiny_model_copy):
  path = tiny_model_copy(NAME)
  (path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="safetensors") as exc:
    _load(path)
  assert str(path) in str(exc.value)


def test_error_missing_shard(tiny_model_copy, tiny_model_sharded):
  path = tiny_model_copy(NAME, src=tiny_model_sharded(NAME, 0))
  index = json.loads((path / "model.safetensors.index.json").read_text())
  shard = sorted(set(index["weight_map"].values()))[1]
  (path / shard).unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(shard)):
    _load(path)


def test_error_index_names_nonexistent_shard(tiny_model_copy, tiny_model_sharded):
  path = tiny_model_copy(NAME, src=tiny_model_sharded(NAME, 0))
  index_file = path / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  bogus = "model-00042-of-00099.safetensors"
  index["weight_map"]["model.norm.weight"] = bogus
  index_file.write_text(json.dumps(index))
  with pytest.raises(FileNotFoundError, match=re.escape(bogus)):
    _load(path)


def test_error_unsupported_architecture(tiny_model_copy):
  path = tiny_model_copy(NAME)
  cfg_file = path / "config.json"
  cfg = json.loads(cfg_file.read_text())
  cfg["architectures"] = ["GPT2LMHeadModel"]
  cfg_file.write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"(?i)unsupported architecture") as exc:
    _load(path)
  msg = str(exc.value)
  assert "GPT2LMHeadModel" in msg and "config.json" in msg, msg


def test_error_missing_tensor(tiny_model_copy):
  path = tiny_model_copy(NAME)
  key = "model.layers.1.mlp.up_proj.weight"
  _rewrite_safetensors(path / "model.safetensors", lambda t: t.pop(key))
  with pytest.raises(ValueError, match="missing") as exc:
    _load(path)
  assert key in str(exc.value), str(exc.value)


def test_error_unexpected_tensor(tiny_model_copy):
  path = tiny_model_copy(NAME)
  key = "model.layers.0.self_attn.extra.weight"
  rng = np.random.default_rng(0)
  _rewrite_safetensors(
    path / "model.safetensors",
    lambda t: t.__setitem__(key, rng.normal(size=(64, 64)).astype(np.float32)),
  )
  with pytest.raises(ValueError, match="unexpected") as exc:
    _load(path)
  msg = str(exc.value)
  assert key in msg and "model.safetensors" in msg, msg


def test_error_wrong_shape(tiny_model_copy):
  path = tiny_model_copy(NAME)
  key = "model.layers.0.self_attn.q_proj.weight"
  rng = np.random.default_rng(0)
  _rewrite_safetensors(
    path / "model.safetensors",
    lambda t: t.__setitem__(key, rng.normal(size=(64, 32)).astype(np.float32)),
  )
  with pytest.raises(ValueError, match=re.escape(key)) as exc:
    _load(path)
  msg = str(exc.value)
  for part in ("model.safetensors", "(64, 32)", "(64, 64)"):
    assert part in msg, f"{part!r} not in {msg!r}"


# ---------------------------------------------------------------- damaged files and wrong paths

_DAMAGE = {  # what an interrupted download or copy leaves of a safetensors file
  "empty": lambda data: b"",
  "5_bytes": lambda data: data[:5],
  "half": lambda data: data[: len(data) // 2],
  "garbled_header": lambda data: data[:8] + b"{garbage" + data[16:],
}


def _damage(path: Path, how: str) -> None:
  path.write_bytes(_DAMAGE[how](path.read_bytes()))


@pytest.mark.parametrize("how", list(_DAMAGE))
def test_error_damaged_safetensors(tiny_model_copy, tmp_path, capsys, how):
  path = tiny_model_copy(NAME)
  weights = path / "model.safetensors"
  _damage(weights, how)
  want = rf"^cannot read {re.escape(str(weights))}: not a valid safetensors file \(.+\)$"
  with pytest.raises(ValueError, match=want) as exc:
    _load(path)
  out = tmp_path / "out"
  assert cli_error(capsys, ["convert", str(path), str(out)]) == str(exc.value)
  assert not out.exists()
  assert cli_error(capsys, ["generate", "--model", str(path), "--prompt", "hi"]) == str(exc.value)


def test_error_damaged_shard(tiny_model_copy, tiny_model_sharded):
  path = tiny_model_copy(NAME, src=tiny_model_sharded(NAME, 0))
  index = json.loads((path / "model.safetensors.index.json").read_text())
  shard = path / sorted(set(index["weight_map"].values()))[1]
  _damage(shard, "half")
  want = rf"^cannot read {re.escape(str(shard))}: not a valid safetensors file \(.+\)$"
  with pytest.raises(ValueError, match=want):
    _load(path)


@pytest.mark.parametrize("what", ["missing", "file", "empty_dir"])
def test_error_not_a_model_directory(tmp_path, capsys, what):
  path = tmp_path / what
  if what == "file":
    path.write_text("x")
  elif what == "empty_dir":
    path.mkdir()
  want, error = {
    "missing": (f"model directory {path} does not exist", FileNotFoundError),
    "file": (
      f"{path} is not a directory; give a model directory (HF or jmmkv checkpoint)",
      NotADirectoryError,
    ),
    "empty_dir": (
      f"no config.json in {path} (expected an HF model directory or a jmmkv checkpoint)",
      FileNotFoundError,
    ),
  }[what]
  with pytest.raises(error, match=f"^{re.escape(want)}$"):
    _load(path)
  assert cli_error(capsys, ["generate", "--model", str(path), "--prompt", "hi"]) == want
