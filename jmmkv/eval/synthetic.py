"""``jmmkv eval synthetic``: accuracy of every policy x budget on the synthetic held-out set.

Runs `jmmkv.synthetic.evaluate` for each (policy, budget) on the same ``n`` held-out samples per
task (the full cache once), prints a per-task accuracy table, writes a JSON with the run's
metadata and an accuracy-vs-budget plot (one panel per task, one line per policy).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from jmmkv.eval import plotting

BUDGETS = (1.0, 0.5, 0.2, 0.1, 0.05)


def evaluate_grid(model, samples, policies, budgets, batch_size=16, progress=True, turns=(1,)):
  """Rows ``{policy, budget, turn, accuracy: {task: acc, mean}, kept_fraction, seconds}``: the
  full cache once (budget 1.0), then every other policy at every budget, each in every turn of
  ``turns`` (1: the question in the prompt; 2: asked after compressing the context alone)."""
  from tqdm import tqdm

  from jmmkv.synthetic import evaluate

  jobs = [("full", None)]
  for name in policies:
    if name == "full":
      continue
    jobs += [(name, b) for b in budgets]
  jobs = [(name, b, turn) for name, b in jobs for turn in turns]
  rows = []
  for name, b, turn in tqdm(jobs, desc="policy x budget", file=sys.stderr, disable=not progress):
    t0 = time.perf_counter()
    answers, kept = evaluate.run(model, samples, name, b, batch_size, second_turn=turn == 2)
    rows.append(
      dict(
        policy=name,
        budget=1.0 if b is None else b,
        turn=turn,
        accuracy=evaluate.score(samples, answers),
        kept_fraction=kept,
        seconds=round(time.perf_counter() - t0, 2),
      )
    )
  return rows


def format_table(rows, task_names) -> str:
  cols = [*task_names, "mean"]
  w = max([10, *(len(r["policy"]) for r in rows)])  # specs with settings can be long
  head = f"{'policy':<{w}} {'budget':>6} {'turn':>4} {'kept':>5} "
  lines = [head + " ".join(f"{c[:12]:>12}" for c in cols)]
  for r in rows:
    lines.append(
      f"{r['policy']:<{w}} {r['budget']:>6.2f} {r.get('turn', 1):>4} {r['kept_fraction']:>5.2f} "
      + " ".join(f"{r['accuracy'].get(c, float('nan')):>12.3f}" for c in cols)
    )
  return "\n".join(lines)


def plot(rows, task_names, path: Path) -> None:
  """Accuracy vs budget per task (and the mean); the full cache is a dashed line, second-turn
  rows dotted lines in their policy's colour."""
  plt = plotting.pyplot()
  panels = [*task_names, "mean"]
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), sharey=True)
  full = next(r for r in rows if r["policy"] == "full")
  for ax, task in zip(axes, panels):
    for i, name in enumerate(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full")):
      for turn in sorted({r.get("turn", 1) for r in rows}):
        mine = [r for r in rows if r["policy"] == name and r.get("turn", 1) == turn]
        pts = sorted((r["budget"], r["accuracy"][task]) for r in mine)
        label, style = (name, "-") if turn == 1 else (f"{name}, turn 2", ":")
        ax.plot(*zip(*pts), marker="o", ms=3, ls=style, color=f"C{i}", label=label)
    ax.axhline(full["accuracy"][task], color="k", ls="--", lw=1, label="full")
    ax.set_xscale("log")
    ax.set_title(task)
    ax.set_xlabel("budget (kept fraction)")
    ax.set_ylim(-0.02, 1.02)
  axes[0].set_ylabel("accuracy")
  axes[-1].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")
  plt.close(fig)


def run(args) -> int:
  """``jmmkv eval synthetic``: arguments are checked before the model is loaded."""
  import jmmkv
  from jmmkv import runinfo
  from jmmkv.arguments import ratios
  from jmmkv.files import atomic_path, output_path, write_atomic
  from jmmkv.synthetic import demo, tasks

  names = jmmkv.policies.spec_list(args.policies)
  budgets = ratios(args.budgets)
  task_names = [t.strip() for t in args.tasks.split(",")] if args.tasks else list(tasks.TASKS)
  for t in task_names:
    if t not in tasks.TASKS:
      raise ValueError(f"unknown task {t!r}; tasks: {', '.join(tasks.TASKS)}")
  if args.n < 1 or args.batch_size < 1:
    raise ValueError("--n and --batch-size must be >= 1")
  settings = tasks.TaskSettings(n_images=args.images, filler=args.filler)
  out_path = output_path(args.out, "--out")
  plot_path = plotting.plot_path(args.plot)
  model = demo.load_bundled(args.model or demo.MODEL_DIR, args.dtype)
  samples = tasks.heldout_all(args.n, settings, task_names)
  t0 = time.perf_counter()
  turns = (1, 2) if args.second_turn else (1,)
  rows = evaluate_grid(model, samples, names, budgets, args.batch_size, turns=turns)
  meta = dict(
    model=str(args.model or demo.MODEL_DIR),
    dtype=model.dtype_name,
    n_per_task=args.n,
    tasks=task_names,
    settings=dataclasses.asdict(settings),
    mean_prompt_tokens=sum(tasks.num_tokens(s.prompt) for s in samples) / len(samples),
    hyperparameters={n: dataclasses.asdict(jmmkv.policies.from_spec(n)) for n in names},
    versions=runinfo.versions(),
    seconds=round(time.perf_counter() - t0, 1),
    date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  )
  print(format_table(rows, task_names))
  write_atomic(out_path, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
  print(f"wrote {out_path}", file=sys.stderr)
  if plot_path is not None:
    with atomic_path(plot_path) as tmp:
      plot(rows, task_names, tmp)
    print(f"wrote {plot_path}", file=sys.stderr)
  return 0
