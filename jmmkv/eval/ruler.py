"""``jmmkv eval ruler``: RULER-style long-context tasks (`jmmkv.eval.ruler_tasks`) answered with
the full cache and every policy x budget, scored per task and prompt length.

For each length the same ``n`` samples per task (from ``seed``) go through the full cache once
and every compressing policy at every budget: batches of ``batch`` prompts of one task (the last
batch padded with copies of its last prompt, so one task compiles one shape), greedy decoding,
`ruler_tasks.score`. Each (policy, budget, length) is a result row: per-task scores, their
average, the kept KV fraction actually realised (pooled over the rows' prompt tokens, layers and
KV heads) and the seconds taken. Rows are saved to ``<out>.partial.json`` as they finish; an
interrupted run continues with ``--resume`` (other lengths, policies or budgets may be added).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

from jmmkv.eval import ruler_tasks as tasks_mod
from jmmkv.files import write_atomic

SMOLLM2 = "smollm2"


@dataclasses.dataclass(frozen=True)
class Grid:
  """What to run: policy specs x budgets (the full cache once per length) over tasks x lengths."""

  policies: tuple[str, ...]
  budgets: tuple[float, ...]
  tasks: tuple[str, ...]
  lengths: tuple[int, ...]
  n: int = 20
  batch: int = 10

  def jobs(self) -> list[tuple[str, float | None]]:
    from jmmkv.cache import policies

    out: list[tuple[str, float | None]] = [("full", None)]
    for spec in self.policies:
      if policies.spec_kwargs(spec)[0] != "full":
        out += [(spec, b) for b in self.budgets]
    return out


def cell_key(policy: str, budget, length: int) -> str:
  return json.dumps([policy, budget, length])


def padded_batches(samples: list, size: int) -> list[tuple[list, int]]:
  """``samples`` in equal batches of at most ``size`` (the last one padded with copies of its
  last sample), each with its count of real samples."""
  k = -(-len(samples) // size)
  size = -(-len(samples) // k)
  out = []
  for lo in range(0, len(samples), size):
    chunk = samples[lo : lo + size]
    out.append((chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)))
  return out


def run_cell(model, samples: dict, policy_spec: str, budget, new_tokens: dict, batch: int, bar):
  """One result row: every task's samples (``samples[task]``) with one policy and budget."""
  import jmmkv
  from jmmkv.generate import kept_fraction

  policy = jmmkv.policies.from_spec(policy_spec)
  b = None if budget is None else jmmkv.Budget(ratio=budget)
  per_task, records, t_cell = {}, [], time.perf_counter()
  kept_all = prompt_all = 0
  for task, task_samples in samples.items():
    t0, scores, kept, prompt = time.perf_counter(), [], 0.0, 0
    for rows, real in padded_batches(task_samples, batch):
      out = jmmkv.generate(
        model,
        model.prepare(input_ids=[list(s.ids) for s in rows]),
        policy,
        b,
        max_new_tokens=new_tokens[task],
      )
      n_tok = sum(len(s.ids) for s in rows[:real])
      kept += kept_fraction(out.stats["kept_tokens_per_layer_head"][:, :real], n_tok) * n_tok
      prompt += n_tok
      for s, text in zip(rows[:real], out.texts):
        scores.append(tasks_mod.score(text, s.answers))
        records.append(
          dict(
            task=task,
            index=s.index,
            prompt_tokens=len(s.ids),
            depths=[round(d, 4) for d in s.depths],
            answers=list(s.answers),
            prediction=text,
            score=scores[-1],
          )
        )
      bar.update(real)
    per_task[task] = dict(
      score=sum(scores) / len(scores),
      n=len(scores),
      kept_fraction=kept / prompt,
      prompt_tokens=prompt,
      seconds=round(time.perf_counter() - t0, 2),
    )
    kept_all, prompt_all = kept_all + kept, prompt_all + prompt
  seconds = time.perf_counter() - t_cell
  return dict(
    policy=policy_spec,
    budget=budget,
    tasks=per_task,
    average=sum(t["score"] for t in per_task.values()) / len(per_task),
    kept_fraction=kept_all / prompt_all,
    seconds=round(seconds, 2),
    seconds_per_sample=round(seconds / len(records), 3),
    samples=records,
  )


