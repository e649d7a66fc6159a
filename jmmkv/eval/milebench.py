"""MileBench (Song et al., 2024, "MileBench: Benchmarking MLLMs in Long Context") on jmmkv models,
with a KV-cache policy and budget: ``jmmkv eval milebench``.

We follow the official repository (github.com/MileBench/MileBench), re-implemented, not copied:
``generate.py`` and ``utils.py`` (data layout, prompt building, truncation of the oldest context:
`milebench_prompt`), ``evaluate.py`` (answer normalisation, option matching, ROUGE-L, needle
matching: `milebench_metrics`), ``score.py`` and ``eval.sh`` (the 29 tasks and their categories:
`milebench_data`), ``configs/model_configs.yaml`` (greedy decoding, 512 new tokens).

Each sample is one prompt (batch 1), generated greedily; ``out.texts[0].strip()`` is the answer.
Task scores are means over samples; category, image-quantity-level and overall scores are means
over tasks (our reading: MileBench's own tables average tasks, and ``evaluate.py`` reports levels
per task only). A progress file (``partial``) keeps finished tasks across an interruption: a run
asked to resume skips them. Usage::

  from jmmkv.eval import milebench
  tasks = milebench.load_tasks("data/MileBench", "ALFRED,T", limit=50)
  res = milebench.evaluate(model, tasks, jmmkv.policies.get("snapkv"), jmmkv.Budget(ratio=0.2))
  print(milebench.format_table(res))
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from jmmkv.eval import milebench_metrics as metrics
from jmmkv.eval import milebench_prompt as prompt
from jmmkv.eval.milebench_data import CATEGORY_NAMES, LEVELS, Task, check_images, load_task
from jmmkv.eval.milebench_data import resolve_tasks
from jmmkv.eval.milebench_progress import default_settings, progress_path, read_progress
from jmmkv.eval.milebench_progress import refuse_progress
from jmmkv.files import read_image, write_atomic

IMAGE_MODALITY = 2


def load_tasks(data_dir, tasks: str | None = None, limit: int | None = None) -> list[Task]:
  """The tasks named by ``tasks`` (see `resolve_tasks`), their first ``limit`` samples each, with
  every image file checked to exist."""
  if limit is not None and limit < 1:
    raise ValueError(f"--limit must be >= 1, got {limit}")
  data_dir = Path(data_dir)
  out = [load_task(data_dir, name, limit) for name in resolve_tasks(tasks, data_dir)]
  check_images(out)
  return out


def _template_tokens(model, chat_template: bool) -> int:
  """Tokens the chat template (and BOS) add around a prompt."""
  try:
    return len(model.prepare(prompts=[""], chat_template=chat_template).input_ids[0])
  except ValueError:  # nothing at all around an empty prompt
    return 0


class _Prompter:
  """Builds a sample's batch, truncated to ``max_len`` prompt tokens as MileBench does."""

  def __init__(self, model, max_len: int, chat_template: bool, extra: int):
    self.model, self.max_len, self.chat_template, self.extra = model, max_len, chat_template, extra
    self.tok = model.tokenizer

  def count(self, text: str) -> int:
    return len(self.tok(text, add_special_tokens=False)["input_ids"])

  def tail(self, text: str, n: int) -> str:
    ids = self.tok(text, add_special_tokens=False)["input_ids"]
    return self.tok.decode(ids[len(ids) - n :]) if n > 0 else ""

  def _batch(self, text: str, images: list):
    return self.model.prepare(
      prompts=[text], images=[images] if images else None, chat_template=self.chat_template
    )

  def __call__(self, task: Task, sample) -> tuple:
    instruction, context, order = prompt.build_prompt(sample, task.name)
    images = [read_image(task.image_dir / sample.images[k]) for k in order]
    batch = self._batch(prompt.join(instruction, context), images)
    if len(batch.input_ids[0]) - self.extra <= self.max_len:
      return batch, len(images)
    image_ids = np.where(batch.modality[0] == IMAGE_MODALITY, batch.media_index[0], -1)
    per_image = [int((image_ids == j).sum()) for j in range(len(images))]
    text, kept = prompt.truncate(
      instruction, context, per_image, self.max_len, self.count, self.tail
    )
    return self._batch(text, [images[j] for j in kept]), len(kept)


