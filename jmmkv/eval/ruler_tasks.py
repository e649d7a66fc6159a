"""RULER-style long-context tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?"), generated from a seed at a target prompt length in tokens.

Each prompt is the task's instruction, a haystack of real English sentences (`ruler_text`) with
the needles inside it, the question and an answer prefix, which the model continues (so the
first new token comes from the prefill logits; the rest of the answer is decoded from the cache):

- ``niah_single_number``: one needle "One of the special magic numbers for KEY is: VALUE." (a
  7-digit number); asked for KEY's number.
- ``niah_single_word``: the same with a word value (two vocabulary words joined by a hyphen).
- ``niah_multikey``: four needles with different keys (three distractors); asked for one key.
- ``niah_multivalue``: four needles with the same key and four numbers; asked for all of them.
- ``niah_multiquery``: four needles with four keys; asked for the numbers of all four keys.
- ``variable_tracking``: a chain "VAR ABCDE = 12345." then "VAR FGHIJ = VAR ABCDE." (four hops)
  spread through the haystack; asked which variables equal 12345.
- ``common_words``: a numbered list of words in which ten words repeat often (6 times each below
  4096 tokens, else 30) and the others rarely (once, else 3 times); asked for the ten most common
  words, after one worked example. No haystack: the list fills the prompt.

Instructions and questions are RULER's; two answer prefixes differ, tuned on SmolLM2-135M with
the full cache (5 samples at 2k tokens): the needle prefixes end with a colon ("... text is:",
as the needles read; RULER's end at "is": single word 0.2 -> 0.8) and variable tracking's ends
with "they are: VAR", without RULER's worked example (with it SmolLM2 repeats the example's
names: 0.04; without either 0.0; now 0.24). Keys are two vocabulary words joined by a hyphen, as
RULER's adjective-noun keys. The haystack holds no digits and no all-capital words, so numbers
and variable names come only from needles. A prompt has at most ``length - max_new_tokens``
tokens (RULER's convention: the answer fits in ``length``) and falls short of it by less than one
haystack sentence (or list entry).

Scoring (`score`): the fraction of expected strings found in the answer, case-insensitively and
as whole words (RULER's ``string_match_all``, which matches substrings: "1234567" inside
"12345678" counts there, not here); with one expected string a sample is right or wrong.
"""

from __future__ import annotations

import dataclasses
import re
import string
import zlib
from typing import Callable

import numpy as np

from jmmkv.eval import ruler_text

TASKS = (
  "niah_single_number",
  "niah_single_word",
  "niah_multikey",
  "niah_multivalue",
  "niah_multiquery",
  "variable_tracking",
  "common_words",
)
SHORT = dict(zip(TASKS, ("s_num", "s_word", "mkey", "mvalue", "mquery", "vt", "cwe")))
# New tokens per task by default: the answer and some slack (RULER asks for 30-128).
MAX_NEW_TOKENS = dict(zip(TASKS, (16, 24, 16, 64, 64, 40, 80)))


@dataclasses.dataclass(frozen=True)
class TaskSettings:
  """The knobs of the tasks (RULER's defaults)."""

  digits: int = 7  # number values
  needles: int = 4  # keys (multikey, multiquery) or values (multivalue)
  hops: int = 4  # variable tracking: VAR assignments after the first
  common: int = 10  # common words asked for
  long_from: int = 4096  # common words: repeats (30, 3) from this length on, else (6, 1)
  vt_example: bool = False  # RULER's worked example before variable tracking (SmolLM2 copies it)


@dataclasses.dataclass(frozen=True)
class Sample:
  task: str
  index: int
  ids: tuple[int, ...]  # the whole prompt, answer prefix included
  answers: tuple[str, ...]  # expected strings
  depths: tuple[float, ...] = ()  # where the needles are (0: start of the haystack, 1: end)


@dataclasses.dataclass(frozen=True)
class Prompter:
  """Tokenises a prompt, plain or (``chat``) inside the tokenizer's chat template with the
  answer prefix opening the assistant's turn."""

  tokenizer: object
  chat: bool = False

  def ids(self, body: str, prefix: str) -> list[int]:
    if self.chat:
      msgs = [{"role": "user", "content": body}]
      text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
      text += prefix
    else:
      text = f"{body} {prefix}"
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def counts(self, texts: list[str]) -> list[int]:
    """Tokens of each text (as it appears after a space)."""
    if not texts:
      return []
    enc = self.tokenizer([" " + t for t in texts], add_special_tokens=False)["input_ids"]
    return [len(e) for e in enc]


def score(prediction: str, answers) -> float:
  """Fraction of ``answers`` found in ``prediction`` as whole words, case-insensitively."""
  text = prediction or ""
  found = [
    re.search(rf"(?<![A-Za-z0-9]){re.escape(a)}(?![A-Za-z0-9])", text, re.IGNORECASE) is not None
    for a in answers
  ]
  return sum(found) / len(found)