def read_cells(path: Path, settings: dict) -> dict:
  """The finished rows in the progress file ``path`` ({} if none); a file of a run with other
  ``settings`` is refused."""
  if not path.exists():
    return {}
  try:
    saved = json.loads(path.read_text(encoding="utf-8"))
    old, cells = saved["settings"], saved["cells"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise ValueError(
      f"{path} is not a RULER progress file ({e}); delete it to start over"
    ) from None
  new = json.loads(json.dumps(settings))
  for key in sorted(set(old) | set(new)):
    if old.get(key) != new.get(key):
      raise ValueError(
        f"progress file {path} is from a run with other settings: {key} was {old.get(key)!r}, "
        f"now {new.get(key)!r}; rerun with the same settings or delete the file"
      )
  return cells


def evaluate(
  model,
  samples: dict,
  grid: Grid,
  new_tokens: dict,
  *,
  partial=None,
  settings=None,
  done=None,
  progress=True,
) -> list[dict]:
  """Result rows for every (length, job) of ``grid``; ``samples[length][task]`` are the prompts.
  Rows in ``done`` (by `cell_key`) are reused; with ``partial`` each new row is saved there."""
  import jax
  from tqdm import tqdm

  import jmmkv.memory

  cells = dict(done or {})
  jobs = grid.jobs()
  per_length = grid.n * len(grid.tasks)
  todo = [(ln, p, b) for ln in grid.lengths for p, b in jobs if cell_key(p, b, ln) not in cells]
  bar = tqdm(total=len(todo) * per_length, unit="sample", file=sys.stderr, disable=not progress)
  with bar:
    for length in grid.lengths:
      for policy, budget in jobs:
        key = cell_key(policy, budget, length)
        if key in cells:
          continue
        bar.set_description(f"{length} {policy} {budget or ''}".strip())
        row = run_cell(model, samples[length], policy, budget, new_tokens, grid.batch, bar)
        cells[key] = {"length": length, **row}
        if partial is not None:
          write_atomic(partial, json.dumps({"settings": settings, "cells": cells}) + "\n")
        gc.collect()
        jmmkv.memory.trim()  # glibc keeps freed prompt caches otherwise
      jax.clear_caches()  # this length's compiled steps are not needed again
  return [cells[cell_key(p, b, ln)] for ln in grid.lengths for p, b in jobs]


def format_table(rows: list[dict], task_names) -> str:
  """Per length: a row per policy x budget, the tasks' scores, their average, the kept fraction
  and seconds per sample."""
  w = max([10, *(len(r["policy"]) for r in rows)])
  heads = [tasks_mod.SHORT.get(t, t[:6]) for t in task_names]
  lines = []
  for length in dict.fromkeys(r["length"] for r in rows):
    here = [r for r in rows if r["length"] == length]
    n = max(t["n"] for r in here for t in r["tasks"].values())
    lines += ["", f"length {length} ({n} samples per task)"]
    cols = " ".join(f"{h:>6}" for h in heads)
    lines.append(f"{'policy':<{w}} {'budget':>6} {cols} {'avg':>6} {'kept':>6} {'s/smp':>6}")
    for r in here:
      budget = "-" if r["budget"] is None else f"{r['budget']:g}"
      scores = " ".join(f"{r['tasks'][t]['score']:>6.2f}" for t in task_names)
      lines.append(
        f"{r['policy']:<{w}} {budget:>6} {scores} {r['average']:>6.2f} "
        f"{r['kept_fraction']:>6.3f} {r['seconds_per_sample']:>6.1f}"
      )
  return "\n".join(lines[1:])
