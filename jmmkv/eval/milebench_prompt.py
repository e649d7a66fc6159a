"""MileBench prompts: instruction, context with image markers, choice list, and truncation.

Rules from MileBench's ``utils.py`` (``MileBenchDataset.__getitem__``), re-implemented:

- A multiple-choice sample's context gets ``"\\nChoice list: \\n"`` + one ``"<L>. <choice>"`` line
  per choice (L = A, B, ...; GPR1200's lines are the bare choices) + ``"\\nYour answer is: "``.
- Then every ``{image#k}`` / ``{table#k}`` (k = 1..number of images) becomes an image marker, and
  the prompt is ``instruction + "\\n" + context``.
- Over the model's limit, the instruction is kept whole and the context is cut from its start:
  walking back from the last text piece (the question), each piece is kept whole while it fits,
  then the image before it while that fits; the first piece that does not fit ends the walk (if
  it is the last piece, its last tokens that fit are kept). The kept context starts with a marker
  when the last thing kept was an image.

Where we differ, and why: MileBench hands images out in list order, one per marker; we give
``{image#k}`` the k-th image (the same when markers are in order, as in MileBench's data) and drop
images no marker names. Its truncation counts a fixed ``n_tokens_per_image``; we count each
image's own tokens (from the processor) and keep kept text verbatim instead of re-decoding it.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from jmmkv.eval.milebench_data import Sample

IMAGE = "<image>"  # what model.prepare reads as "an image goes here"
_PLACEHOLDER = re.compile(r"\{(?:image|table)#(\d+)\}")


def choice_block(choices: Sequence[str], task: str) -> str:
  lines = [c if task == "GPR1200" else f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)]
  return "\nChoice list: \n" + "\n".join(lines) + "\nYour answer is: "


def place_images(context: str, n_images: int) -> tuple[str, list[int]]:
  """``context`` with each ``{image#k}`` / ``{table#k}`` (1 <= k <= n_images) replaced by
  `IMAGE`, and the image index (k - 1) of each marker in order. Other k stay text, as in
  MileBench. A literal ``<image>`` already in the text is spaced out so it is no marker."""
  order: list[int] = []

  def mark(m: re.Match) -> str:
    k = int(m.group(1))
    if not 1 <= k <= n_images:
      return m.group(0)
    order.append(k - 1)
    return IMAGE

  return _PLACEHOLDER.sub(mark, context.replace(IMAGE, "< image >")), order


def build_prompt(sample: Sample, task: str) -> tuple[str, str, list[int]]:
  """(instruction, context with markers, image index per marker) of a sample, untruncated."""
  context = sample.context
  if sample.choices is not None:
    context += choice_block(sample.choices, task)
  context, order = place_images(context, len(sample.images))
  return sample.instruction, context, order


def join(instruction: str, context: str) -> str:
  return instruction + "\n" + context


def truncate(
  instruction: str,
  context: str,
  image_tokens: Sequence[int],
  max_len: int,
  count: Callable[[str], int],
  tail: Callable[[str, int], str],
) -> tuple[str, list[int]]:
  """MileBench's truncation of the oldest context: (prompt, indices of the kept markers).

  ``image_tokens[j]``: tokens of the j-th marker's image; ``count(text)``: tokens of a text;
  ``tail(text, n)``: the text of its last n tokens; ``max_len``: tokens for instruction + context.
  """
  pieces = context.split(IMAGE)
  if len(pieces) != len(image_tokens) + 1:
    raise ValueError(f"{len(pieces) - 1} image markers but {len(image_tokens)} image token counts")
  room = max_len - count(instruction)
  kept_text: list[str] = []
  kept_images: list[int] = []
  used, image_first = 0, False
  for i in range(len(pieces) - 1, -1, -1):
    n = count(pieces[i])
    if used + n > room:
      if not kept_text:
        kept_text.append(tail(pieces[i], max(room, 0)))
      break
    kept_text.insert(0, pieces[i])
    used, image_first = used + n, False
    if i == 0 or used + image_tokens[i - 1] > room:
      break
    kept_images.insert(0, i - 1)
    used, image_first = used + image_tokens[i - 1], True
  body = IMAGE.join(kept_text)
  return join(instruction, IMAGE + body if image_first else body), kept_images
