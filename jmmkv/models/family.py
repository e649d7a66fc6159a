"""A model family as an adapter: everything that differs between architectures, behind one object.

`jmmkv.Model` and the loader never branch on the architecture: they ask the config's family
(`jmmkv.models.families.for_config`, `for_architecture`). A family reads its HF config and
checkpoint keys, counts and computes its media features, splices them into the embeddings, gives
the prompt's RoPE positions and the placeholder text its processor expands. `Family` is the
text-only decoder (Llama, Qwen2) and holds the defaults; `Multimodal` the parts every vision
family shares. A new family is one module defining its config, modules and a subclass, plus one
line in `jmmkv.models.families.FAMILIES` (docs/adding_a_family.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jmmkv import inputs
from jmmkv.models import convert, mm
from jmmkv.models.configs import DecoderConfig, decoder_config_from_hf
from jmmkv.models.llama import Decoder


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def embed_text(params, ids_BT, *, cfg: DecoderConfig, dtype: str):
  """Token embeddings ``[B, T, D]`` of the text decoder."""
  return Decoder(cfg, jnp.dtype(dtype)).apply(params["text"], ids_BT, method=Decoder.embed)


def text_table(cfg: DecoderConfig, prefix: str, head_key: str):
  """The decoder's checkpoint keys under ``prefix``, nested at ``params["text"]["params"]``."""
  return convert.nest(convert.decoder_key_table(cfg, prefix, head_key), ("text", "params"))


class Family:
  """A text-only decoder; the defaults of every family (methods take the `jmmkv.Model`)."""

  name = "text decoder"
  architectures: tuple[str, ...] = ("LlamaForCausalLM", "Qwen2ForCausalLM")
  config_type: type = DecoderConfig
  renames: tuple[tuple[str, str], ...] = ()  # checkpoint key prefixes -> the hub's spelling
  multimodal = False  # takes images (a processor, a vision tower)
  takes_videos = False
  images_per_prompt = False  # its processor takes images as one list per prompt, not flat

  # ---- loading ------------------------------------------------------------------------------

  def config_from_hf(self, hf_cfg: dict, architecture: str, eos_ids: tuple[int, ...]):
    """The jmmkv config of an HF ``config.json`` (``eos_ids``: generation_config's, if any)."""
    cfg = decoder_config_from_hf(hf_cfg, architecture)
    return dataclasses.replace(cfg, eos_token_ids=eos_ids or cfg.eos_token_ids)

  def key_table(self, cfg) -> dict[str, convert.Entry]:
    """HF checkpoint key -> (param path, HF shape, transform)."""
    return text_table(cfg, "model.", "lm_head.weight")

  def text_config(self, cfg) -> DecoderConfig:
    return cfg

  # ---- media --------------------------------------------------------------------------------

  def image_token_id(self, cfg) -> int | None:
    return None

  def video_token_id(self, cfg) -> int | None:
    return None

  def no_images(self, model) -> ValueError:
    return ValueError(f"{model.text_config.architecture} is a text-only model: it takes no images")

  def no_videos(self, model) -> ValueError:
    from jmmkv.models import families  # the registry imports every family

    return ValueError(
      f"{model.config.architecture} takes no videos; models that do: "
      f"{', '.join(f.name for f in families.FAMILIES if f.takes_videos)}"
    )

  def media_counts(self, model, media: inputs.Media) -> tuple[list[int], list[int]]:
    """(tokens per image, tokens per video), the pixel arrays' shapes checked."""
    if media.pixel_values is None and media.pixel_values_videos is None:
      return [], []
    raise self.no_images(model)

  def image_features(
    self, model, pixel_values, image_sizes=None, image_grid_thw=None, batch_num_images=None
  ):
    """Per image, the features that replace its placeholder tokens, ``[n_i, D]`` each."""
    raise ValueError(
      f"{model.text_config.architecture} is a text-only model: it has no vision tower"
    )

  def video_features(self, model, pixel_values_videos, video_grid_thw):
    """Per video, ``[n_i, D]``."""
    raise self.no_videos(model)

  def embed(self, model, ids_BT: np.ndarray, media: inputs.Media, counts):
    """Token embeddings ``[B, T, D]`` with the media features spliced in (``counts``: from
    `media_counts`)."""
    return embed_text(model.params, ids_BT, cfg=model.text_config, dtype=model.dtype_name)

  def positions(self, model, ids_BT, valid_BT, media: inputs.Media, mm_token_type_ids=None):
    """The prompt's RoPE positions: ``[B, T]`` (``cumsum(mask) - 1``), or ``[3, B, T]``."""
    return np.clip(np.cumsum(valid_BT, axis=1) - 1, 0, None)

  def rope_index(self, model, *args, **kwargs):
    raise ValueError("M-RoPE position ids exist only for Qwen2-VL / Qwen2.5-VL models")

  # ---- the processor (host side, `jmmkv.models.processing`) -----------------------------------

  def images_only_processor(self, architecture: str) -> str | None:
    """The transformers processor class to build without a video processor when AutoProcessor
    needs torchvision for one (None: no such fallback)."""
    return None

  def placeholders(self, model, image_mark: str, video_mark: str) -> tuple[str, str]:
    """The text that stands for one image / one video before the processor expands it."""
    return getattr(model.processor, "image_token", image_mark), video_mark

  def frames_processor(self, processor):
    """A torchvision-free stand-in for ``processor``'s video processor, set on processors
    built without one (None: videos take the `video_arrays` path)."""
    return None

  def video_arrays(self, model, frames: list, fps: float) -> dict:
    """Processor arrays of videos given as frames, without torchvision."""
    raise self.no_videos(model)