def rng_for(seed: int, task: str, length: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index])


def distinct(rng, n: int, make: Callable) -> list:
  out: list = []
  while len(out) < n:
    x = make(rng)
    if x not in out:
      out.append(x)
  return out


def word_pair(rng) -> str:
  vocab = ruler_text.vocabulary()
  a, b = rng.choice(len(vocab), 2, replace=False)
  return f"{vocab[a]}-{vocab[b]}"


def number(digits: int) -> Callable:
  return lambda rng: str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def var_name(letters: int) -> Callable:
  return lambda rng: "".join(rng.choice(list(string.ascii_uppercase), letters))


def _listing(items) -> str:
  items = list(items)
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


# ---- haystack filling -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Frame:
  """A prompt around a haystack: ``intro``, the haystack with ``needles`` at ``depths``,
  ``question``; then ``prefix`` (the answer prefix)."""

  intro: str
  needles: tuple[str, ...]
  depths: tuple[float, ...]  # sorted, in [0, 1]
  question: str
  prefix: str

  def body(self, hay: list[str]) -> str:
    slots = [round(d * len(hay)) for d in self.depths]
    parts: list[str] = []
    for i, sentence in enumerate(hay + [None]):
      parts += [n for n, s in zip(self.needles, slots) if s == i]
      if sentence is not None:
        parts.append(sentence)
    return f"{self.intro}\n{' '.join(parts)}\n{self.question}"


def too_short(task: str, length: int, need: int, new: int) -> ValueError:
  return ValueError(
    f"length {length} is too short for task {task}: its shortest prompt (no haystack) takes "
    f"{need} tokens and the answer {new} more (give a longer --lengths or fewer --max-new-tokens)"
  )


def fill(prompter: Prompter, frame: Frame, budget: int, start: int) -> tuple[list[int], int]:
  """The prompt ids with as many haystack sentences (consecutive from ``start``, wrapping) as
  fit in ``budget`` tokens, and how many that is."""
  pool = ruler_text.sentences()
  fixed = len(prompter.ids(frame.body([]), frame.prefix))
  if fixed > budget:
    return [], -1
  hay, used, step = [], fixed, 64
  while True:  # count sentences in chunks until the budget is passed
    chunk = [pool[(start + len(hay) + i) % len(pool)] for i in range(step)]
    sizes = prompter.counts(chunk)
    for s, size in zip(chunk, sizes):
      if used + size > budget:
        break
      hay.append(s)
      used += size
    else:
      continue
    break
  while True:  # the exact length can differ a little from the sum of the parts
    ids = prompter.ids(frame.body(hay), frame.prefix)
    if len(ids) <= budget:
      return ids, len(hay)
    hay.pop()


# ---- the tasks ------------------------------------------------------------------------------------


