"""``jmmkv demo``: the bundled model answers one long multi-image sample of each synthetic task
with the full cache and with compressing policies, and prints the answers, whether they are
right, the KV memory and the decode speed of each."""

from __future__ import annotations

import sys
from pathlib import Path

from jmmkv.synthetic import MODEL_DIR, evaluate, tasks

DEFAULT_POLICIES = ("full", "madakv", "meda")


def has_model(model_dir: str | Path) -> bool:
  """Whether ``model_dir`` holds a model `jmmkv.load` reads: HF safetensors (one file or
  sharded) or a jmmkv checkpoint (`jmmkv convert`)."""
  from jmmkv import ckpt

  d = Path(model_dir)
  weights = ("model.safetensors", "model.safetensors.index.json")
  return any((d / f).is_file() for f in weights) or ckpt.is_checkpoint(d)


def load_bundled(model_dir: str | Path = MODEL_DIR, dtype: str = "float32"):
  """`jmmkv.load` of the bundled model (or another one trained on the synthetic tasks, as an HF
  directory or a jmmkv checkpoint), with a clear error when there is none."""
  import jmmkv

  model_dir = Path(model_dir)
  if not has_model(model_dir):
    raise FileNotFoundError(
      f"no model at {model_dir} (neither model.safetensors nor a jmmkv checkpoint): train it "
      f"with scripts/train_tiny_llava.py --out {model_dir}"
    )
  return jmmkv.load(model_dir, dtype=dtype)


def run(
  policies=DEFAULT_POLICIES,
  budget: float = 0.2,
  settings: tasks.TaskSettings = tasks.DEFAULTS,
  seed: int = 0,
  model_dir: str | Path = MODEL_DIR,
  dtype: str = "float32",
  progress: bool = True,
) -> list[dict]:
  """Answers held-out sample ``seed`` of every task (one batch) with each policy; prints a table
  and returns its rows. Each policy runs twice: the second run (compiled) is timed."""
  import jax
  from tqdm import tqdm

  import jmmkv

  pols = [jmmkv.policies.from_spec(spec) for spec in policies]  # bad specs fail before loading
  bud = jmmkv.Budget(ratio=budget)
  model = load_bundled(model_dir, dtype)
  samples = [tasks.heldout(t, seed + 1, settings)[seed] for t in tasks.TASKS]
  batch = model.prepare(
    prompts=[s.prompt for s in samples], images=[s.images for s in samples], chat_template=False
  )
  n_params = sum(x.size for x in jax.tree.leaves(model.params))
  lengths = [tasks.num_tokens(s.prompt) for s in samples]
  print(
    f"jmmkv demo: the bundled LLaVA ({n_params / 1e6:.2f}M parameters, {model.dtype_name}), "
    f"one held-out sample per task: {settings.n_images} images, {min(lengths)}-{max(lengths)} "
    "prompt tokens each"
  )
  print(f"  {'task':<13} {'end of the prompt':<52} expected answer")
  for s in samples:
    tail = s.prompt[s.prompt.rindex(tasks.IMAGE) + len(tasks.IMAGE) :]
    print(f"  {s.task:<13} {snippet(tail, 48):<52} {s.answer}")
  rows = []
  for name, pol in zip(
    tqdm(policies, desc="policies", file=sys.stderr, disable=not progress), pols
  ):
    b = None if name == "full" else bud
    for _ in range(2):  # the first call compiles
      out = jmmkv.generate(model, batch, pol, b, max_new_tokens=4)
    s = out.stats
    answers = [evaluate.reply_answer(t, x.echo) for t, x in zip(out.texts, samples)]
    rows.append(
      dict(
        policy=name,
        budget=1.0 if b is None else budget,
        answers=answers,
        right=[a == x.answer for a, x in zip(answers, samples)],
        kept_fraction=s["kept_fraction"],
        kv_mib_allocated=s["kv_bytes_allocated"] / 2**20,
        kv_mib_used=s["kv_bytes_used"] / 2**20,
        ms_per_token=s["decode_s"] / max(1, s["decode_steps"]) * 1e3,
      )
    )
  print(format_table(rows))
  print(legend(rows))
  return rows


def snippet(text: str, width: int) -> str:
  """The end of ``text`` in at most ``width`` characters, cut at a word boundary."""
  words, out = text.split(), ""
  for w in reversed(words):
    if len(w) + len(out) + 5 > width:
      return "... " + out
    out = f"{w} {out}" if out else w
  return out


def legend(rows: list[dict]) -> str:
  """What the table's columns mean, and why a policy kept more than its budget."""
  lines = [
    "ok / WRONG: the answer decoded from the compressed cache vs the expected one",
    "kept: fraction of the prompt's KV kept; KV MiB: cache allocated; ms/token: decode (compiled)",
  ]
  from jmmkv.cache import policies

  for r in rows:
    name = policies.spec_kwargs(r["policy"])[0]
    if r["kept_fraction"] > r["budget"] + 0.005 and "keep_all_text" in policies.settings(name):
      lines.append(
        f"{r['policy']} kept {r['kept_fraction']:.2f} at a {r['budget']:.2f} budget: it keeps every "
        f"text token by design, as its paper does ({name}:keep_all_text=false holds the budget)"
      )
  return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
  w = max([8, *(len(r["policy"]) for r in rows)])  # specs with settings can be long
  head = f"{'policy':<{w}} {'budget':>6} " + " ".join(f"{t:<13}" for t in tasks.TASKS)
  head += f" {'kept':>5} {'KV MiB':>7} {'ms/token':>8}"
  lines = [head]
  for r in rows:
    cells = " ".join(
      f"{(a or '?') + (' ok' if ok else ' WRONG'):<13}" for a, ok in zip(r["answers"], r["right"])
    )
    lines.append(
      f"{r['policy']:<{w}} {r['budget']:>6.2f} {cells} {r['kept_fraction']:>5.2f} "
      f"{r['kv_mib_allocated']:>7.3f} {r['ms_per_token']:>8.2f}"
    )
  return "\n".join(lines)
