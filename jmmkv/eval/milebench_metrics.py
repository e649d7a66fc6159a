"""MileBench's scores, as pure functions of strings, and their aggregation.

Rules from MileBench's ``evaluate.py`` (class ``Eval``), re-implemented:

- ``normalize`` is its ``process``: newlines/tabs to spaces; each of ``; / [ ] " { } ( ) = + \\ _ -
  > < @ ` , ? !`` is deleted where the text has it next to a space (or has a digit,digit group)
  and turned into a space otherwise; periods not followed by a digit are deleted (at most 32:
  ``evaluate.py`` passes ``re.UNICODE`` = 32 where ``re.sub`` takes its count); quotes stripped;
  lower case.
- Multiple choice (``match_choice``): the prediction, the answer and every choice are normalised;
  choice i is labelled ``chr(65 + i)``. The picked label is, in order: (1) the first place the
  prediction contains "<label> <choice>" (normalised); (2) else the first choice text found in the
  prediction with spaces removed; (3) else the prediction itself if it is one label letter; (4)
  else every character of the prediction that is a label, upper-cased and joined ("the answer is
  b" -> "AB": wrong). An empty prediction picks "C". Score 1 when the label is the answer's.
- Needle tasks (``*NeedleInAHaystack``): 1 when the normalised answer is one of the normalised
  prediction's space-separated words. MMCoQA: 1 when it is a substring of the prediction.
- Other open-ended tasks: ROUGE-L F of the normalised strings, 0 for an empty prediction.
  MileBench calls the ``rouge`` package (distinct-word LCS over sentences split at "."); we use
  ``rouge-score``'s ``rougeL`` F1 (token-sequence LCS), which agrees except on repeated words.
"""

from __future__ import annotations

import functools
import re
from statistics import fmean

from jmmkv.eval.milebench_data import CATEGORIES, LEVELS, category_of

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@")
_PUNCT += ("`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # MileBench's "(?!<=\d)(\.)(?!\d)": its first group never fails
_REGEX_SPECIALS = "\\.^$*+?{}[]|()"  # the characters match_choice escapes, in its order


def normalize(text: str) -> str:
  """MileBench's answer normalisation (``Eval.process``)."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  out, digit_comma = text, _DIGIT_COMMA.search(text) is not None
  for p in _PUNCT:
    spaced = p + " " in text or " " + p in text
    out = out.replace(p, "" if spaced or digit_comma else " ")
  out = _PERIOD.sub("", out, count=32)
  return out.strip("'").strip('"').strip().lower()


def _escaped(option: str) -> str:
  option = normalize(option)
  for ch in _REGEX_SPECIALS:
    option = option.replace(ch, "\\" + ch)
  return option


def labels(n: int) -> list[str]:
  return [chr(65 + i) for i in range(n)]


def match_choice(text: str, options: dict[str, str]) -> str:
  """The label MileBench reads from a normalised prediction; ``options``: label -> choice."""
  if text == "":
    return "C"
  try:
    with_label = "|".join(_escaped(f"{k} {v}") for k, v in options.items())
    m = re.search(f"({with_label})", text, re.S)
    if m:
      return m.group(0)[0].upper()
    bare = {k: _escaped(v).replace(" ", "") for k, v in options.items()}
    m = re.search(f"({'|'.join(bare.values())})", text.replace(" ", ""), re.S)
    if m:
      for k, v in bare.items():
        if m.group(0).strip() == v:
          return k.upper()
    if len(text) == 1 and text.upper() in options:
      return text.upper()
  except (re.error, IndexError):
    return text
  return "".join(c.upper() for c in text if c.upper() in options)


def score_choice(prediction: str, response: str, choices) -> float:
  choices = [normalize(str(c)) for c in choices]
  options = dict(zip(labels(len(choices)), choices))
  answer = labels(len(choices))[choices.index(normalize(response))]
  return float(match_choice(normalize(prediction), options) == answer)


@functools.lru_cache(maxsize=1)
def _rouge():
  from rouge_score import rouge_scorer

  return rouge_scorer.RougeScorer(["rougeL"])


def score_rouge(prediction: str, response: str) -> float:
  pred, ref = normalize(prediction), normalize(response)
  if not pred or not ref:
    return 0.0
  return float(_rouge().score(ref, pred)["rougeL"].fmeasure)


def score_needle(prediction: str, response: str) -> float:
  return float(normalize(response) in normalize(prediction).split())


def score_contains(prediction: str, response: str) -> float:
  return float(normalize(response) in normalize(prediction))


def scoring(task: str, question_type: str) -> str:
  """Which rule scores ``task``: "needle", "contains", "rouge" or "choice" (evaluate.py main)."""
  if "NeedleInAHaystack" in task:
    return "needle"
  if "MMCoQA" in task:
    return "contains"
  return "rouge" if question_type == "open-ended" else "choice"


def score(rule: str, prediction: str, response: str, choices=None) -> float:
  if rule == "choice":
    return score_choice(prediction, response, choices)
  fn = {"needle": score_needle, "contains": score_contains, "rouge": score_rouge}[rule]
  return fn(prediction, response)


def _mean(xs):
  xs = list(xs)
  return fmean(xs) if xs else None


def aggregate(records: list[dict], rules: dict[str, str]) -> dict:
  """Scores per task (mean over its samples), per category and image-quantity level (means over
  the tasks that have samples there), and overall (mean over tasks). ``records``: one dict per
  sample with "task", "level" and "score"; ``rules``: task -> scoring rule, in output order."""
  tasks = {}
  for name, rule in rules.items():
    rs = [r for r in records if r["task"] == name]
    levels = {}
    for lv in LEVELS:
      xs = [r["score"] for r in rs if r["level"] == lv]
      levels[lv] = {"score": _mean(xs), "n": len(xs)}
    tasks[name] = {
      "category": category_of(name),
      "metric": "rouge_l" if rule == "rouge" else "accuracy",
      "scoring": rule,
      "score": _mean(r["score"] for r in rs),
      "n": len(rs),
      "levels": levels,
    }
  scored = {k: v for k, v in tasks.items() if v["n"]}
  categories = {
    c: {"score": _mean(t["score"] for t in ts), "tasks": len(ts)}
    for c in CATEGORIES
    if (ts := [t for t in scored.values() if t["category"] == c])
  }
  levels = {}
  for lv in LEVELS:
    ts = [t["levels"][lv] for t in scored.values() if t["levels"][lv]["n"]]
    levels[lv] = {"score": _mean(t["score"] for t in ts), "n": sum(t["n"] for t in ts)}
  overall = {"score": _mean(t["score"] for t in scored.values()), "tasks": len(scored)}
  return {"tasks": tasks, "categories": categories, "levels": levels, "overall": overall}
