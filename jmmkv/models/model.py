"""`Model`: a config, its params and (optionally) a tokenizer / processor, with numpy entry points.

One class serves every family: what differs between architectures (vision features, media token
counts, splicing, position ids, the processor's placeholders) is the family adapter's
(`jmmkv.models.family`), chosen once from the type of ``config`` (`jmmkv.models.families`).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmmkv import inputs, sharding
from jmmkv.models import families, mm
from jmmkv.models.checkpoints import load_checkpoint, load_config_and_shapes
from jmmkv.models.configs import DecoderConfig
from jmmkv.models.family import Family
from jmmkv.models.llama import Decoder, init_params
from jmmkv.models.processing import load_processor, prompts_to_arrays
from jmmkv.typing import IMAGE, PAD, TEXT

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def dtype_name(dtype) -> str:
  """Normalises "float32"/"fp32"/jnp.float32 and "bfloat16"/"bf16"/jnp.bfloat16."""
  key = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if key not in _DTYPES:
    raise ValueError(f"unsupported dtype {dtype!r}; use 'float32' or 'bfloat16'")
  return _DTYPES[key]


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def forward_logits(
  params, x_BTD, positions, valid_BT, modality_BT, *, cfg: DecoderConfig, dtype: str
):
  """Full-forward logits ``[B, T, V]`` (float32) from embeddings."""
  dec = Decoder(cfg, jnp.dtype(dtype))
  h_BTD = dec.apply(
    params["text"], x_BTD, positions, valid_BT, modality_BT, method=Decoder.prefill
  )[0]
  return dec.apply(params["text"], h_BTD, method=Decoder.unembed)


@dataclasses.dataclass
class Model:
  config: Any  # a family's config (`jmmkv.models.families`): DecoderConfig, LlavaConfig, ...
  params: Any = dataclasses.field(repr=False)  # {"text": {"params": ...}, "vision": ..., ...}
  dtype_name: str = "float32"
  tokenizer: Any = dataclasses.field(default=None, repr=False)  # transformers tokenizer, if any
  path: str | None = None
  processor: Any = dataclasses.field(default=None, repr=False)  # HF processor (multimodal)
  mesh: Any = dataclasses.field(default=None, repr=False)  # jax.sharding.Mesh, when sharded

  @property
  def family(self) -> Family:
    """The architecture's adapter (`jmmkv.models.family`)."""
    return families.for_config(self.config)

  @property
  def text_config(self) -> DecoderConfig:
    return self.family.text_config(self.config)

  # ---- vision -------------------------------------------------------------------------------

  def image_features(
    self, pixel_values, image_sizes=None, image_grid_thw=None, batch_num_images=None
  ) -> list[np.ndarray]:
    """Per image, the features that replace its placeholder tokens, ``[n_i, D]`` each."""
    return self.family.image_features(
      self, pixel_values, image_sizes, image_grid_thw, batch_num_images
    )

  def video_features(self, pixel_values_videos, video_grid_thw) -> list[np.ndarray]:
    """Per video, ``[n_i, D]`` (Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision)."""
    return self.family.video_features(self, pixel_values_videos, video_grid_thw)

  def rope_index(
    self,
    input_ids,
    mm_token_type_ids=None,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    second_per_grid_ts=None,
  ):
    """Qwen2-VL M-RoPE ids ``[3, B, T]`` and deltas ``[B, 1]`` (as HF ``get_rope_index``)."""
    return self.family.rope_index(
      self,
      input_ids,
      mm_token_type_ids,
      image_grid_thw,
      video_grid_thw,
      attention_mask,
      second_per_grid_ts,
    )

  # ---- embedding + positions of any layout --------------------------------------------------

  def embed(self, ids_BT: np.ndarray, media: inputs.Media):
    """Token embeddings ``[B, T, D]`` (a jax array) with the vision features spliced in."""
    ids_BT = np.asarray(ids_BT, np.int32)
    return self.family.embed(self, ids_BT, media, self.family.media_counts(self, media))

  def positions(self, ids_BT: np.ndarray, valid_BT: np.ndarray, media: inputs.Media) -> np.ndarray:
    """RoPE positions: ``[B, T]`` (``cumsum(mask) - 1``) or Qwen2-VL M-RoPE ids ``[3, B, T]``."""
    return self.family.positions(self, ids_BT, valid_BT, media)

  # ---- public numpy entry points ------------------------------------------------------------

  def logits(
    self,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_sizes=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    mm_token_type_ids=None,
    second_per_grid_ts=None,
    position_ids=None,
    batch_num_images=None,
  ) -> np.ndarray:
    """Full-forward logits ``[B, T, V]`` (float32 numpy) for the HF forward's named inputs.

    ``attention_mask`` marks real tokens (left or right padding). ``position_ids`` default to
    ``cumsum(mask) - 1`` (as transformers' generate), or to M-RoPE ids for Qwen2-VL. Logits at
    padding are unspecified.
    """
    ids_BT = np.asarray(input_ids)
    if ids_BT.ndim != 2:
      raise ValueError(f"input_ids must be [B, T], got shape {ids_BT.shape}")
    if not np.issubdtype(ids_BT.dtype, np.integer):
      raise ValueError(f"input_ids must be integers, got {ids_BT.dtype}")
    vocab = self.text_config.vocab_size
    if ids_BT.min() < 0 or ids_BT.max() >= vocab:
      raise ValueError(f"input_ids outside [0, {vocab}): min {ids_BT.min()}, max {ids_BT.max()}")
    mask_BT = (
      np.ones(ids_BT.shape, bool)
      if attention_mask is None
      else np.asarray(attention_mask).astype(bool)
    )
    if mask_BT.shape != ids_BT.shape:
      raise ValueError(f"attention_mask shape {mask_BT.shape} != input_ids shape {ids_BT.shape}")
    media = inputs.Media(
      pixel_values,
      image_sizes,
      image_grid_thw,
      pixel_values_videos,
      video_grid_thw,
      second_per_grid_ts,
      batch_num_images,
    )
    x_BTD = self.embed(ids_BT, media)
    if position_ids is None:
      pos = self.family.positions(self, ids_BT, mask_BT, media, mm_token_type_ids)
    else:
      pos = np.asarray(position_ids)
      if pos.shape[-2:] != ids_BT.shape or pos.ndim not in (2, 3):
        raise ValueError(
          f"position_ids shape {pos.shape} does not match input_ids shape {ids_BT.shape}"
        )
    modality_BT = np.where(mask_BT, TEXT, PAD).astype(np.int32)
    image_id = self.family.image_token_id(self.config)
    if image_id is not None:  # image tokens told apart (Gemma 3 attends among them both ways)
      modality_BT[mask_BT & (ids_BT == image_id)] = IMAGE
    out = forward_logits(
      self.params,
      x_BTD,
      pos.astype(np.int32),
      mask_BT,
      modality_BT,
      cfg=self.text_config,
      dtype=self.dtype_name,
    )
    return np.asarray(out)

  def prepare(
    self,
    prompts: Sequence[str] | None = None,
    images=None,
    videos=None,
    input_ids=None,
    attention_mask=None,
    chat_template: bool = True,
    pixel_values=None,
    image_sizes=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    mm_token_type_ids=None,
    second_per_grid_ts=None,
    fps: float = 2.0,
    batch_num_images=None,
    add_special_tokens: bool | None = None,
  ) -> inputs.Batch:
    """A `Batch` from text prompts (+ images / videos, through the checkpoint's processor) or from
    token ids (+ the HF processor's arrays).

    In prompts, ``<image>`` / ``<video>`` mark where each image / video of that prompt goes;
    ``images[i]`` lists the images of prompt i, ``videos[i]`` its videos (each a list of frames,
    PIL images or ``[H, W, 3]`` uint8 arrays, sampled at ``fps`` frames per second). The chat
    template is applied when the tokenizer has one (``chat_template=False`` turns it off).
    ``add_special_tokens`` (BOS): by default only without a chat template (False for a
    conversation's next turn: `jmmkv.Conversation`).
    ``mm_token_type_ids`` is accepted for symmetry with the HF processor output and derived from
    the ids.
    """
    del mm_token_type_ids  # derived from the ids
    if (prompts is None) == (input_ids is None):
      raise ValueError("give exactly one of prompts=... or input_ids=...")
    if prompts is not None:
      if isinstance(prompts, str):
        prompts = [prompts]
      if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
      arrays = prompts_to_arrays(
        self, list(prompts), images, videos, chat_template, fps, add_special_tokens
      )
      return self.prepare(**arrays)
    media = inputs.Media(
      pixel_values,
      image_sizes,
      image_grid_thw,
      pixel_values_videos,
      video_grid_thw,
      second_per_grid_ts,
      batch_num_images,
    )
    rows = inputs.token_rows(input_ids, attention_mask, self.text_config.vocab_size)
    img_counts, vid_counts = self.family.media_counts(self, media)
    image_id = self.family.image_token_id(self.config)
    video_id = self.family.video_token_id(self.config)
    for token, counts, what in ((image_id, img_counts, "image"), (video_id, vid_counts, "video")):
      if token is not None:
        mm.check_count(sum(int((r == token).sum()) for r in rows), sum(counts), what)
    modality, media_index = mm.modality_rows(rows, image_id, video_id, img_counts, vid_counts)
    return inputs.Batch(tuple(rows), modality, media_index, media)

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