def _answer(model, prompter, task: Task, s, rule: str, policy, budget, max_new_tokens: int) -> dict:
  import jmmkv

  batch, kept = prompter(task, s)
  out = jmmkv.generate(model, batch, policy, budget, max_new_tokens=max_new_tokens)
  answer = out.texts[0].strip()
  return {
    "task": task.name,
    "sample_id": s.sample_id,
    "level": s.level,
    "images": len(s.images),
    "images_kept": kept,
    "prompt_tokens": int(out.stats["prompt_tokens"]),
    "kept_fraction": float(out.stats["kept_fraction"]),
    "prediction": answer,
    "response": s.response,
    "score": metrics.score(rule, answer, s.response, s.choices),
  }


def evaluate(
  model,
  tasks: list[Task],
  policy,
  budget,
  *,
  max_new_tokens: int = 512,
  max_context_len: int | None = None,
  chat_template: bool = True,
  progress: bool = True,
  partial: Path | None = None,
  resume: bool = False,
  settings: dict | None = None,
) -> dict:
  """Generates an answer to every sample of ``tasks`` and scores it.

  ``max_context_len``: prompt tokens allowed (chat template excluded); default: the model's
  ``max_position_embeddings`` minus ``max_new_tokens`` and the template's tokens. Returns
  `milebench_metrics.aggregate`'s dict plus "predictions" (one record per sample) and "seconds"
  (summed over tasks, those of earlier runs included).

  ``partial``: a progress file, rewritten whole (atomically) after each task with the records and
  seconds of every finished task and ``settings`` (default: `default_settings`). With ``resume``
  the tasks it holds are read back and skipped (`read_progress` refuses other settings); without,
  an existing one is refused. The caller deletes it once the results are saved.
  """
  from tqdm import tqdm

  if model.tokenizer is None:
    raise ValueError(f"{model.path} has no tokenizer files: MileBench needs one")
  options = dict(
    max_new_tokens=max_new_tokens, max_context_len=max_context_len, chat_template=chat_template
  )
  if settings is None:
    settings = default_settings(model, tasks, policy, budget, **options)
  done = {}
  if partial is not None and resume:
    done = read_progress(partial, settings)
  elif partial is not None:
    refuse_progress(partial)
  extra = _template_tokens(model, chat_template)
  if max_context_len is None:
    max_context_len = model.text_config.max_position_embeddings - max_new_tokens - extra
  if max_context_len < 1:
    raise ValueError(f"max_context_len must be >= 1, got {max_context_len}")
  prompter = _Prompter(model, max_context_len, chat_template, extra)
  rules = {t.name: metrics.scoring(t.name, t.question_type) for t in tasks}
  finished = {}
  total = sum(len(t.samples) for t in tasks)
  initial = sum(len(t.samples) for t in tasks if t.name in done)
  bar = tqdm(total=total, initial=initial, unit="sample", file=sys.stderr, disable=not progress)
  with bar:
    for task in tasks:
      if task.name in done:
        finished[task.name] = done[task.name]
        continue
      bar.set_description(task.name)
      t0, records = time.perf_counter(), []
      for s in task.samples:
        records.append(
          _answer(model, prompter, task, s, rules[task.name], policy, budget, max_new_tokens)
        )
        bar.update()
      finished[task.name] = {"seconds": time.perf_counter() - t0, "predictions": records}
      if partial is not None:
        text = json.dumps({"settings": settings, "tasks": finished}, default=str)
        write_atomic(partial, text + "\n")
  records = [r for t in finished.values() for r in t["predictions"]]
  res = metrics.aggregate(records, rules)
  res["max_context_len"] = max_context_len
  res["seconds"] = round(sum(t["seconds"] for t in finished.values()), 2)
  res["predictions"] = records
  return res


def _pct(x) -> str:
  return "   -" if x is None else f"{100 * x:5.1f}"


