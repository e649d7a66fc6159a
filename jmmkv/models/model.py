"""`Model`: a config, its params and (optionally) a tokenizer, with host-side numpy entry points."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmmkv import inputs
from jmmkv.models import convert
from jmmkv.models.configs import DecoderConfig
from jmmkv.models.llama import Decoder, init_params

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def dtype_name(dtype) -> str:
  """Normalises "float32"/"fp32"/jnp.float32 and "bfloat16"/"bf16"/jnp.bfloat16."""
  key = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if key not in _DTYPES:
    raise ValueError(f"unsupported dtype {dtype!r}; use 'float32' or 'bfloat16'")
  return _DTYPES[key]


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _logits(params, ids_BT, positions_BT, valid_BT, *, cfg: DecoderConfig, dtype: str):
  return Decoder(cfg, jnp.dtype(dtype)).apply(params, ids_BT, positions_BT, valid_BT)


@dataclasses.dataclass
class Model:
  config: DecoderConfig
  params: Any = dataclasses.field(repr=False)  # {"params": nested dict of arrays}
  dtype_name: str = "float32"
  tokenizer: Any = dataclasses.field(default=None, repr=False)  # transformers tokenizer, if any
  path: str | None = None

  def logits(self, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """Full-forward logits ``[B, T, V]`` (float32 numpy) for ids ``[B, T]``.

    ``attention_mask`` marks real tokens (left or right padding); ``position_ids`` default to
    ``cumsum(mask) - 1`` as transformers' generate computes them. Logits at padding are unspecified.
    """
    ids_BT = np.asarray(input_ids)
    if ids_BT.ndim != 2:
      raise ValueError(f"input_ids must be [B, T], got shape {ids_BT.shape}")
    if not np.issubdtype(ids_BT.dtype, np.integer):
      raise ValueError(f"input_ids must be integers, got {ids_BT.dtype}")
    if ids_BT.min() < 0 or ids_BT.max() >= self.config.vocab_size:
      raise ValueError(
        f"input_ids outside [0, {self.config.vocab_size}): min {ids_BT.min()}, max {ids_BT.max()}"
      )
    mask_BT = (
      np.ones(ids_BT.shape, bool)
      if attention_mask is None
      else np.asarray(attention_mask).astype(bool)
    )
    if mask_BT.shape != ids_BT.shape:
      raise ValueError(f"attention_mask shape {mask_BT.shape} != input_ids shape {ids_BT.shape}")
    if position_ids is None:
      position_ids = np.clip(np.cumsum(mask_BT, axis=1) - 1, 0, None)
    pos_BT = np.asarray(position_ids)
    if pos_BT.shape != ids_BT.shape:
      raise ValueError(f"position_ids shape {pos_BT.shape} != input_ids shape {ids_BT.shape}")
    out = _logits(
      self.params,
      ids_BT.astype(np.int32),
      pos_BT.astype(np.int32),
      mask_BT,
      cfg=self.config,
      dtype=self.dtype_name,
    )
    return np.asarray(out)

  def prepare(
    self,
    prompts: Sequence[str] | None = None,
    input_ids=None,
    attention_mask=None,
    chat_template: bool = True,
  ) -> inputs.Batch:
    """A `Batch` from text prompts (tokenizer + chat template when the checkpoint has one) or ids."""
    if (prompts is None) == (input_ids is None):
      raise ValueError("give exactly one of prompts=... or input_ids=...")
    if input_ids is not None:
      return inputs.from_token_ids(input_ids, attention_mask, self.config.vocab_size)
    if self.tokenizer is None:
      raise ValueError(
        "this model has no tokenizer (none in its directory): pass input_ids instead"
      )
    if isinstance(prompts, str):
      prompts = [prompts]
    tok = self.tokenizer
    if chat_template and getattr(tok, "chat_template", None):
      rows = [
        tok.apply_chat_template(
          [{"role": "user", "content": p}],
          add_generation_prompt=True,
          tokenize=True,
          return_dict=True,
        )["input_ids"]
        for p in prompts
      ]
    else:
      rows = [tok(p)["input_ids"] for p in prompts]
    return inputs.from_token_ids(rows, vocab_size=self.config.vocab_size)

  def decode_text(self, tokens: Sequence[Sequence[int]]) -> list[str]:
    return [self.tokenizer.decode(row, skip_special_tokens=True) for row in tokens]


def _load_tokenizer(model_dir: Path):
  if not any(
    (model_dir / f).is_file()
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
  ):
    return None
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(model_dir))


def load(path: str | Path, dtype="float32") -> Model:
  """Loads an HF directory (config.json + *.safetensors, sharded or not, + tokenizer files).

  Supported: ``LlamaForCausalLM`` and ``Qwen2ForCausalLM``. ``dtype``: "float32" or "bfloat16".
  """
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"model directory {path} does not exist")
  name = dtype_name(dtype)
  cfg, params = convert.load_decoder(path, jnp.dtype(name))
  return Model(cfg, params, name, _load_tokenizer(path), str(path))


def random_model(cfg: DecoderConfig, seed: int = 0, dtype="float32") -> Model:
  """A randomly initialised model (no tokenizer): for the demo, benchmarks and tests."""
  name = dtype_name(dtype)
  return Model(cfg, init_params(cfg, jax.random.key(seed), jnp.dtype(name)), name)