class Multimodal(Family):
  """What every vision family shares: a ``config.text`` decoder, tied at the top level."""

  multimodal = True

  # Whether the head is tied to the embeddings when config.json's top level does not say (None:
  # the text config's flag). transformers' config classes differ (InternVL True, Qwen3-VL False).
  tie_default: bool | None = None

  def config_from_hf(self, hf_cfg: dict, architecture: str, eos_ids: tuple[int, ...]):
    cfg = self.parse_config(hf_cfg, architecture)
    text = dataclasses.replace(  # multimodal checkpoints tie (or not) at the top level
      cfg.text,
      tie_word_embeddings=self.tied(hf_cfg, cfg.text.tie_word_embeddings),
      eos_token_ids=eos_ids or cfg.text.eos_token_ids,
    )
    return dataclasses.replace(cfg, text=text)

  def tied(self, hf_cfg: dict, text_tied: bool) -> bool:
    """The checkpoint's ``tie_word_embeddings``, read as its transformers config class does."""
    default = text_tied if self.tie_default is None else self.tie_default
    return bool(hf_cfg.get("tie_word_embeddings", default))

  def parse_config(self, hf_cfg: dict, architecture: str):
    raise NotImplementedError

  def text_config(self, cfg) -> DecoderConfig:
    return cfg.text

  def image_token_id(self, cfg) -> int | None:
    return cfg.image_token_id


class FixedTokens(Multimodal):
  """A family whose every picture (an image, or a tile of one) is one ``[C, S, S]`` row of
  ``pixel_values`` and becomes the same number of tokens (InternVL, Gemma 3). Subclasses give
  the count and two jitted functions of the module: all pictures' features in order, and the
  embeddings with them spliced in."""

  picture = "images"  # what a row of pixel_values is, in messages

  def tokens_per_picture(self, cfg) -> int:
    raise NotImplementedError

  def features(self, params, pixel_NCSS, *, cfg, dtype: str):
    """``[N * tokens_per_picture, D]``."""
    raise NotImplementedError

  def splice(self, params, ids_BT, pixel_NCSS, b_idx, t_idx, *, cfg, dtype: str):
    """``[B, T, D]``: the token embeddings with the features at ``(b_idx, t_idx)``."""
    raise NotImplementedError

  def pixels(self, cfg, pixel_values) -> np.ndarray:
    pix = np.asarray(pixel_values)
    c, s = cfg.vision.num_channels, cfg.vision.image_size
    if pix.ndim != 4 or pix.shape[1:] != (c, s, s):
      raise ValueError(
        f"pixel_values must have shape [{self.picture}, {c}, {s}, {s}], got shape {pix.shape}"
      )
    return pix

  def media_counts(self, model, media: inputs.Media):
    if media.pixel_values_videos is not None:
      raise self.no_videos(model)
    if media.pixel_values is None:
      return [], []
    pix = self.pixels(model.config, media.pixel_values)
    return [self.tokens_per_picture(model.config)] * len(pix), []

  def image_features(
    self, model, pixel_values, image_sizes=None, image_grid_thw=None, batch_num_images=None
  ):
    pix = self.pixels(model.config, pixel_values)
    flat = self.features(model.params, pix, cfg=model.config, dtype=model.dtype_name)
    return np.split(np.asarray(flat, np.float32), len(pix))

  def embed(self, model, ids_BT, media: inputs.Media, counts):
    img_counts = counts[0]
    b, t = mm.placeholder_index(ids_BT, model.config.image_token_id, sum(img_counts))
    if not img_counts:
      return embed_text(model.params, ids_BT, cfg=model.text_config, dtype=model.dtype_name)
    pix = self.pixels(model.config, media.pixel_values)
    return self.splice(model.params, ids_BT, pix, b, t, cfg=model.config, dtype=model.dtype_name)