def format_table(res: dict) -> str:
  """Per task, category, image-quantity level and overall, scores in percent."""
  lines = [f"{'task':<24} {'cat':<3} {'metric':<9} {'n':>5} {'score':>6}"]
  for name, t in res["tasks"].items():
    lines.append(
      f"{name:<24} {t['category']:<3} {t['metric']:<9} {t['n']:>5} {_pct(t['score']):>6}"
    )
  lines.append("")
  for c, v in res["categories"].items():
    label = f"{c} ({CATEGORY_NAMES[c]})"
    lines.append(f"{label:<38} {v['tasks']:>5} {_pct(v['score']):>6}   (tasks)")
  for lv in LEVELS:
    v = res["levels"][lv]
    lines.append(f"{'level ' + lv:<38} {v['n']:>5} {_pct(v['score']):>6}   (samples)")
  o = res["overall"]
  lines.append(f"{'overall':<38} {o['tasks']:>5} {_pct(o['score']):>6}   (tasks)")
  return "\n".join(lines)


def _policy(spec: str, hp: list[str]):
  """The policy of ``--policy`` and ``--hp`` items (the spec's settings win); an error names the
  argument it comes from."""
  import jmmkv

  name = jmmkv.policies.spec_kwargs(spec)[0]
  jmmkv.policies.from_spec(spec)  # the spec alone: its errors name it
  overrides = {}
  for item in hp:
    key, value = jmmkv.policies.setting(item, "--hp")
    overrides[key] = value
    try:
      jmmkv.policies.get(name, **overrides)
    except (TypeError, ValueError) as e:
      raise ValueError(f"--hp {item}: {e}") from None
  return jmmkv.policies.from_spec(spec, **overrides)


def run(args) -> int:
  """``jmmkv eval milebench``: arguments (and a progress file) are checked before the model is
  loaded. Results go to ``--out`` once the run ends; until then finished tasks are kept in
  `progress_path` (``--resume`` continues from it), which is deleted after ``--out`` is written."""
  import jax

  import jmmkv
  from jmmkv import arguments, runinfo
  from jmmkv.files import output_path
  from jmmkv.models.model import dtype_name

  policy = _policy(args.policy, args.hp)
  budget = arguments.budget(args.policy, args.budget)  # None for full
  if args.max_context_len is not None and args.max_context_len < 1:
    raise ValueError(f"--max-context-len must be >= 1, got {args.max_context_len}")
  out_path = output_path(args.out, "--out")
  partial = progress_path(out_path)
  if not args.resume:
    refuse_progress(partial, "--resume")
  tasks = load_tasks(args.data, args.tasks, args.limit)
  settings = {
    "policy": args.policy,
    "hyperparameters": dataclasses.asdict(policy) if dataclasses.is_dataclass(policy) else {},
    "budget": None if budget is None else args.budget,
    "model": str(args.model),
    "dtype": dtype_name(args.dtype),
    "data": str(args.data),
    "tasks": [t.name for t in tasks],
    "limit": args.limit,
    "max_new_tokens": args.max_new_tokens,
    "max_context_len": args.max_context_len,
    "chat_template": not args.no_chat_template,
  }
  if args.resume:
    read_progress(partial, settings)  # refused here, before the model is loaded
  model = jmmkv.load(args.model, dtype=args.dtype)
  res = evaluate(
    model,
    tasks,
    policy,
    budget,
    max_new_tokens=args.max_new_tokens,
    max_context_len=args.max_context_len,
    chat_template=not args.no_chat_template,
    partial=partial,
    resume=args.resume,
    settings=settings,
  )
  meta = {
    **settings,
    "max_context_len": res.pop("max_context_len"),
    "versions": runinfo.versions(),
    "device": jax.devices()[0].device_kind,
    "seconds": res.pop("seconds"),
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  print(format_table(res))
  write_atomic(out_path, json.dumps({"meta": meta, **res}, indent=1, default=str) + "\n")
  partial.unlink(missing_ok=True)
  print(f"wrote {out_path}", file=sys.stderr)
  return 0
