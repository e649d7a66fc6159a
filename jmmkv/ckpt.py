"""`save` / `restore`: a converted model as an orbax checkpoint beside its HF config files.

A checkpoint directory holds ``params/`` (orbax, the jmmkv param tree), the source model's
config, tokenizer and processor files (everything but its weights), and ``jmmkv.json``. Restoring
reads the config with the same code as an HF directory, checks the stored param tree against the
shapes that config implies, and casts the params to the requested dtype as orbax reads them (no
float32 copy in between). A save is moved into place only once complete; a damaged or unfinished
checkpoint is one error line that names it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

MARKER = "jmmkv.json"
FORMAT = 1
_ORBAX_TMP = "params.orbax-checkpoint-tmp"  # what an interrupted orbax save leaves
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


def is_partial(path: str | Path) -> bool:
  """Whether ``path`` holds orbax params but no marker: a `save` that did not finish."""
  path = Path(path)
  if not path.is_dir() or is_checkpoint(path):
    return False
  return any(p.name == "params" or p.name.startswith(_ORBAX_TMP) for p in path.iterdir())


def save(model, path: str | Path) -> Path:
  """Writes ``model`` (loaded from an HF directory) to ``path`` (a new or empty directory).

  The files are written to a hidden sibling directory that replaces ``path`` once complete: a
  save that fails or is interrupted leaves nothing behind.
  """
  if model.path is None or not (Path(model.path) / "config.json").is_file():
    raise ValueError(
      "jmmkv.save needs a model loaded from a directory with a config.json (jmmkv.load(dir)); "
      "random models have no config files to save"
    )
  out = check_new_dir(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.jmmkv-tmp-{uuid.uuid4().hex[:8]}")
  tmp.mkdir()
  try:
    _write(model, tmp)
    tmp.replace(out)  # POSIX rename: onto an absent path or an empty directory
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _write(model, out: Path) -> None:
  """The checkpoint's files in ``out``, the marker last."""
  for f in sorted(Path(model.path).iterdir()):
    weights = f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".index.json")
    if f.is_file() and not weights and f.name != MARKER:
      shutil.copy2(f, out / f.name)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out / "params", model.params)
  checkpointer.wait_until_finished()
  meta = {"format": FORMAT, "dtype": model.dtype_name, "source": str(model.path)}
  (out / MARKER).write_text(json.dumps(meta, indent=1) + "\n")


def restore_params(path: str | Path, dtype, expected: dict[str, tuple[int, ...]], mesh=None):
  """The param tree of checkpoint ``path``, every array read as ``dtype`` (and, given a mesh,
  straight into the shards `jmmkv.sharding` assigns).

  ``expected`` ("text/params/norm/scale" -> shape: what the checkpoint's config implies) is
  checked against the stored tree before any array is read.
  """
  path = Path(path).absolute()
  from jmmkv.models.convert import read_json

  meta = read_json(path / MARKER)
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    got = meta.get("format") if isinstance(meta, dict) else meta
    raise ValueError(f"{path}: unsupported jmmkv checkpoint format {got!r}")
  if not (path / "params").is_dir():
    raise _damaged(path, "no params/ directory")
  checkpointer = ocp.StandardCheckpointer()
  stored = _read(path, lambda: checkpointer.metadata(path / "params").item_metadata)
  if stored is None:
    raise _damaged(path, "params/ has no readable metadata")
  _check_shapes(path, _shapes(stored.tree), expected)
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, jnp.dtype(dtype)), stored.tree)
  if mesh is not None:
    from jmmkv import sharding

    target = jax.tree.map(
      lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
      target,
      sharding.param_shardings(target, mesh),
    )
  return _read(path, lambda: checkpointer.restore(path / "params", target))


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """``{"text/params/norm/scale": shape}`` of a tree of arrays (or their metadata)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(x.shape) for k, x in leaves}


def _check_shapes(path: Path, stored: dict, expected: dict) -> None:
  """Raises if the params stored in checkpoint ``path`` are not those its config implies."""
  from jmmkv.models.convert import first_few

  where = f"jmmkv checkpoint {path} does not match its config.json"
  missing = [k for k in expected if k not in stored]
  if missing:
    raise ValueError(f"{where}: the config implies params it lacks: {first_few(missing)}")
  unexpected = [k for k in stored if k not in expected]
  if unexpected:
    raise ValueError(f"{where}: params the config does not imply: {first_few(unexpected)}")
  for k, want in expected.items():
    if stored[k] != tuple(want):
      raise ValueError(f"{where}: param {k} has shape {stored[k]}, the config implies {want}")


def _read(path: Path, fn):
  """``fn()`` (an orbax read) with orbax's log lines off and its event loops drained; what it
  raises becomes one line naming checkpoint ``path``."""
  logger = logging.getLogger("absl")
  level, policy = logger.level, asyncio.get_event_loop_policy()
  logger.setLevel(logging.CRITICAL)
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    return fn()
  except Exception as e:  # orbax and tensorstore raise bare Exceptions for unreadable data
    raise _damaged(path, _root_cause(e)) from None
  finally:
    asyncio.set_event_loop_policy(policy)
    logger.setLevel(level)


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that lets its pending tasks finish before it closes. Orbax closes its loop as
  soon as one read fails; the reads still in flight would then print tracebacks (from
  tensorstore's threads, or when collected) long after the error was reported."""

  def close(self):
    pending = asyncio.all_tasks(self)
    if pending and not self.is_running() and not self.is_closed():
      self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  def new_event_loop(self):
    return _DrainingLoop()


def _root_cause(e: BaseException) -> str:
  """The first line of the innermost exception ``e`` was raised from."""
  seen = {id(e)}
  while e.__cause__ is not None and id(e.__cause__) not in seen:
    e = e.__cause__
    seen.add(id(e))
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def _damaged(path: Path, reason: str) -> ValueError:
  return ValueError(
    f"cannot read jmmkv checkpoint {path}: {reason}; it is incomplete or damaged, "
    "convert the model again"
  )
