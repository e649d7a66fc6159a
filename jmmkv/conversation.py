"""`Conversation`: several turns over one cache, each prefilled against what the earlier turns
kept (`jmmkv.turns`), rather than prefilling the whole context again."""

from __future__ import annotations

from typing import Any

import jax

from jmmkv import inputs
from jmmkv.cache.fold import fold_answer
from jmmkv.generate import GenerateOutput, generate
from jmmkv.models.processing import follow_up_text

_OWN = ("cache", "return_cache", "layout")  # set by the conversation


class Conversation:
  """A chat over one batch of rows::

    chat = jmmkv.Conversation(model, policy="snapkv", budget=0.2, max_new_tokens=64)
    out = chat.ask(["<image>\\nDescribe the picture."], images=[[image]])
    out = chat.ask(["What colour is the car?"])  # prefilled after the kept cache

  The first turn is prefilled and compressed by ``policy`` to ``budget``; each answer's K/V
  then join the cache (`jmmkv.cache.fold.fold_answer`), and a next turn's tokens are prefilled
  against it, every layer compressed again as a whole under the budget of the whole
  conversation (`jmmkv.turns`; Full keeps everything). Prompts of later turns are rendered as
  follow-up user turns of the tokenizer's chat template (no BOS); the last sampled token of an
  answer, which was never fed back, starts the next turn. ``generate_kwargs`` go to every
  `jmmkv.generate` call (``max_new_tokens``, ``decode_window``, ``eos_token_id``, sampling; an
  ``rng`` is folded with the turn number).
  """

  def __init__(self, model, policy=None, budget=None, **generate_kwargs: Any):
    taken = sorted(set(_OWN) & set(generate_kwargs))
    if taken:
      raise TypeError(f"Conversation sets {', '.join(taken)} itself")
    self.model, self.policy, self.budget = model, policy, budget
    self.kwargs = generate_kwargs
    self.turns = 0
    self._cache = None
    self._answers: list[list[int]] = []

  @property
  def cache(self):
    """The cache after the last turn (its answer still in the append buffer), or None. The
    next `ask` consumes it."""
    return self._cache

  @property
  def context_tokens(self) -> list[int]:
    """Tokens of each row so far (every turn and answer); empty before the first turn."""
    if self._cache is None:
      return []
    index = int(self._cache.index)
    lengths = [int(n) for n in self._cache.lengths]
    return [n + min(len(a), index) for n, a in zip(lengths, self._answers)]

  def ask(
    self, prompts=None, *, images=None, videos=None, input_ids=None, **arrays
  ) -> GenerateOutput:
    """One turn: ``prompts`` (one per row, ``<image>`` / ``<video>`` marks as in
    `jmmkv.Model.prepare`) with their ``images`` / ``videos``, or ``input_ids`` (+ the HF
    processor's ``arrays``) as the turn's own tokens. Returns the turn's `GenerateOutput`
    (stats over the whole context; no cache: the conversation keeps it)."""
    model, kw = self.model, dict(self.kwargs)
    if "rng" in kw and kw["rng"] is not None:
      kw["rng"] = jax.random.fold_in(kw["rng"], self.turns)
    if self._cache is None:
      batch = model.prepare(prompts, images, videos, input_ids, **arrays)
      out = generate(
        model, batch, self.policy, self.budget, return_cache=True, layout="dense", **kw
      )
    else:
      index = int(self._cache.index)
      fed = [min(len(a), index) for a in self._answers]
      if prompts is not None:
        if isinstance(prompts, str):
          prompts = [prompts]
        prompts = [
          follow_up_text(model.tokenizer, p, self._ended_with(a))
          for p, a in zip(prompts, self._answers, strict=True)
        ]
        batch = model.prepare(
          prompts, images, videos, chat_template=False, add_special_tokens=False, **arrays
        )
      else:
        batch = model.prepare(input_ids=input_ids, **arrays)
      carry = [a[f:] for a, f in zip(self._answers, fed)]  # the unfed last token, if any
      cache = fold_answer(self._cache, [len(a) for a in self._answers])
      self._cache = None  # consumed by the next call (donated)
      out = generate(
        model,
        inputs.prepend(batch, carry),
        self.policy,
        self.budget,
        return_cache=True,
        layout="dense",
        cache=cache,
        **kw,
      )
    self._cache, self._answers = out.cache, out.tokens
    self.turns += 1
    out.cache = None
    return out

  def _ended_with(self, answer: list[int]) -> str | None:
    """The token string an answer ended with when it is an EOS (the template's end of turn)."""
    eos = self.kwargs.get("eos_token_id")
    eos = self.model.text_config.eos_token_ids if eos is None else eos
    eos = {int(x) for x in ([eos] if isinstance(eos, int) else eos)}
    if not answer or answer[-1] not in eos or self.model.tokenizer is None:
      return None
    return self.model.tokenizer.convert_ids_to_tokens(answer[-1])
