"""jmmkv: multimodal LLMs in JAX/Flax with a static-shape, compressible KV cache."""

import logging

from jmmkv.cache import policies
from jmmkv.cache.budget import Budget
from jmmkv.cache.kv_cache import KVCache
from jmmkv.ckpt import save
from jmmkv.generate import GenerateOutput, compress, generate
from jmmkv.inputs import Batch
from jmmkv.models.model import Model, load, random_model


class _NoTorchAdvice(logging.Filter):
  """jmmkv needs no PyTorch: drops transformers' "PyTorch was not found" advice (only that)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found")


logging.getLogger("transformers").addFilter(_NoTorchAdvice())

__version__ = "0.1.0"
__all__ = [
  "Batch",
  "Budget",
  "GenerateOutput",
  "KVCache",
  "Model",
  "compress",
  "generate",
  "load",
  "policies",
  "random_model",
  "save",
]