def _niah(task: str, rng, settings: TaskSettings) -> tuple[Frame, tuple[str, ...]]:
  word = task == "niah_single_word"
  kind = "words" if word else "numbers"
  value = word_pair if word else number(settings.digits)
  n = settings.needles
  n_keys = {"niah_multikey": n, "niah_multiquery": n}.get(task, 1)
  n_values = n if task == "niah_multivalue" else 1
  keys = distinct(rng, n_keys, word_pair)
  values = distinct(rng, n_keys * n_values, value)
  pairs = [(keys[i // n_values], v) for i, v in enumerate(values)]
  needles = [f"One of the special magic {kind} for {k} is: {v}." for k, v in pairs]
  order = rng.permutation(len(needles))
  asked = keys if task == "niah_multiquery" else keys[:1]
  answers = tuple(v for k, v in pairs if k in asked)
  one = kind[:-1]
  if len(answers) == 1:
    intro = (
      f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
      f"I will quiz you about the {one} afterwards."
    )
    question = f"What is the special magic {one} for {asked[0]} mentioned in the provided text?"
    prefix = f"The special magic {one} for {asked[0]} mentioned in the provided text is:"
  else:
    intro = (
      f"Some special magic {kind} are hidden within the following text. Make sure to memorize "
      f"them. I will quiz you about the {kind} afterwards."
    )
    query = _listing(asked)
    question = f"What are all the special magic {kind} for {query} mentioned in the provided text?"
    prefix = f"The special magic {kind} for {query} mentioned in the provided text are:"
  depths = tuple(sorted(float(d) for d in rng.random(len(needles))))
  frame = Frame(intro, tuple(needles[i] for i in order), depths, question, prefix)
  return frame, answers


def _chain(rng, hops: int, letters: int, value: str) -> tuple[list[str], list[str]]:
  names = distinct(rng, hops + 1, var_name(letters))
  lines = [f"VAR {names[0]} = {value}."]
  lines += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
  return names, lines


def _vt_text(hay: str, value: str, hops: int) -> tuple[str, str]:
  body = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    f"{hay}\nQuestion: Find all variables that are assigned the value {value} in the text above."
  )
  prefix = (
    "Answer: According to the chain(s) of variable assignment in the text above, "
    f"{hops + 1} variables are assigned the value {value}, they are: VAR"
  )
  return body, prefix


def _variable_tracking(rng, settings: TaskSettings, start: int) -> tuple[Frame, tuple[str, ...]]:
  example = ""
  if settings.vt_example:  # three-letter names, the value 12345, five sentences of haystack
    pool = ruler_text.sentences()
    ex_names, ex_lines = _chain(rng, settings.hops, 3, "12345")
    ex_parts = [pool[(start + len(pool) // 2 + i) % len(pool)] for i in range(5)]
    for j, line in enumerate(ex_lines):
      ex_parts.insert(j * 2, line)
    ex_body, ex_prefix = _vt_text(" ".join(ex_parts), "12345", settings.hops)
    example = f"{ex_body} {ex_prefix} {', VAR '.join(ex_names)}\n\n"
  value = str(int(rng.integers(10000, 100000)))
  names, lines = _chain(rng, settings.hops, 5, value)
  body, prefix = _vt_text("\x00", value, settings.hops)
  intro, question = body.split("\n\x00\n")
  depths = tuple(sorted(float(d) for d in rng.random(len(lines))))
  return Frame(example + intro, tuple(lines), depths, question, prefix), tuple(names)


def _cwe_text(words: list[str], common: int) -> str:
  listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
  return (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    f"Memorize the ones that appear most often.\n{listing}\n"
    f"Question: What are the {common} most common words in the above list?"
  )


def _cwe_prefix(common: int) -> str:
  return f"Answer: The top {common} words that appear most often in the list are:"


def _common_words(prompter, rng, settings, length: int, budget: int, seed_key) -> Sample | int:
  """The prompt with as many rare words as fit; the smallest prompt's tokens if none fits."""
  vocab = ruler_text.vocabulary()
  perm = [vocab[i] for i in rng.permutation(len(vocab))]
  c = settings.common
  many, few = (30, 3) if length >= settings.long_from else (6, 1)
  ex_common, ex_rare = perm[-c:], perm[-c - 10 : -c]
  ex_words = ex_common * 3 + ex_rare
  np.random.default_rng([*seed_key, 1]).shuffle(ex_words)
  ex_answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common))
  example = f"{_cwe_text(ex_words, c)} {_cwe_prefix(c)} {ex_answer}\n\n"
  common, rare_pool = perm[:c], perm[c : -c - 10]

  def build(k: int) -> list[int]:
    words = common * many + rare_pool[:k] * few
    np.random.default_rng([*seed_key, 2, k]).shuffle(words)
    return prompter.ids(example + _cwe_text(words, c), _cwe_prefix(c))

  smallest = build(0)
  if len(smallest) > budget:
    return len(smallest)
  lo, hi = 0, len(rare_pool)  # the largest k that fits: lo fits
  if len(build(hi)) <= budget:
    raise ValueError(
      f"length {length} is too long for task common_words: its {len(vocab)} vocabulary words "
      "do not fill it"
    )
  best = smallest
  while hi - lo > 1:
    mid = (lo + hi) // 2
    ids = build(mid)
    if len(ids) <= budget:
      lo, best = mid, ids
    else:
      hi = mid
  return Sample("common_words", seed_key[-1], tuple(best), tuple(common))


def make_sample(
  task: str,
  prompter: Prompter,
  length: int,
  index: int,
  *,
  seed: int = 0,
  max_new_tokens: int | None = None,
  settings: TaskSettings = TaskSettings(),
) -> Sample:
  """Sample ``index`` of ``task`` at ``length`` tokens (prompt + ``max_new_tokens``, default
  `MAX_NEW_TOKENS`); the same arguments give the same sample."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
  new = MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
  budget = length - new
  rng = rng_for(seed, task, length, index)
  if task == "common_words":
    out = _common_words(prompter, rng, settings, length, budget, (seed, length, index))
    if isinstance(out, int):
      raise too_short(task, length, out, new)
    return out
  start = int(rng.integers(len(ruler_text.sentences())))
  if task == "variable_tracking":
    frame, answers = _variable_tracking(rng, settings, start)
  else:
    frame, answers = _niah(task, rng, settings)
  ids, n_hay = fill(prompter, frame, budget, start)
  if n_hay < 1:
    need = len(prompter.ids(frame.body([]), frame.prefix))
    raise too_short(task, length, need, new)
  return Sample(task, index, tuple(ids), answers, frame.depths)
