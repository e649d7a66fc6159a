"""``jmmkv eval ...`` sub-commands."""

from __future__ import annotations


def _milebench(args) -> int:
  from jmmkv.eval import milebench

  return milebench.run(args)


def _add_milebench(benchmarks) -> None:
  from jmmkv.cli import DTYPES

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
  mb.add_argument("--policy", required=True, help="a name from jmmkv.policies.NAMES")
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
    help="a policy hyperparameter, e.g. --hp window=16 (repeatable; VALUE read as JSON if it can)",
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
    help="where to write the JSON results (default milebench.json)",
  )
  mb.add_argument("--dtype", choices=DTYPES, default="float32")
  mb.set_defaults(func=_milebench)


def register(sub) -> None:
  """Add the ``eval`` command (with its own sub-commands) to the ``jmmkv`` parser's subparsers."""
  ev = sub.add_parser("eval", help="evaluate a policy x budget on a benchmark")
  benchmarks = ev.add_subparsers(dest="benchmark", required=True)
  _add_milebench(benchmarks)