def _check_model_dir(path: Path) -> None:
  if not path.exists():
    raise FileNotFoundError(f"model directory {path} does not exist")
  if not path.is_dir():
    raise NotADirectoryError(
      f"{path} is not a directory; give a model directory (HF or jmmkv checkpoint)"
    )


def load(path: str | Path, dtype="float32", mesh=None) -> Model:
  """Loads an HF directory (config.json + *.safetensors, sharded or not, + tokenizer/processor
  files) or a checkpoint written by `jmmkv.save` (orbax params + the same config files).

  Architectures: `jmmkv.models.families.ARCHITECTURES` (Llama, Qwen2, Qwen3, Mistral, Gemma 3
  text, LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, InternVL, Qwen2-VL, Qwen2.5-VL, Qwen3-VL).
  ``dtype``: "float32" or "bfloat16". ``mesh``: a `jax.sharding.Mesh` with axes ``"data"``
  and/or ``"model"``; params are placed split over heads and MLP width (`jmmkv.sharding`; orbax
  checkpoints are restored straight onto it) and `jmmkv.generate` keeps the cache split over
  batch and KV heads.
  """
  path = Path(path)
  _check_model_dir(path)
  name = dtype_name(dtype)
  from jmmkv import ckpt  # orbax is imported only for checkpoints

  if mesh is not None:
    mesh = sharding.check_mesh(mesh)
  if ckpt.is_checkpoint(path):  # written by jmmkv.save: orbax params + the HF config files
    cfg, shapes = load_config_and_shapes(path)
    params = ckpt.restore_params(path, jnp.dtype(name), shapes, mesh)
  elif ckpt.is_partial(path):
    raise ValueError(
      f"{path} is an incomplete jmmkv checkpoint (params/ but no {ckpt.MARKER}: its convert "
      "did not finish); convert the model again"
    )
  else:
    cfg, params = load_checkpoint(path, jnp.dtype(name))
    if mesh is not None:
      params = sharding.shard_params(params, mesh)
  tokenizer = _load_tokenizer(path)
  family = families.for_config(cfg)
  multimodal = family.multimodal
  images_only = family.images_only_processor(cfg.architecture) if multimodal else None
  processor = load_processor(path, images_only) if tokenizer is not None and multimodal else None
  if processor is not None and getattr(processor, "video_processor", None) is None:
    frames = family.frames_processor(processor)  # no torchvision: a PIL stand-in, if any
    if frames is not None:
      processor.video_processor = frames
  return Model(cfg, params, name, tokenizer, str(path), processor, mesh)


def random_model(cfg: DecoderConfig, seed: int = 0, dtype="float32") -> Model:
  """A randomly initialised text model (no tokenizer): for the demo, benchmarks and tests."""
  name = dtype_name(dtype)
  return Model(cfg, {"text": init_params(cfg, jax.random.key(seed), jnp.dtype(name))}, name)
