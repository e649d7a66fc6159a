"""Files a user names: output paths checked before a run and written whole after it, images and
videos read with one-line errors. Used by the command line and the evaluation harnesses."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def output_path(path: str | os.PathLike, flag: str = "--out") -> Path:
  """``path`` as a file to write after a run, checked before it: not a directory, under a
  writable directory (missing folders are created only when the file is written, by
  `write_atomic`, so a failed or interrupted run leaves none behind). Errors name ``flag``."""
  p = Path(path)
  if p.is_dir():
    raise ValueError(f"{flag} {p} is a directory; give a file name")
  existing = next(q for q in p.absolute().parents if q.exists())
  if not existing.is_dir():
    raise ValueError(f"cannot write {flag} {p}: {existing} is not a directory")
  if not os.access(existing, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
    raise ValueError(f"cannot write {flag} {p}: permission denied")
  return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
  """Yields a temporary path beside ``path`` (its folders created); when the block ends without
  an error the file written there replaces ``path`` in one step, otherwise it is removed. Readers
  never see a half-written ``path``."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    yield Path(tmp)
    # mkstemp makes the file owner-only: give it the mode a plain open() would have
    os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_atomic(path: str | os.PathLike, text: str) -> Path:
  """Writes ``text`` to ``path`` through `atomic_path`."""
  with atomic_path(path) as tmp:
    tmp.write_text(text)
  return Path(path)


def read_image(path: str | os.PathLike):
  """The RGB PIL image in file ``path``; a missing, unreadable or oversized file is one error
  line naming it."""
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as im:
      return im.convert("RGB")
  except FileNotFoundError:
    raise FileNotFoundError(f"image {path} does not exist") from None
  except Image.DecompressionBombError as e:
    raise ValueError(f"image {path} is too large to read safely ({e}); resize it first") from None
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None


def read_video(path: str | os.PathLike):
  """Frames of a directory of images (sorted by name) or of a multi-frame image (GIF, WebP)."""
  from PIL import Image, ImageSequence

  p = Path(path)
  if p.is_dir():
    return [read_image(f) for f in sorted(p.iterdir()) if f.is_file()]
  if not p.exists():
    raise FileNotFoundError(f"video {path} does not exist")
  try:
    with Image.open(p) as im:
      return [f.convert("RGB") for f in ImageSequence.Iterator(im)]
  except Image.DecompressionBombError:
    raise ValueError(f"video {path} has frames too large to read safely: resize it first") from None
  except OSError:
    raise ValueError(
      f"cannot read video {path}: give a directory of frames or an animated GIF/WebP "
      "(no video decoder is installed)"
    ) from None
