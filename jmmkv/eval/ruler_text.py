"""Text for the RULER tasks, from what ships with Python: the documentation topics of
``pydoc_data.topics`` (about 465k characters of the language reference).

`sentences`: its plain-English sentences (about 1k sentences, 103k characters, 20k SmolLM2
tokens; longer haystacks wrap around), in a fixed order: no digits (numbers are the needles'
values), no quoted code names (SmolLM2 answered those instead of a word needle; quoted plain
words lose their quotes), no code blocks, headings or all-capital words (variable tracking's
names are capitals). `vocabulary`: the distinct lower-case words (4-12 letters) of those
sentences, sorted (about 1.5k): keys, word values and word lists are drawn from it.
"""

from __future__ import annotations

import functools
import re
import zlib

_HEADING = re.compile(r"^[*=\-~^]{3,}$")
_PLAIN = re.compile(r"[A-Za-z ,;:'()\-]*")
_FORBIDDEN = re.compile(r"\b[A-Z]{2,}\b|\d")
_ABBREVIATION = re.compile(r"\b(e\.g|i\.e|etc)\.")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
_WORD = re.compile(r"\b[a-z]{4,12}\b")
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2019": "'", "\u2018": "'"})


def _topics() -> list[str]:
  from pydoc_data.topics import topics

  return [topics[k] for k in sorted(topics)]


def _paragraphs(text: str):
  """Paragraphs as one line each; headings and indented code blocks are dropped."""
  for block in re.split(r"\n\s*\n", text):
    lines = block.split("\n")
    if any(_HEADING.match(line.strip()) for line in lines):
      continue
    first = lines[0]
    if first.startswith("   ") and not first.lstrip().startswith(("* ", "- ")):
      continue
    yield " ".join(line.strip() for line in lines)


def is_plain(sentence: str) -> bool:
  """5-50 words, a capital first and a full stop last, no digits or all-capital words, nothing
  but letters and light punctuation (no quotes)."""
  if not (5 <= len(sentence.split()) <= 50 and sentence[0].isupper() and sentence[-1] == "."):
    return False
  if _FORBIDDEN.search(sentence):
    return False
  return _PLAIN.fullmatch(sentence[:-1]) is not None


@functools.cache
def sentences() -> tuple[str, ...]:
  """The plain sentences of the Python documentation topics, in topic order."""
  out = []
  for text in _topics():
    for par in _paragraphs(text.translate(_QUOTES)):
      par = re.sub(r"^[*-] ", "", par)  # a list item
      par = re.sub(r"\*+([A-Za-z][A-Za-z ]*)\*+", r"\1", par)  # *emphasis*
      par = re.sub(r'"([A-Za-z][A-Za-z ]*)"', r"\1", par)  # a quoted word
      par = _ABBREVIATION.sub(lambda m: m.group(1).replace(".", ""), par)
      out += [s.strip() for s in _SPLIT.split(par) if is_plain(s.strip())]
  return tuple(out)


@functools.cache
def vocabulary() -> tuple[str, ...]:
  """Distinct lower-case English words (4-12 letters) of `sentences`, sorted."""
  return tuple(sorted({w for s in sentences() for w in _WORD.findall(s)}))


def fingerprint() -> str:
  """A checksum of `sentences` (they come with the Python version's documentation)."""
  return f"{zlib.crc32(' '.join(sentences()).encode()):08x}"
