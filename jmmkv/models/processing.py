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
  "batch_num_images",
)


def load_processor(model_dir: Path, images_only: str | None = None):
  """The checkpoint's HF processor with PIL image processing (no torchvision), or None.

  Some processors (Qwen2-VL's, InternVL's) also build a video processor, which exists only with
  torchvision; when that fails and ``images_only`` names the transformers processor class, it is
  built for images only, with the settings of ``processor_config.json`` (videos then go in as
  processor arrays, or as frames through the family's ``frames_processor`` / ``video_arrays``).
  """
  model_dir = Path(model_dir)
  if not any(
    (model_dir / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")
  ):
    return None
  import transformers

  try:
    return transformers.AutoProcessor.from_pretrained(str(model_dir), backend="pil")
  except (ImportError, ValueError) as err:  # no torchvision: a video processor fails to build
    if images_only is None or (isinstance(err, ValueError) and "video processor" not in str(err)):
      raise
  cls = getattr(transformers, images_only)
  image_processor = transformers.AutoImageProcessor.from_pretrained(str(model_dir), backend="pil")
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  return _images_only(cls)(
    image_processor=image_processor, tokenizer=tokenizer, **_processor_kwargs(model_dir, cls)
  )


def _processor_kwargs(model_dir: Path, cls) -> dict:
  """The processor's own settings in ``processor_config.json`` (LLaVA-OneVision's
  ``num_image_tokens``...) that ``cls.__init__`` names, its parts excluded."""
  path = model_dir / "processor_config.json"
  if not path.is_file():
    return {}
  import inspect

  from jmmkv.models.convert import read_json

  names = set(inspect.signature(cls.__init__).parameters)
  names -= {"self", "image_processor", "tokenizer", "video_processor", "kwargs"}
  return {k: v for k, v in read_json(path).items() if k in names}


def _images_only(cls):
  """``cls`` (a processor whose third part is a video processor) without one: transformers takes
  a processor's parts from the ``__init__`` signature, so a subclass that does not name one
  needs none."""

  class ImagesOnly(cls):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
      super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

  ImagesOnly.__name__ = cls.__name__
  return ImagesOnly


def _check_counts(prompts, media, mark: str, what: str):
  """The items of ``media`` (one list per prompt) in prompt order, checked against the
  ``mark`` placeholders of each prompt."""
  media = media if media is not None else [[] for _ in prompts]
  example = "img" if what == "image" else "frames"
  if not isinstance(media, (list, tuple)) or not all(isinstance(m, (list, tuple)) for m in media):
    raise ValueError(
      f"{what}s must be one list per prompt, e.g. {what}s=[[{example}]] for one prompt with "
      f"one {what}"
    )
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


def prompts_to_arrays(
  model,
  prompts: list[str],
  images,
  videos,
  chat_template: bool,
  fps: float = 2.0,
  add_special_tokens: bool | None = None,
) -> dict:
  """HF-processor arrays for ``model.prepare(input_ids=..., ...)``; special tokens (BOS) are
  added by default only when no chat template is applied."""
  tok = model.tokenizer
  if tok is None:
    raise ValueError("this model has no tokenizer (none in its directory): pass input_ids instead")
  original = list(prompts)
  flat_images = _check_counts(prompts, images, IMAGE_MARK, "image")
  flat_videos = _check_counts(prompts, videos, VIDEO_MARK, "video")
  multimodal = model.processor is not None
  if (flat_images or flat_videos) and not multimodal:
    raise ValueError(
      "this model has no image processor (no preprocessor_config.json): it takes no images"
    )
  video = {}
  if flat_videos and getattr(model.processor, "video_processor", None) is None:
    # No torchvision: the family groups the frames for its PIL image processor.
    video = model.family.video_arrays(model, flat_videos, fps)
    flat_videos = []
  if multimodal:
    image_text, video_text = model.family.placeholders(model, IMAGE_MARK, VIDEO_MARK)
    if video:  # an empty vision span, filled with the video's pad tokens after tokenising
      video_text = video_text.replace(
        model.tokenizer.convert_ids_to_tokens(model.config.video_token_id), ""
      )
    prompts = [p.replace(IMAGE_MARK, image_text).replace(VIDEO_MARK, video_text) for p in prompts]
  templated = chat_template and bool(getattr(tok, "chat_template", None))
  if templated:
    prompts = [_apply_chat_template(tok, p) for p in prompts]
  special = not templated if add_special_tokens is None else add_special_tokens
  if not multimodal:
    rows = [tok(p, add_special_tokens=special)["input_ids"] for p in prompts]
    return {"input_ids": rows}
  if flat_images and model.family.images_per_prompt:  # one list per prompt: it tells
    counts = [p.count(IMAGE_MARK) for p in original]  # which prompts hold several
    flat_images = [flat_images[sum(counts[:i]) : sum(counts[: i + 1])] for i in range(len(counts))]
  out = model.processor(
    text=prompts,
    images=flat_images or None,
    videos=flat_videos or None,
    return_tensors="np",
    padding=True,
    add_special_tokens=special,
  )
  arrays = {k: np.asarray(out[k]) for k in _ARRAYS if k in out and out[k] is not None}
  if video:
    counts = qwen_tokens(video["video_grid_thw"], model.config.merge)
    arrays["input_ids"] = _fill_video_spans(
      arrays.pop("input_ids"), arrays.pop("attention_mask"), counts, model.config
    )
  return {**arrays, **video}


def _apply_chat_template(tok, prompt: str) -> str:
  """The prompt as one user turn. Templates differ in what a message's content is (a string, or
  a list of typed parts as llava-hf's): try both, and never return a rendering that lost the
  prompt text."""
  for content in (prompt, [{"type": "text", "text": prompt}]):
    rendered = tok.apply_chat_template(
      [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    if prompt.strip() in rendered:
      return rendered
  raise ValueError(
    "the tokenizer's chat template drops the prompt text (with string or typed-part content): "
    "pass chat_template=False and format the prompt yourself"
  )


_ASKED, _ANSWERED = "jmmkv-earlier-question", "jmmkv-earlier-answer"


def follow_up_text(tok, prompt: str, ended_with: str | None = None) -> str:
  """The text of a next user turn (``prompt``) after an assistant answer, as the tokenizer's
  chat template renders a conversation: what follows the answer in [user, assistant, user]
  with the generation prompt. ``ended_with``: the token the answer ended with (its EOS, already
  in the cache), dropped when the rendering goes on with it. Without a chat template: the
  prompt itself."""
  if not getattr(tok, "chat_template", None):
    return prompt
  for wrap in (lambda x: x, lambda x: [{"type": "text", "text": x}]):
    turns = [("user", _ASKED), ("assistant", _ANSWERED), ("user", prompt)]
    rendered = tok.apply_chat_template(
      [{"role": role, "content": wrap(text)} for role, text in turns],
      add_generation_prompt=True,
      tokenize=False,
    )
    if prompt.strip() in rendered and _ANSWERED in rendered:
      rest = rendered[rendered.index(_ANSWERED) + len(_ANSWERED) :]
      closed = rest.lstrip()
      return closed[len(ended_with) :] if ended_with and closed.startswith(ended_with) else rest
  raise ValueError(
    "the tokenizer's chat template drops a follow-up turn's text: pass input_ids for the turn"
  )


def qwen_tokens(grid_thw, merge: int) -> list[int]:
  return [int(t * h * w) // merge**2 for t, h, w in np.asarray(grid_thw).reshape(-1, 3)]


def _fill_video_spans(ids_BT, mask_BT, counts, cfg) -> list[np.ndarray]:
  """Unpadded rows with ``counts[k]`` video pad tokens put into the k-th empty vision span."""
  counts, rows = list(counts), []
  for ids, mask in zip(ids_BT, mask_BT.astype(bool)):
    ids, out, i = ids[mask], [], 0
    while i < len(ids):
      out.append(ids[i])
      if (
        ids[i] == cfg.vision_start_token_id
        and i + 1 < len(ids)
        and ids[i + 1] == cfg.vision_end_token_id
      ):
        out.extend([cfg.video_token_id] * counts.pop(0))
      i += 1
    rows.append(np.asarray(out, np.int64))
  if counts:
    raise ValueError(f"{len(counts)} videos have no <video> span in the tokenised prompts")
  return rows


def video_arrays(image_processor, videos, fps: float, variant: str) -> dict:
  """Qwen2-VL video arrays from lists of frames, with the PIL image processor.

  Each frame is resized / normalised as an image (the image processor's pixel limits); every
  ``temporal_patch_size`` consecutive frames form one temporal patch (the last frame repeats to
  fill the last one), laid out as transformers' Qwen2-VL video processor does. Qwen2.5-VL also
  gets ``second_per_grid_ts = temporal_patch_size / fps``.
  """
  tp, p = image_processor.temporal_patch_size, image_processor.patch_size
  pixels, grids = [], []
  for i, frames in enumerate(videos):
    frames = list(frames)
    if not frames:
      raise ValueError(f"video {i} has no frames")
    frames += [frames[-1]] * (-len(frames) % tp)
    out = image_processor(images=frames, return_tensors="np")
    grid = np.asarray(out["image_grid_thw"])
    if not (grid == grid[0]).all():
      raise ValueError(f"the frames of video {i} do not all have the same size")
    _, gh, gw = (int(x) for x in grid[0])
    n = len(frames)
    x = np.asarray(out["pixel_values"]).reshape(n, gh * gw, -1, tp, p, p)[
      :, :, :, 0
    ]  # [n, P, C, p, p]
    x = x.reshape(n // tp, tp, gh * gw, -1, p, p).transpose(0, 2, 3, 1, 4, 5)  # [t, P, C, tp, p, p]
    pixels.append(x.reshape(n // tp * gh * gw, -1))
    grids.append([n // tp, gh, gw])
  out = {"pixel_values_videos": np.concatenate(pixels), "video_grid_thw": np.array(grids, np.int64)}
  if variant == "qwen2_5_vl":
    out["second_per_grid_ts"] = np.full(len(grids), tp / fps, np.float32)
  return out
