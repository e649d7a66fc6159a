"""Synthetic long-context multimodal tasks (in the spirit of MileBench's categories).

Every sample is a long interleaved prompt: filler text, ``<image>`` markers (one per image) and a
question at the end, whose one-word answer can only be found by attending to one or a few
specific images or sentences far back in the context. The model replies by first naming what was
asked about, then the answer (`echo`): "what colour is the star ?" -> "star red </s>". Two
reasons: `jmmkv.generate` takes the first new token from the prefill logits, before the cache is
compressed, so the answer must come later for a policy to matter; and the echoed word is a query
the answer can be looked up with in one attention hop, which a tiny model learns much faster:

  image_needle  N coloured shapes; exactly one shows the queried shape.
                "what colour is the star ?" -> "red"
  text_needle   coloured-shape images between filler text hiding one passkey sentence
                "the passkey is 47 ." ; "what is the passkey ?" -> "47" (echo "passkey");
                with ``keys`` > 1, colour-named: "the blue passkey is 47 ." ...
                "what is the blue passkey ?" -> "47" (echo "blue")
  temporal      a block of N consecutive frames (all distinct colour/shape pairs) inside filler
                text; "what colour comes after the red star ?" -> colour of the next frame
  counting      N coloured shapes; "how many images are red ?" -> "0" .. str(max_count)

Generation is deterministic: sample ``i`` of a split is a pure function of (split, task, seed, i,
settings), drawn from its own ``numpy.random.Generator``. The held-out split (`heldout`) and the
training stream (`episodes` with split="train") use different seed-sequence roots, so they never
share a generator. Training episodes may ask several questions about one context (`Episode`);
an evaluation sample asks one (`Sample`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image

from jmmkv.synthetic import images as draw

TASKS = ("image_needle", "text_needle", "temporal", "counting")
IMAGE = "<image>"
IMAGE_TOKENS = 16  # tokens per image of the bundled model ((32 / 8) ** 2, CLS dropped)
COLOURS = tuple(draw.COLOURS)
SHAPES = draw.SHAPES
MAX_COUNT = 3
PASSKEYS = tuple(str(n) for n in range(10, 100))
FILLER = tuple(
  """time year people way day man thing child world school state family student group country
  problem hand part place case week company system program work government night point home
  water room mother area money story fact month lot study book eye job word business issue side
  kind head house service friend father power hour game line end member law car city""".split()
)
QUESTION_WORDS = tuple("what colour is the comes after how many images are passkey ? . :".split())
_SPLITS = {"train": 0, "heldout": 1}


@dataclasses.dataclass(frozen=True)
class TaskSettings:
  """Prompt size: ``n_images`` images (frames for temporal), ``filler`` mean filler words per
  gap between images; ``keys`` passkey sentences (text_needle)."""

  n_images: int = 16
  filler: int = 6
  keys: int = 1


DEFAULTS = TaskSettings()


@dataclasses.dataclass
class Sample:
  prompt: str  # text with one IMAGE marker per image, ending with the question
  images: list[Image.Image]
  answer: str  # one token (the model's reply is `echo`, answer, EOS)
  task: str

  @property
  def echo(self) -> str:
    return echo(self.task, self.prompt)

  def split(self) -> tuple[str, str]:
    """(context, question): the prompt cut before its question (which starts with "what" or
    "how", words no context holds)."""
    words = self.prompt.split(" ")
    start = max(i for i, w in enumerate(words) if w in ("what", "how"))
    return " ".join(words[:start]), " ".join(words[start:])


@dataclasses.dataclass
class Episode:
  """One context with several (question, answer) pairs (training); `sample` picks one."""

  context: str
  images: list[Image.Image]
  qa: list[tuple[str, str]]
  task: str
  # What each image shows, for tests and analysis: (colour, shape) per image.
  contents: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def sample(self, i: int = 0) -> Sample:
    q, a = self.qa[i]
    return Sample(f"{self.context} {q}", self.images, a, self.task)


def echo(task: str, question: str) -> str:
  """The words a reply starts with (taken from the end of ``question``): the shape (image
  needle), "passkey" or the passkey's colour (text needle), the colour and shape (temporal), the
  colour (counting)."""
  w = question.split()
  if task == "text_needle":
    return w[-3] if w[-3] in COLOURS else w[-2]
  return " ".join(w[-3:-1]) if task == "temporal" else w[-2]


def num_tokens(prompt: str, image_tokens: int = IMAGE_TOKENS) -> int:
  """Prompt length in tokens for the bundled tokenizer (BOS included)."""
  return 1 + len(prompt.split()) + prompt.count(IMAGE) * (image_tokens - 1)


def rng_for(split: str, task: str, seed: int, index: int) -> np.random.Generator:
  if split not in _SPLITS:
    raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
  return np.random.default_rng([_SPLITS[split], TASKS.index(task), seed, index])


def _words(rng: np.random.Generator, n: int) -> list[str]:
  return [FILLER[i] for i in rng.integers(0, len(FILLER), n)]


def _gaps(rng: np.random.Generator, n: int, mean: int) -> list[list[str]]:
  """``n`` runs of filler words, each of ``0 .. 2 * mean`` words."""
  return [_words(rng, int(k)) for k in rng.integers(0, 2 * mean + 1, n)]


def _interleave(gaps: list[list[str]], n_images: int) -> str:
  parts = []
  for i in range(n_images + 1):
    parts += gaps[i]
    if i < n_images:
      parts.append(IMAGE)
  return " ".join(parts)


def _draw(rng, contents):
  return [draw.shape_image(shape, colour, rng) for colour, shape in contents]


def _random_contents(rng, n: int, colours=COLOURS, shapes=SHAPES):
  return [
    (colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))])
    for _ in range(n)
  ]


def _image_needle(rng, s: TaskSettings, n_questions: int) -> Episode:
  if not 1 <= n_questions <= 3 or s.n_images < n_questions:
    raise ValueError("image_needle: 1 <= n_questions <= min(3, n_images)")
  needles = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n_questions]]
  others = tuple(x for x in SHAPES if x not in needles)
  contents = _random_contents(rng, s.n_images - n_questions, shapes=others)
  contents += [(COLOURS[int(rng.integers(len(COLOURS)))], shape) for shape in needles]
  contents = [contents[i] for i in rng.permutation(len(contents))]
  colour_of = {shape: colour for colour, shape in contents if shape in needles}
  qa = [(f"what colour is the {shape} ?", colour_of[shape]) for shape in needles]
  context = _interleave(_gaps(rng, s.n_images + 1, s.filler), s.n_images)
  return Episode(context, _draw(rng, contents), qa, "image_needle", contents)


def _text_needle(rng, s: TaskSettings, n_questions: int) -> Episode:
  keys = max(s.keys, n_questions)
  if keys > len(COLOURS):
    raise ValueError(f"text_needle: at most {len(COLOURS)} keys")
  colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))[:keys]]
  values = [PASSKEYS[i] for i in rng.permutation(len(PASSKEYS))[:keys]]
  contents = _random_contents(rng, s.n_images)
  gaps = _gaps(rng, s.n_images + 1, s.filler)
  names = [f"{c} passkey" for c in colours] if keys > 1 else ["passkey"]
  for name, value in zip(names, values):  # a sentence is one item: never split by another
    g = int(rng.integers(len(gaps)))
    gaps[g].insert(int(rng.integers(len(gaps[g]) + 1)), f"the {name} is {value} .")
  asked = rng.permutation(keys)[:n_questions]
  qa = [(f"what is the {names[i]} ?", values[i]) for i in asked]
  context = _interleave(gaps, s.n_images)
  return Episode(context, _draw(rng, contents), qa, "text_needle", contents)


def _temporal(rng, s: TaskSettings, n_questions: int) -> Episode:
  pairs = [(c, sh) for c in COLOURS for sh in SHAPES]
  if not 2 <= s.n_images <= len(pairs) or not 1 <= n_questions < s.n_images:
    raise ValueError(f"temporal: 2 <= n_images <= {len(pairs)}, 1 <= n_questions < n_images")
  contents = [pairs[i] for i in rng.permutation(len(pairs))[: s.n_images]]
  words = _words(rng, int(rng.integers(0, 2 * s.filler + 1, s.n_images + 1).sum()))
  cut = int(rng.integers(len(words) + 1))
  context = " ".join(words[:cut] + [IMAGE] * s.n_images + words[cut:])
  anchors = rng.permutation(s.n_images - 1)[:n_questions]
  qa = [
    (f"what colour comes after the {contents[j][0]} {contents[j][1]} ?", contents[j + 1][0])
    for j in anchors
  ]
  return Episode(context, _draw(rng, contents), qa, "temporal", contents)


def _counting(rng, s: TaskSettings, n_questions: int) -> Episode:
  if not 1 <= n_questions <= 4:
    raise ValueError("counting: 1 <= n_questions <= 4")
  targets = [COLOURS[i] for i in rng.permutation(len(COLOURS))[:n_questions]]
  cap = min(MAX_COUNT, s.n_images // n_questions)  # short (curriculum) contexts count less
  counts = [int(c) for c in rng.integers(0, cap + 1, n_questions)]
  others = tuple(c for c in COLOURS if c not in targets)
  contents = [
    (c, SHAPES[int(rng.integers(len(SHAPES)))]) for c, k in zip(targets, counts) for _ in range(k)
  ]
  contents += _random_contents(rng, s.n_images - len(contents), colours=others)
  contents = [contents[i] for i in rng.permutation(len(contents))]
  qa = [(f"how many images are {c} ?", str(k)) for c, k in zip(targets, counts)]
  context = _interleave(_gaps(rng, s.n_images + 1, s.filler), s.n_images)
  return Episode(context, _draw(rng, contents), qa, "counting", contents)


_GENERATORS = {
  "image_needle": _image_needle,
  "text_needle": _text_needle,
  "temporal": _temporal,
  "counting": _counting,
}


def episode(
  task: str,
  rng: np.random.Generator,
  settings: TaskSettings = DEFAULTS,
  n_questions: int = 1,
) -> Episode:
  """One context of ``task`` with ``n_questions`` questions, drawn from ``rng``."""
  if task not in _GENERATORS:
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
  if settings.n_images < (task != "text_needle") or settings.filler < 0:
    raise ValueError(f"need n_images >= 1 (text_needle: >= 0) and filler >= 0, got {settings}")
  return _GENERATORS[task](rng, settings, n_questions)


def episodes(
  task: str,
  n: int,
  seed: int = 0,
  settings: TaskSettings = DEFAULTS,
  n_questions: int = 1,
  split: str = "train",
  start: int = 0,
) -> list[Episode]:
  """Episodes ``start .. start + n - 1`` of a split (each from its own generator)."""
  return [
    episode(task, rng_for(split, task, seed, i), settings, n_questions)
    for i in range(start, start + n)
  ]


def heldout(
  task: str, n: int = 100, settings: TaskSettings = DEFAULTS, seed: int = 0
) -> list[Sample]:
  """The fixed held-out split: ``n`` one-question samples (sample i is the same for any n)."""
  return [e.sample() for e in episodes(task, n, seed, settings, 1, split="heldout")]


def heldout_all(
  n: int = 100, settings: TaskSettings = DEFAULTS, tasks: Sequence[str] = TASKS
) -> list[Sample]:
  """``n`` held-out samples of every task, task by task."""
  return [s for t in tasks for s in heldout(t, n, settings)]
