"""Host side: text prompts (+ images / videos) -> the arrays the HF processor produces.

Prompts mark each image with ``<image>`` and each video with ``<video>``; these are rewritten into
the family's own placeholder text (LLaVA ``<image>``; Qwen2-VL
``<|vision_start|><|image_pad|><|vision_end|>``) before the processor expands them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_MARK, VIDEO_MARK = "<image>", "<video>"
_ARRAYS = (
  "input_ids",
  "attention_mask",
  "pixel_values",
  "image_sizes",
  "image_grid_thw",
  "pixel_values_videos",
  "video_grid_thw",
  "second_per_grid_ts",
)


def load_processor(model_dir: Path, architecture: str):
  """The checkpoint's HF processor with PIL image processing (no torchvision), or None.

  Qwen2-VL's processor also builds a video processor, which exists only with torchvision; when
  that fails the processor is built for images only (videos then go in as processor arrays).
  """
  model_dir = Path(model_dir)
  if not any(
    (model_dir / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")
  ):
    return None
  import transformers

  try:
    return transformers.AutoProcessor.from_pretrained(str(model_dir), backend="pil")
  except ImportError:
    if architecture not in _QWEN_PROCESSORS:
      raise
  cls = getattr(transformers, _QWEN_PROCESSORS[architecture])
  image_processor = transformers.AutoImageProcessor.from_pretrained(str(model_dir), backend="pil")
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  return _images_only(cls)(image_processor=image_processor, tokenizer=tokenizer)


def _images_only(cls):
  """``cls`` without a video processor: transformers takes a processor's parts from the
  ``__init__`` signature, so a subclass that does not name one needs none."""

  class ImagesOnly(cls):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
      super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

  ImagesOnly.__name__ = cls.__name__
  return ImagesOnly


_QWEN_PROCESSORS = {
  "Qwen2VLForConditionalGeneration": "Qwen2VLProcessor",
  "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLProcessor",
}


def _placeholders(model) -> tuple[str, str]:
  """The text that stands for one image / one video before the processor expands it."""
  if model.is_qwen_vl:
    c = model.config
    start, end, image, video = model.tokenizer.convert_ids_to_tokens(
      [c.vision_start_token_id, c.vision_end_token_id, c.image_token_id, c.video_token_id]
    )
    return f"{start}{image}{end}", f"{start}{video}{end}"
  return getattr(model.processor, "image_token", IMAGE_MARK), VIDEO_MARK


def _check_counts(prompts, media, mark: str, what: str):
  media = media if media is not None else [[] for _ in prompts]
  if len(media) != len(prompts):
    raise ValueError(
      f"{len(prompts)} prompts but {len(media)} {what} lists: give one list per prompt"
    )
  for i, (p, items) in enumerate(zip(prompts, media)):
    n = p.count(mark)
    if n != len(items):
      raise ValueError(
        f"prompt {i} has {n} {mark} placeholders but {len(items)} {what}s were given"
      )
  return [x for items in media for x in items]


def prompts_to_arrays(model, prompts: list[str], images, videos, chat_template: bool) -> dict:
  """HF-processor arrays for ``model.prepare(input_ids=..., ...)``."""
  tok = model.tokenizer
  if tok is None:
    raise ValueError("this model has no tokenizer (none in its directory): pass input_ids instead")
  flat_images = _check_counts(prompts, images, IMAGE_MARK, "image")
  flat_videos = _check_counts(prompts, videos, VIDEO_MARK, "video")
  multimodal = model.processor is not None
  if (flat_images or flat_videos) and not multimodal:
    raise ValueError(
      "this model has no image processor (no preprocessor_config.json): it takes no images"
    )
  if flat_videos and getattr(model.processor, "video_processor", None) is None:
    raise ValueError(
      "this processor cannot read videos (transformers' video processors need torchvision): pass "
      "pixel_values_videos and video_grid_thw to prepare(input_ids=...) instead"
    )
  if multimodal:
    image_text, video_text = _placeholders(model)
    prompts = [p.replace(IMAGE_MARK, image_text).replace(VIDEO_MARK, video_text) for p in prompts]
  templated = chat_template and bool(getattr(tok, "chat_template", None))
  if templated:
    prompts = [
      tok.apply_chat_template(
        [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
      )
      for p in prompts
    ]
  if not multimodal:
    rows = [tok(p, add_special_tokens=not templated)["input_ids"] for p in prompts]
    return {"input_ids": rows}
  out = model.processor(
    text=prompts,
    images=flat_images or None,
    videos=flat_videos or None,
    return_tensors="np",
    padding=True,
    add_special_tokens=not templated,
  )
  return {k: np.asarray(out[k]) for k in _ARRAYS if k in out and out[k] is not None}
