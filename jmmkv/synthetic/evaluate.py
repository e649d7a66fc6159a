"""Accuracy of a model on synthetic samples under a KV-cache policy and budget.

Each answer is one token; a prediction is right when the first word that greedy decoding
produces equals it (exact match). Samples are batched in order of prompt length, so rows of a
batch need little padding.

Caution: `jmmkv.generate` takes the first new token from the prefill logits, before the cache
is compressed, so an answer that is the FIRST generated token cannot be changed by any policy
(checked: streaming at 30% keeps the bundled model's passkey answers). To measure policies the
answer must come later, e.g. a model trained to reply ``: red </s>`` (the ":" from the prefill,
"red" decoded from the compressed cache); the bundled partial model answers at once.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from jmmkv.synthetic.tasks import Sample, num_tokens


def _policy(policy):
  import jmmkv

  return jmmkv.policies.get(policy) if isinstance(policy, str) else policy


def _budget(budget):
  import jmmkv

  if budget is None or isinstance(budget, jmmkv.Budget):
    return budget
  return jmmkv.Budget(ratio=float(budget))


def predictions(
  model,
  samples: Sequence[Sample],
  policy="full",
  budget=None,
  batch_size: int = 8,
  max_new_tokens: int = 2,
) -> list[str]:
  """The first generated word for every sample (in the order given).

  ``policy``: a name for `jmmkv.policies.get` or a policy object; ``budget``: None (full
  cache), a `jmmkv.Budget`, or a float (a ratio of each prompt).
  """
  import jmmkv

  pol, bud = _policy(policy), _budget(budget)
  order = sorted(range(len(samples)), key=lambda i: num_tokens(samples[i].prompt))
  out: list[str] = [""] * len(samples)
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    batch = model.prepare(
      prompts=[samples[i].prompt for i in idx],
      images=[samples[i].images for i in idx],
      chat_template=False,
    )
    gen = jmmkv.generate(model, batch, pol, bud, max_new_tokens=max_new_tokens)
    for i, text in zip(idx, gen.texts):
      words = text.split()
      out[i] = words[0] if words else ""
  return out


def accuracy(
  model,
  samples: Sequence[Sample],
  policy="full",
  budget=None,
  batch_size: int = 8,
  max_new_tokens: int = 2,
) -> dict[str, float]:
  """Exact-match accuracy per task (and ``"mean"`` over tasks) under ``policy`` / ``budget``."""
  preds = predictions(model, samples, policy, budget, batch_size, max_new_tokens)
  right, total = defaultdict(int), defaultdict(int)
  for s, p in zip(samples, preds):
    right[s.task] += int(p == s.answer)
    total[s.task] += 1
  acc = {t: right[t] / total[t] for t in total}
  if acc:
    acc["mean"] = sum(acc.values()) / len(acc)
  return acc
