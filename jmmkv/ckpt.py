"""`save` / `restore`: a converted model as an orbax checkpoint beside its HF config files.

A checkpoint directory holds ``params/`` (orbax, the jmmkv param tree), the source model's
config, tokenizer and processor files (everything but its weights), and ``jmmkv.json``. Restoring
reads the config with the same code as an HF directory and casts the params to the requested
dtype as orbax reads them (no float32 copy in between).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

MARKER = "jmmkv.json"
FORMAT = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def is_checkpoint(path: str | Path) -> bool:
  return (Path(path) / MARKER).is_file()


def check_new_dir(path: str | Path) -> Path:
  """``path`` (absolute) if a checkpoint can be written there: absent or an empty directory,
  under a directory (not a file)."""
  out = Path(path).absolute()
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"{out} exists and is not a directory; give a new or empty directory")
  if out.is_dir() and any(out.iterdir()):
    raise FileExistsError(f"{out} exists and is not empty; give a new or empty directory")
  parent = next(p for p in out.parents if p.exists())
  if not parent.is_dir():
    raise NotADirectoryError(f"cannot create {out}: {parent} is not a directory")
  return out


def save(model, path: str | Path) -> Path:
  """Writes ``model`` (loaded from an HF directory) to ``path`` (a new or empty directory)."""
  if model.path is None or not (Path(model.path) / "config.json").is_file():
    raise ValueError(
      "jmmkv.save needs a model loaded from a directory with a config.json (jmmkv.load(dir)); "
      "random models have no config files to save"
    )
  out = check_new_dir(path)
  out.mkdir(parents=True, exist_ok=True)
  for f in sorted(Path(model.path).iterdir()):
    weights = f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".index.json")
    if f.is_file() and not weights and f.name != MARKER:
      shutil.copy2(f, out / f.name)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out / "params", model.params)
  checkpointer.wait_until_finished()
  meta = {"format": FORMAT, "dtype": model.dtype_name, "source": str(model.path)}
  (out / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
  return out


def restore_params(path: str | Path, dtype, mesh=None):
  """The param tree of checkpoint ``path``, every array read as ``dtype`` (and, given a mesh,
  straight into the shards `jmmkv.sharding` assigns)."""
  path = Path(path).absolute()
  from jmmkv.models.convert import read_json

  meta = read_json(path / MARKER)
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    got = meta.get("format") if isinstance(meta, dict) else meta
    raise ValueError(f"{path}: unsupported jmmkv checkpoint format {got!r}")
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path / "params").item_metadata.tree
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, jnp.dtype(dtype)), tree)
  if mesh is not None:
    from jmmkv import sharding

    target = jax.tree.map(
      lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
      target,
      sharding.param_shardings(target, mesh),
    )
  return checkpointer.restore(path / "params", target)
