"""``jmmkv eval ruler``: RULER-style long-context tasks (`jmmkv.eval.ruler_tasks`) answered with
the full cache and every policy x budget, scored per task and prompt length.

For each length the same ``n`` samples per task (from ``seed``) go through the full cache and
every compressing policy at every budget: batches of ``batch`` prompts of one task (the last
batch padded with copies of its last prompt, so one task compiles one shape), each batch one
prompt forward shared by all the jobs (`jmmkv.compare.generate_each`, which gives what
`jmmkv.generate` gives job by job), greedy decoding, `ruler_tasks.score`. Each (policy, budget,
length) is a result row: per-task scores, their average, the kept KV fraction actually realised
(pooled over the rows' prompt tokens, layers and KV heads) and the seconds taken (its own
compression and decoding plus an equal share of the forward). Cells are saved to
``<out>.partial.json`` after each (length, task); an interrupted run continues with
``--resume`` (other lengths, policies or budgets may be added).
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


def run_task(model, task_samples: list, jobs, max_new_tokens: int, batch: int, bar) -> list[dict]:
  """One task's samples under every (policy spec, budget) of ``jobs``: per job, its score, kept
  fraction, seconds and per-sample records. Each batch is one `jmmkv.compare.generate_each` call
  (one prompt forward for all jobs); a job's seconds are its own compression and decoding plus
  an equal share of the forward."""
  import jmmkv
  from jmmkv.compare import generate_each
  from jmmkv.generate import kept_fraction

  pairs = [
    (jmmkv.policies.from_spec(p), None if b is None else jmmkv.Budget(ratio=b)) for p, b in jobs
  ]
  out = [dict(scores=[], records=[], kept=0.0, prompt=0, seconds=0.0) for _ in jobs]
  for rows, real in padded_batches(task_samples, batch):
    t0 = time.perf_counter()
    outs = generate_each(
      model,
      model.prepare(input_ids=[list(s.ids) for s in rows]),
      pairs,
      max_new_tokens=max_new_tokens,
    )
    own = [o.stats["compress_s"] + o.stats["layout_s"] + o.stats["decode_s"] for o in outs]
    shared = max(0.0, time.perf_counter() - t0 - sum(own)) / len(jobs)
    n_tok = sum(len(s.ids) for s in rows[:real])
    for acc, o, seconds in zip(out, outs, own):
      acc["seconds"] += seconds + shared
      acc["kept"] += kept_fraction(o.stats["kept_tokens_per_layer_head"][:, :real], n_tok) * n_tok
      acc["prompt"] += n_tok
      for s, text in zip(rows[:real], o.texts):
        acc["scores"].append(tasks_mod.score(text, s.answers))
        acc["records"].append(
          dict(
            task=s.task,
            index=s.index,
            prompt_tokens=len(s.ids),
            depths=[round(d, 4) for d in s.depths],
            answers=list(s.answers),
            prediction=text,
            score=acc["scores"][-1],
          )
        )
    bar.update(real * len(jobs))
  return [
    dict(
      score=sum(a["scores"]) / len(a["scores"]),
      n=len(a["scores"]),
      kept_fraction=a["kept"] / a["prompt"],
      prompt_tokens=a["prompt"],
      seconds=round(a["seconds"], 2),
      records=a["records"],
    )
    for a in out
  ]


def finish_cell(cell: dict, task_names) -> dict:
  """A result row from a cell holding every task's result (`run_task`'s, by task)."""
  tasks = {t: {k: v for k, v in cell["tasks"][t].items() if k != "records"} for t in task_names}
  records = [r for t in task_names for r in cell["tasks"][t]["records"]]
  seconds = sum(t["seconds"] for t in tasks.values())
  prompt = sum(t["prompt_tokens"] for t in tasks.values())
  return dict(
    length=cell["length"],
    policy=cell["policy"],
    budget=cell["budget"],
    tasks=tasks,
    average=sum(t["score"] for t in tasks.values()) / len(tasks),
    kept_fraction=sum(t["kept_fraction"] * t["prompt_tokens"] for t in tasks.values()) / prompt,
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
  Per length and task, the jobs without that task's result run together (`run_task`); cells
  (by `cell_key`) of ``done`` keep the tasks they hold, and with ``partial`` the cells are saved
  there after each task."""
  import jax
  from tqdm import tqdm

  import jmmkv.memory

  cells = dict(done or {})
  jobs = grid.jobs()
  for length in grid.lengths:
    for p, b in jobs:
      cells.setdefault(cell_key(p, b, length), dict(length=length, policy=p, budget=b, tasks={}))
  missing = lambda length, task: [
    (p, b) for p, b in jobs if task not in cells[cell_key(p, b, length)]["tasks"]
  ]
  todo = sum(len(missing(ln, t)) for ln in grid.lengths for t in grid.tasks) * grid.n
  bar = tqdm(total=todo, unit="answer", file=sys.stderr, disable=not progress)
  with bar:
    for length in grid.lengths:
      for task in grid.tasks:
        pending = missing(length, task)
        if not pending:
          continue
        bar.set_description(f"{length} {task}")
        results = run_task(model, samples[length][task], pending, new_tokens[task], grid.batch, bar)
        for (p, b), result in zip(pending, results):
          cells[cell_key(p, b, length)]["tasks"][task] = result
        if partial is not None:
          write_atomic(partial, json.dumps({"settings": settings, "cells": cells}) + "\n")
        # This task's compiled steps go: each compiled program holds memory mappings, and a
        # process that kept a whole length's (33 jobs x 7 tasks) died with "LLVM ERROR: Unable
        # to allocate section memory" while most of its RAM was free.
        jax.clear_caches()
        gc.collect()
        jmmkv.memory.trim()  # glibc keeps freed prompt caches otherwise
  return [
    finish_cell(cells[cell_key(p, b, ln)], grid.tasks) for ln in grid.lengths for p, b in jobs
  ]


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
