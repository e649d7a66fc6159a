"""Accuracy of a model on synthetic samples under a KV-cache policy and budget.

The bundled model replies ``ECHO ANSWER </s>`` (`Sample.echo`: what was asked about, e.g.
"star red"). A prediction is right when greedy decoding produces the echo and then exactly the
answer. The first reply token comes from the prefill logits (before compression), the answer from
a decode step over the compressed cache, which is what makes the policy matter. Samples are batched in order of prompt length, so rows of a batch need
little padding.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from jmmkv.synthetic.tasks import Sample, num_tokens


def reply_answer(text: str, echo: str) -> str:
  """The answer in a generated reply: the word after ``echo``, or ``""`` when the reply does not
  start with it."""
  words, n = text.split(), len(echo.split())
  return words[n] if len(words) > n and words[:n] == echo.split() else ""


def run(
  model,
  samples: Sequence[Sample],
  policy="full",
  budget=None,
  batch_size: int = 8,
  max_new_tokens: int = 4,
  second_turn: bool = False,
) -> tuple[list[str], float]:
  """(the answer generated for every sample, in the order given; the mean kept fraction).

  ``policy``: a name or spec for `jmmkv.policies.from_spec`, or a policy object; ``budget``:
  None (full cache), a `jmmkv.Budget`, or a float (a ratio of each prompt). ``second_turn``:
  compress the context alone (`Sample.split`), then ask the question as a next turn against
  that cache (`jmmkv.turns`): the policy never sees the question. The kept fraction is then
  over the whole prompt (the question is kept whole).
  """
  import jmmkv
  from jmmkv.generate import as_budget, as_policy

  pol, bud = as_policy(policy), as_budget(budget)  # bad ones fail before any work
  order = sorted(range(len(samples)), key=lambda i: num_tokens(samples[i].prompt))
  out: list[str] = [""] * len(samples)
  kept = []
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    if second_turn:
      parts = [samples[i].split() for i in idx]
      context = model.prepare(
        prompts=[c for c, _ in parts], images=[samples[i].images for i in idx], chat_template=False
      )
      question = model.prepare(
        prompts=[q for _, q in parts], chat_template=False, add_special_tokens=False
      )
      cache = jmmkv.compress(model, context, pol, bud)
      gen = jmmkv.generate(model, question, max_new_tokens=max_new_tokens, cache=cache)
    else:
      batch = model.prepare(
        prompts=[samples[i].prompt for i in idx],
        images=[samples[i].images for i in idx],
        chat_template=False,
      )
      gen = jmmkv.generate(model, batch, pol, bud, max_new_tokens=max_new_tokens)
    kept.append((gen.stats["kept_fraction"], len(idx)))
    for i, text in zip(idx, gen.texts):
      out[i] = reply_answer(text, samples[i].echo)
  return out, sum(k * n for k, n in kept) / max(1, len(samples))


def predictions(model, samples: Sequence[Sample], policy="full", budget=None, **kw) -> list[str]:
  """The answer generated for every sample (in the order given); ``kw`` as `run`'s."""
  return run(model, samples, policy, budget, **kw)[0]


def score(samples: Sequence[Sample], answers: Sequence[str]) -> dict[str, float]:
  """Exact-match accuracy per task and ``"mean"`` over tasks."""
  right, total = defaultdict(int), defaultdict(int)
  for s, p in zip(samples, answers):
    right[s.task] += int(p == s.answer)
    total[s.task] += 1
  acc = {t: right[t] / total[t] for t in total}
  if acc:
    acc["mean"] = sum(acc.values()) / len(acc)
  return acc


def accuracy(model, samples: Sequence[Sample], policy="full", budget=None, **kw) -> dict:
  """Exact-match accuracy per task (and ``"mean"`` over tasks) under ``policy`` / ``budget``;
  ``kw`` as `run`'s."""
  return score(samples, predictions(model, samples, policy, budget, **kw))
