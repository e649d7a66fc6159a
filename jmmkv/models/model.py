"""`Model`: a config, its params and (optionally) a tokenizer / processor, with numpy entry points.

One class serves every family; the family-specific parts (vision features, splicing, position
ids) live in `llava` and `qwen2_vl` and are picked by the type of ``config``.
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
from jmmkv.models import llava, mm, qwen2_vl
from jmmkv.models.checkpoints import load_checkpoint, load_config_and_shapes
from jmmkv.models.configs import DecoderConfig
from jmmkv.models.llama import Decoder, init_params
from jmmkv.models.processing import load_processor, prompts_to_arrays

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def dtype_name(dtype) -> str:
  """Normalises "float32"/"fp32"/jnp.float32 and "bfloat16"/"bf16"/jnp.bfloat16."""
  key = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if key not in _DTYPES:
    raise ValueError(f"unsupported dtype {dtype!r}; use 'float32' or 'bfloat16'")
  return _DTYPES[key]


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def embed_text(params, ids_BT, *, cfg: DecoderConfig, dtype: str):
  return Decoder(cfg, jnp.dtype(dtype)).apply(params["text"], ids_BT, method=Decoder.embed)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def forward_logits(params, x_BTD, positions, valid_BT, *, cfg: DecoderConfig, dtype: str):
  """Full-forward logits ``[B, T, V]`` (float32) from embeddings."""
  dec = Decoder(cfg, jnp.dtype(dtype))
  h_BTD = dec.apply(params["text"], x_BTD, positions, valid_BT, method=Decoder.prefill)[0]
  return dec.apply(params["text"], h_BTD, method=Decoder.unembed)


@dataclasses.dataclass
class Model:
  config: Any  # DecoderConfig | llava.LlavaConfig | qwen2_vl.QwenVLConfig
  params: Any = dataclasses.field(repr=False)  # {"text": {"params": ...}, "vision": ..., ...}
  dtype_name: str = "float32"
  tokenizer: Any = dataclasses.field(default=None, repr=False)  # transformers tokenizer, if any
  path: str | None = None
  processor: Any = dataclasses.field(default=None, repr=False)  # HF processor (multimodal)
  mesh: Any = dataclasses.field(default=None, repr=False)  # jax.sharding.Mesh, when sharded

  @property
  def text_config(self) -> DecoderConfig:
    return self.config if isinstance(self.config, DecoderConfig) else self.config.text

  @property
  def is_llava(self) -> bool:
    return isinstance(self.config, llava.LlavaConfig)

  @property
  def is_qwen_vl(self) -> bool:
    return isinstance(self.config, qwen2_vl.QwenVLConfig)

  # ---- vision -------------------------------------------------------------------------------

  def image_features(self, pixel_values, image_sizes=None, image_grid_thw=None) -> list[np.ndarray]:
    """Per image, the features that replace its placeholder tokens, ``[n_i, D]`` each."""
    if self.is_qwen_vl:
      return self._qwen_features(pixel_values, image_grid_thw, "pixel_values")
    if not self.is_llava:
      raise ValueError(
        f"{self.text_config.architecture} is a text-only model: it has no vision tower"
      )
    pix, pack, counts = llava.layout(self.config, pixel_values, image_sizes)
    flat = llava.image_features(self.params, pix, pack, cfg=self.config, dtype=self.dtype_name)
    return np.split(np.asarray(flat, np.float32), np.cumsum(counts)[:-1])

  def video_features(self, pixel_values_videos, video_grid_thw) -> list[np.ndarray]:
    """Per video, ``[n_i, D]`` (Qwen2-VL / Qwen2.5-VL)."""
    if not self.is_qwen_vl:
      raise ValueError("only Qwen2-VL / Qwen2.5-VL models take videos")
    return self._qwen_features(pixel_values_videos, video_grid_thw, "pixel_values_videos")

  def _qwen_features(self, pixel_values, grid_thw, name: str) -> list[np.ndarray]:
    grid = qwen2_vl._grid(grid_thw)
    pix = qwen2_vl.check_pixels(self.config, pixel_values, grid, name)
    flat = qwen2_vl.vision_features(
      self.params, pix, grid=grid, cfg=self.config, dtype=self.dtype_name
    )
    counts = qwen2_vl.num_features(self.config, grid)
    return np.split(np.asarray(flat, np.float32), np.cumsum(counts)[:-1])

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
    if not self.is_qwen_vl:
      raise ValueError("M-RoPE position ids exist only for Qwen2-VL / Qwen2.5-VL models")
    return qwen2_vl.rope_index(
      self.config,
      input_ids,
      mm_token_type_ids,
      image_grid_thw,
      video_grid_thw,
      attention_mask,
      second_per_grid_ts,
    )

  # ---- embedding + positions of any layout --------------------------------------------------

  def _media_counts(self, media: inputs.Media):
    """(image tokens per image, video tokens per video), validating pixel shapes."""
    if media.pixel_values is None and media.pixel_values_videos is None:
      return [], []
    if self.is_llava:
      if media.pixel_values_videos is not None:
        raise ValueError("LLaVA models take no videos")
      return llava.layout(self.config, media.pixel_values, media.image_sizes)[2], []
    if self.is_qwen_vl:
      counts = []
      for pix, grid, name in (
        (media.pixel_values, media.image_grid_thw, "pixel_values"),
        (media.pixel_values_videos, media.video_grid_thw, "pixel_values_videos"),
      ):
        if pix is None:
          counts.append([])
          continue
        if grid is None:
          raise ValueError(f"{name} given without its grid_thw")
        grid = qwen2_vl._grid(grid)
        qwen2_vl.check_pixels(self.config, pix, grid, name)
        counts.append(qwen2_vl.num_features(self.config, grid))
      return counts[0], counts[1]
    raise ValueError(f"{self.text_config.architecture} is a text-only model: it takes no images")

  def embed(self, ids_BT: np.ndarray, media: inputs.Media):
    """Token embeddings ``[B, T, D]`` (a jax array) with the vision features spliced in."""
    ids_BT = np.asarray(ids_BT, np.int32)
    img_counts, vid_counts = self._media_counts(media)
    kw = dict(cfg=self.config, dtype=self.dtype_name)
    if self.is_llava:
      b, t = mm.placeholder_index(ids_BT, self.config.image_token_id, sum(img_counts))
      if not img_counts:
        return embed_text(self.params, ids_BT, cfg=self.text_config, dtype=self.dtype_name)
      pix, pack, _ = llava.layout(self.config, media.pixel_values, media.image_sizes)
      return llava.embed(self.params, ids_BT, pix, pack, b, t, **kw)
    if self.is_qwen_vl:
      c = self.config
      ib, it = mm.placeholder_index(ids_BT, c.image_token_id, sum(img_counts))
      vb, vt = mm.placeholder_index(ids_BT, c.video_token_id, sum(vid_counts), "video")
      igrid = qwen2_vl._grid(media.image_grid_thw) if img_counts else ()
      vgrid = qwen2_vl._grid(media.video_grid_thw) if vid_counts else ()
      ipix = media.pixel_values if img_counts else np.zeros((0, 1), np.float32)
      vpix = media.pixel_values_videos if vid_counts else np.zeros((0, 1), np.float32)
      return qwen2_vl.embed(
        self.params,
        ids_BT,
        np.asarray(ipix),
        np.asarray(vpix),
        ib,
        it,
        vb,
        vt,
        image_grid=igrid,
        video_grid=vgrid,
        **kw,
      )
    return embed_text(self.params, ids_BT, cfg=self.text_config, dtype=self.dtype_name)

  def positions(self, ids_BT: np.ndarray, valid_BT: np.ndarray, media: inputs.Media) -> np.ndarray:
    """RoPE positions: ``[B, T]`` (``cumsum(mask) - 1``) or Qwen2-VL M-RoPE ids ``[3, B, T]``."""
    if self.is_qwen_vl:
      return self.rope_index(
        ids_BT, None, media.image_grid_thw, media.video_grid_thw, valid_BT, media.second_per_grid_ts
      )[0]
    return np.clip(np.cumsum(valid_BT, axis=1) - 1, 0, None)

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
    )
    x_BTD = self.embed(ids_BT, media)
    if position_ids is None:
      if self.is_qwen_vl:
        pos = self.rope_index(
          ids_BT, mm_token_type_ids, image_grid_thw, video_grid_thw, mask_BT, second_per_grid_ts
        )[0]
      else:
        pos = self.positions(ids_BT, mask_BT, media)
    else:
      pos = np.asarray(position_ids)
      if pos.shape[-2:] != ids_BT.shape or pos.ndim not in (2, 3):
        raise ValueError(
          f"position_ids shape {pos.shape} does not match input_ids shape {ids_BT.shape}"
        )
    out = forward_logits(
      self.params, x_BTD, pos.astype(np.int32), mask_BT, cfg=self.text_config, dtype=self.dtype_name
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
  ) -> inputs.Batch:
    """A `Batch` from text prompts (+ images / videos, through the checkpoint's processor) or from
    token ids (+ the HF processor's arrays).

    In prompts, ``<image>`` / ``<video>`` mark where each image / video of that prompt goes;
    ``images[i]`` lists the images of prompt i, ``videos[i]`` its videos (each a list of frames,
    PIL images or ``[H, W, 3]`` uint8 arrays, sampled at ``fps`` frames per second). The chat
    template is applied when the tokenizer has one (``chat_template=False`` turns it off).
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
      arrays = prompts_to_arrays(self, list(prompts), images, videos, chat_template, fps)
      return self.prepare(**arrays)
    media = inputs.Media(
      pixel_values,
      image_sizes,
      image_grid_thw,
      pixel_values_videos,
      video_grid_thw,
      second_per_grid_ts,
    )
    rows = inputs.token_rows(input_ids, attention_mask, self.text_config.vocab_size)
    img_counts, vid_counts = self._media_counts(media)
    image_id = self.config.image_token_id if not isinstance(self.config, DecoderConfig) else None
    video_id = self.config.video_token_id if self.is_qwen_vl else None
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

  Architectures: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``LlavaForConditionalGeneration``,
  ``LlavaNextForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
  ``Qwen2_5_VLForConditionalGeneration``. ``dtype``: "float32" or "bfloat16". ``mesh``: a
  `jax.sharding.Mesh` with axes ``"data"`` and/or ``"model"``; params are placed split over
  heads and MLP width (`jmmkv.sharding`; orbax checkpoints are restored straight onto it) and
  `jmmkv.generate` keeps the cache split over batch and KV heads.
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
  multimodal = not isinstance(cfg, DecoderConfig)
  processor = (
    load_processor(path, cfg.architecture) if tokenizer is not None and multimodal else None
  )
  return Model(cfg, params, name, tokenizer, str(path), processor, mesh)


def random_model(cfg: DecoderConfig, seed: int = 0, dtype="float32") -> Model:
  """A randomly initialised text model (no tokenizer): for the demo, benchmarks and tests."""
  name = dtype_name(dtype)
  return Model(cfg, {"text": init_params(cfg, jax.random.key(seed), jnp.dtype(name))}, name)
