"""HF safetensors -> jmmkv params, through an explicit key table with a shape assert on every tensor.

Supports single-file and sharded (``model.safetensors.index.json``) checkpoints. Every failure names
the file, the key and the shapes involved.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from jmmkv.models.configs import DecoderConfig, as_int_tuple

# Buffers that some checkpoints carry and that are recomputed from the config.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|embeddings\.position_ids)$")

Entry = tuple[tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def read_json(path: Path):
  """``path`` parsed as JSON; a malformed file is a ValueError that names it."""
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_config(model_dir: str | Path) -> tuple[dict, str | None]:
  """Reads ``config.json``; returns it with its architecture name (``architectures[0]``, None
  if absent: `jmmkv.models.families.for_architecture` says whether it is supported)."""
  path = Path(model_dir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(
      f"no config.json in {model_dir} (expected an HF model directory or a jmmkv checkpoint)"
    )
  cfg = read_json(path)
  if not isinstance(cfg, dict):
    raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
  archs = cfg.get("architectures") or []
  return cfg, (archs[0] if archs else None)


def decoder_key_table(
  cfg: DecoderConfig, prefix: str = "model.", head_key: str = "lm_head.weight"
) -> dict[str, Entry]:
  """HF key -> (param path, HF shape, transform to our layout)."""
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  n, kh, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = lambda x: x
  t = lambda x: x.T
  table: dict[str, Entry] = {
    f"{prefix}embed_tokens.weight": (("embedding",), (v, d), same),
    f"{prefix}norm.weight": (("norm", "scale"), (d,), same),
  }
  if not cfg.tie_word_embeddings:
    table[head_key] = (("lm_head", "w"), (v, d), t)
  # Llama's post_attention_layernorm is the norm before the MLP; Gemma's norms the attention output
  post_attn = "attn_out_norm" if cfg.sandwich_norms else "post_norm"
  for i in range(cfg.num_layers):
    hf, ours = f"{prefix}layers.{i}.", f"layers_{i}"
    table.update(
      {
        hf + "input_layernorm.weight": ((ours, "input_norm", "scale"), (d,), same),
        hf + "post_attention_layernorm.weight": ((ours, post_attn, "scale"), (d,), same),
        hf + "mlp.gate_proj.weight": ((ours, "gate_proj", "w"), (f, d), t),
        hf + "mlp.up_proj.weight": ((ours, "up_proj", "w"), (f, d), t),
        hf + "mlp.down_proj.weight": ((ours, "down_proj", "w"), (d, f), t),
        hf + "self_attn.o_proj.weight": (
          (ours, "o_proj", "w"),
          (d, n * h),
          lambda x: x.T.reshape(n, h, d),
        ),
      }
    )
    for name, heads in (("q_proj", n), ("k_proj", kh), ("v_proj", kh)):
      table[hf + f"self_attn.{name}.weight"] = (
        (ours, name, "w"),
        (heads * h, d),
        lambda x, heads=heads: x.T.reshape(d, heads, h),
      )
      if cfg.qkv_bias:
        table[hf + f"self_attn.{name}.bias"] = (
          (ours, name, "b"),
          (heads * h,),
          lambda x, heads=heads: x.reshape(heads, h),
        )
    if cfg.o_bias:
      table[hf + "self_attn.o_proj.bias"] = ((ours, "o_proj", "b"), (d,), same)
    if cfg.sandwich_norms:  # Gemma: its own norm before the MLP, and one after it
      for hf_name, name in (("pre_feedforward", "post_norm"), ("post_feedforward", "mlp_out_norm")):
        table[hf + f"{hf_name}_layernorm.weight"] = ((ours, name, "scale"), (d,), same)
    if cfg.qk_norm:
      for name in ("q_norm", "k_norm"):
        table[hf + f"self_attn.{name}.weight"] = ((ours, name, "scale"), (h,), same)
  return table


def safetensors_files(model_dir: str | Path) -> list[Path]:
  """The checkpoint's safetensors files (from the shard index when there is one)."""
  model_dir = Path(model_dir)
  index = model_dir / "model.safetensors.index.json"
  if index.is_file():
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index} has no "weight_map" object')
    names = sorted(set(weight_map.values()))
    for name in names:
      if not (model_dir / name).is_file():
        raise FileNotFoundError(f"shard {name} listed in {index} does not exist")
    return [model_dir / name for name in names]
  files = sorted(model_dir.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors file in {model_dir}")
  return files


def open_safetensors(path: Path):
  """``safe_open`` of ``path``; a damaged file (truncated, empty, garbled header) is a ValueError
  that names it."""
  try:
    return safe_open(path, framework="flax")
  except SafetensorError as e:
    reason = str(e).removeprefix("Error while deserializing header: ")
    raise ValueError(f"cannot read {path}: not a valid safetensors file ({reason})") from None


def first_few(names, n: int = 5) -> str:
  """``a, b, c`` of the first ``n`` names, then ``and k more``."""
  names = list(names)
  more = f" and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def read_tensors(
  model_dir: str | Path,
  table: dict[str, Entry],
  dtype=jnp.float32,
  ignore: Callable[[str], bool] = lambda key: False,
  rename: Callable[[str], str] = lambda key: key,
) -> dict:
  """Reads every tensor of the checkpoint through ``table`` into a nested dict of arrays.

  ``rename`` maps a checkpoint key to the table's spelling (checkpoints name the same tensor
  differently across transformers versions); errors name the key as it is in the file.
  """
  tree: dict = {}
  seen: dict[str, Path] = {}
  for path in safetensors_files(model_dir):
    with open_safetensors(path) as fh:
      for raw in fh.keys():
        key = rename(raw)
        if key not in table:
          if _IGNORED.match(key) or ignore(key):
            continue
          raise ValueError(f"unexpected tensor {raw!r} in {path.name} ({path}): no such parameter")
        if key in seen:
          raise ValueError(f"tensor {raw!r} appears in both {seen[key].name} and {path.name}")
        seen[key] = path
        where, shape, transform = table[key]
        x = np.asarray(fh.get_tensor(raw))
        if tuple(x.shape) != shape:
          raise ValueError(
            f"tensor {raw!r} in {path.name} has shape {tuple(x.shape)}, expected {shape}"
          )
        node = tree
        for name in where[:-1]:
          node = node.setdefault(name, {})
        node[where[-1]] = jnp.asarray(transform(x), dtype=dtype)
  missing = [k for k in table if k not in seen]
  if missing:
    raise ValueError(f"missing tensors in {model_dir}: {first_few(missing)}")
  return tree


def load_params(model_dir, table: dict[str, Entry], dtype=jnp.float32, ignore=lambda key: False):
  """`read_tensors` wrapped as linen variables: ``{"params": nested dict}``."""
  return {"params": read_tensors(model_dir, table, dtype, ignore)}


def nest(table: dict[str, Entry], root: tuple[str, ...]) -> dict[str, Entry]:
  """The same table with every param path under ``root``."""
  return {k: (root + where, shape, fn) for k, (where, shape, fn) in table.items()}


def prefix_renamer(rules: tuple[tuple[str, str], ...]) -> Callable[[str], str]:
  """Renames a key by the first matching (old prefix, new prefix) rule."""

  def rename(key: str) -> str:
    for old, new in rules:
      if key.startswith(old):
        return new + key[len(old) :]
    return key

  return rename


def generation_eos_ids(model_dir: str | Path) -> tuple[int, ...]:
  """EOS ids of ``generation_config.json`` (what transformers' generate stops on), if any."""
  path = Path(model_dir) / "generation_config.json"
  if not path.is_file():
    return ()
  eos = read_json(path).get("eos_token_id")
  return as_int_tuple(eos)
