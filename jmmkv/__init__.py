"""jmmkv: multimodal LLMs in JAX/Flax with a static-shape, compressible KV cache.

The public names below load their modules on first use, so ``import jmmkv`` (and importing one
submodule, such as a kernel) loads no model or policy code it does not need.
"""

import importlib
import logging
import sys
import types

__version__ = "0.1.0"

_PUBLIC = {  # name -> module that defines it
  "Batch": "jmmkv.inputs",
  "Budget": "jmmkv.cache.budget",
  "Conversation": "jmmkv.conversation",
  "GenerateOutput": "jmmkv.generate",
  "KVCache": "jmmkv.cache.kv_cache",
  "Model": "jmmkv.models.model",
  "compress": "jmmkv.generate",
  "generate": "jmmkv.generate",
  "load": "jmmkv.models.model",
  "random_model": "jmmkv.models.model",
  "save": "jmmkv.ckpt",
}
__all__ = sorted([*_PUBLIC, "policies"])


def __getattr__(name: str):
  if name == "policies":
    value = importlib.import_module("jmmkv.cache.policies")
  elif name in _PUBLIC:
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
  else:
    raise AttributeError(f"module 'jmmkv' has no attribute {name!r}")
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__():
  return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
  """``jmmkv.generate`` is the function, though a module of that name exists: importing the
  module (``jmmkv.generate``, e.g. from the benchmark) must not rebind the name to it."""

  def __setattr__(self, name, value):
    if name in _PUBLIC and isinstance(value, types.ModuleType):
      return
    super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _NoTorchAdvice(logging.Filter):
  """jmmkv needs no PyTorch: drops transformers' "PyTorch was not found" advice (only that)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found")


logging.getLogger("transformers").addFilter(_NoTorchAdvice())
