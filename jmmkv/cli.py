"""The ``jmmkv`` command line."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from jmmkv import arguments
from jmmkv.arguments import DTYPES

# Errors a user causes (bad arguments, paths): one `jmmkv: error:` line, exit code 2.
USER_ERRORS = (
  ValueError,
  FileNotFoundError,
  FileExistsError,
  NotADirectoryError,
  IsADirectoryError,
  PermissionError,
)
PRESETS = {
  # name: (DecoderConfig overrides, description)
  "tiny": (dict(), "4 layers, D=256, 8 heads / 2 KV heads, head dim 32, vocab 1024"),
  "small": (
    dict(
      vocab_size=4096,
      hidden_size=512,
      intermediate_size=1376,
      num_layers=8,
      num_heads=8,
      num_kv_heads=4,
      head_dim=64,
    ),
    "8 layers, D=512, 8 heads / 4 KV heads, head dim 64, vocab 4096",
  ),
}


def _demo(args) -> int:
  import jmmkv

  if args.seed < 0:
    raise ValueError(f"--seed must be >= 0, got {args.seed}")
  names = jmmkv.policies.spec_list(args.policies)
  if args.preset is not None:
    for name in names:
      _random_demo(args, name)
    return 0
  from jmmkv.synthetic import demo, tasks

  if args.images < 2:
    raise ValueError(f"--images must be >= 2, got {args.images}")
  jmmkv.Budget(ratio=args.budget)  # range check before loading
  settings = tasks.TaskSettings(n_images=args.images, filler=tasks.DEFAULTS.filler)
  model_dir = args.model if args.model is not None else demo.MODEL_DIR
  demo.run(names, args.budget, settings, args.seed, model_dir, args.dtype)
  return 0


def _random_demo(args, policy_name: str) -> None:
  import numpy as np

  import jmmkv
  from jmmkv.models.configs import tiny_decoder

  overrides, desc = PRESETS[args.preset]
  model = jmmkv.random_model(tiny_decoder(**overrides), seed=args.seed, dtype=args.dtype)
  rng = np.random.default_rng(args.seed)
  lengths = [max(1, args.prompt_len - 7 * i) for i in range(args.batch)]
  batch = model.prepare(
    input_ids=[rng.integers(3, model.text_config.vocab_size, n) for n in lengths]
  )
  policy = jmmkv.policies.from_spec(policy_name)
  budget = arguments.budget(policy_name, args.budget)
  print(f"jmmkv demo: random-weight '{args.preset}' preset ({desc}), {model.dtype_name}")
  print(
    f"batch {args.batch}, prompt lengths {lengths}, {args.max_new_tokens} new tokens, policy {policy_name}"
    + ("" if budget is None else f", budget {args.budget:g}")
  )
  kw = dict(max_new_tokens=args.max_new_tokens, eos_token_id=[])
  first = jmmkv.generate(
    model, batch, policy, budget, **kw
  )  # compiles the prefill (with compression), layout and decode
  out = jmmkv.generate(model, batch, policy, budget, **kw)  # same bucket: reuses the compiled code
  s, s0 = out.stats, first.stats
  compile_s = sum(s0[k] - s[k] for k in ("prefill_s", "layout_s", "decode_s"))
  print(
    f"first call (includes compilation): {compile_s + s['prefill_s'] + s['layout_s'] + s['decode_s']:.2f} s"
  )
  print(
    f"prefill   {s['prefill_s'] * 1e3:8.1f} ms   ({s['prompt_tokens'] / s['prefill_s']:.0f} prompt tokens/s)"
  )
  print(f"layout    {s['layout_s'] * 1e3:8.1f} ms   (compression runs inside the prefill)")
  print(
    f"decode    {s['decode_s'] * 1e3:8.1f} ms   ({s['decode_tokens_per_s']:.1f} new tokens/s, "
    f"{s['decode_s'] / max(1, s['decode_steps']) * 1e3:.2f} ms/step)"
  )
  print(
    f"KV cache  {s['kv_bytes_allocated'] / 2**20:8.2f} MiB allocated, "
    f"{s['kv_bytes_used'] / 2**20:.2f} MiB used, kept fraction {s['kept_fraction']:.2f}"
  )
  print(f"row 0 first new tokens: {out.tokens[0][:12]}")


def _convert(args) -> int:
  import time

  import jax

  import jmmkv
  from jmmkv import ckpt

  t0 = time.perf_counter()
  ckpt.check_new_dir(args.out_dir)  # before the (slow) load
  model = jmmkv.load(args.hf_dir, dtype=args.dtype)
  out = jmmkv.save(model, args.out_dir)
  n = sum(x.size for x in jax.tree.leaves(model.params))
  print(
    f"converted {args.hf_dir} -> {out}: {n / 1e6:.1f} M parameters, {model.dtype_name}, "
    f"{time.perf_counter() - t0:.1f} s"
  )
  return 0


def _generate(args) -> int:
  import jmmkv
  from jmmkv import files

  policy = jmmkv.policies.from_spec(args.policy)  # bad specs and budgets fail before loading
  budget = arguments.budget(args.policy, args.budget)
  images = [files.read_image(p) for p in args.image]
  videos = [files.read_video(p) for p in args.video]
  model = jmmkv.load(args.model, dtype=args.dtype)
  if model.tokenizer is None:
    raise ValueError(f"{args.model} has no tokenizer files: jmmkv generate needs one")
  prompt, *follow_ups = args.prompt
  missing_images = len(images) - prompt.count("<image>")
  missing_videos = len(videos) - prompt.count("<video>")
  prompt = "<image> " * max(0, missing_images) + "<video> " * max(0, missing_videos) + prompt
  media = dict(images=[images] if images else None, videos=[videos] if videos else None)
  kw = dict(max_new_tokens=args.max_new_tokens, decode_window=args.decode_window)
  label = f"{args.policy}{'' if budget is None else f' {args.budget:g}'}"
  if not follow_ups:  # one prompt: the layout generate picks
    out = jmmkv.generate(model, model.prepare(prompts=[prompt], **media), policy, budget, **kw)
    _report(out, label)
    return 0
  chat = jmmkv.Conversation(model, policy, budget, **kw)
  for turn, text in enumerate([prompt, *follow_ups], 1):
    out = chat.ask([text], **(media if turn == 1 else {}))
    _report(out, f"{label}, turn {turn}")
  return 0


def _report(out, label: str) -> None:
  """`jmmkv generate`'s answer (stdout) and its one-line summary (stderr)."""
  s = out.stats
  print(out.texts[0])
  print(
    f"[{label}] prompt {s['prompt_tokens']} "
    f"tokens, kept {s['kept_fraction']:.2f}; KV {s['kv_bytes_allocated'] / 2**20:.2f} MiB "
    f"allocated, {s['kv_bytes_used'] / 2**20:.2f} MiB used; prefill with compression "
    f"{s['prefill_s'] * 1e3:.0f} ms, layout {s['layout_s'] * 1e3:.0f} ms, decode "
    f"{s['decode_s'] / max(1, s['decode_steps']) * 1e3:.1f} ms/token (first call: with compilation)",
    file=sys.stderr,
  )


def _version() -> str:
  """The installed jmmkv version, read without importing jax."""
  import importlib.metadata

  try:
    return importlib.metadata.version("jmmkv")
  except importlib.metadata.PackageNotFoundError:
    return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="jmmkv", description="Multimodal LLMs in JAX with a compressible KV cache."
  )
  parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser(
    "demo",
    help="the bundled trained model answers multi-image tasks with Full, MadaKV and MEDA",
    description=(
      "Loads the bundled model (a small LLaVA trained on jmmkv.synthetic's tasks), answers one "
      "long multi-image sample of each task with every policy, and prints the answers, whether "
      "they are right, KV memory and decode ms/token. With --preset: a random-weight speed demo."
    ),
  )
  demo.add_argument(
    "--policies",
    default="full,madakv,meda",
    help="comma-separated policy specs: names (jmmkv.policies.NAMES) or, with settings, "
    "name:key=value (e.g. meda:keep_all_text=false); all: every name",
  )
  demo.add_argument(
    "--budget", type=float, default=0.2, help="kept fraction of each prompt (not for full)"
  )
  demo.add_argument("--images", type=int, default=16, help="images per prompt")
  demo.add_argument("--seed", type=int, default=0, help="which held-out sample of each task (>= 0)")
  demo.add_argument(
    "--model",
    default=None,
    help="another model trained on the synthetic tasks: an HF directory or a jmmkv checkpoint "
    "(default: the bundled one)",
  )
  demo.add_argument("--dtype", choices=DTYPES, default="float32")
  demo.add_argument(
    "--preset",
    choices=sorted(PRESETS),
    default=None,
    help="instead: a random-weight decoder preset, random prompts (speed and KV bytes only)",
  )
  demo.add_argument("--batch", type=int, default=2, help="--preset only: prompts per batch")
  demo.add_argument("--prompt-len", type=int, default=500, help="--preset only")
  demo.add_argument("--max-new-tokens", type=int, default=64, help="--preset only")
  demo.set_defaults(func=_demo)
  convert = sub.add_parser(
    "convert", help="an HF model directory -> a jmmkv (orbax) checkpoint that jmmkv.load reads"
  )
  convert.add_argument("hf_dir", help="config.json + *.safetensors (+ tokenizer/processor files)")
  convert.add_argument("out_dir", help="a new (or empty) directory")
  convert.add_argument("--dtype", choices=DTYPES, default="float32")
  convert.set_defaults(func=_convert)
  gen = sub.add_parser(
    "generate",
    help="answer a prompt (with images / video), or several as turns of one conversation, "
    "from a model directory",
  )
  gen.add_argument("--model", required=True, help="an HF model directory or a jmmkv checkpoint")
  gen.add_argument(
    "--prompt",
    required=True,
    action="append",
    help='text; "<image>" marks where an image goes. Repeat it for a conversation: each '
    "later prompt is a next turn, prefilled against the cache the earlier turns kept (images "
    "and videos go with the first)",
  )
  gen.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
  gen.add_argument(
    "--video", action="append", default=[], help="a directory of frames or an animated GIF"
  )
  gen.add_argument(
    "--policy",
    default="full",
    help="a policy spec: a name from jmmkv.policies.NAMES, or name:key=value",
  )
  gen.add_argument(
    "--budget", type=float, default=None, help="kept fraction in (0, 1]: needed except for full"
  )
  gen.add_argument("--max-new-tokens", type=int, default=64)
  gen.add_argument(
    "--decode-window",
    type=int,
    default=None,
    help="keep the K/V of only the last N generated tokens (a fixed cache for long answers)",
  )
  gen.add_argument("--dtype", choices=DTYPES, default="float32")
  gen.set_defaults(func=_generate)
  bench = sub.add_parser(
    "bench",
    help="KV memory and latency of each policy x budget vs Full, or (--max-length) the longest "
    "prompt each fits in a memory limit (random weights)",
  )
  bench.add_argument(
    "--preset",
    choices=["llava-mini", "tiny"],
    default="llava-mini",
    help="llava-mini: 8 layers, D=512, 8 heads (MHA), head dim 64, vocab 4096",
  )
  bench.add_argument(
    "--lengths", default=None, help="comma-separated prompt lengths (default 4096)"
  )
  bench.add_argument(
    "--policies",
    default="all",
    help="comma-separated names or specs (lookm:keep_all_text=false); 'all' = every name",
  )
  bench.add_argument("--budgets", default="0.5,0.2,0.05", help="comma-separated ratios in (0, 1]")
  bench.add_argument("--max-new-tokens", type=int, default=32)
  bench.add_argument("--repeats", type=int, default=3)
  bench.add_argument("--dtype", choices=DTYPES, default="float32")
  bench.add_argument("--batch", type=int, default=1, help="prompts per batch (same length)")
  bench.add_argument(
    "--compare-hf",
    action="store_true",
    help="also time transformers (PyTorch, SDPA, DynamicCache): its prefill and full-cache "
    "decoding; needs torch==2.13.0 (pip install -e '.[test]')",
  )
  bench.add_argument("--out", default="bench.json", help="where to write the JSON results")
  bench.add_argument(
    "--max-length",
    default=None,
    metavar="LIMIT",
    help="instead of timing: the longest prompt each policy x budget fits in LIMIT bytes (e.g. "
    "2GiB, 512MiB; powers of 1024), from XLA's memory analysis of generate's compiled stages, "
    "parameters included; no latency run",
  )
  bench.add_argument(
    "--max-search-length",
    type=int,
    default=1 << 20,
    help="--max-length: the longest prompt length searched",
  )
  bench.add_argument(
    "--check-length",
    type=int,
    default=3072,
    help="--max-length: one generate call at this length (at most the one found) is also "
    "measured, beside its estimate; 0: none",
  )
  bench.set_defaults(func=_bench)
  from jmmkv.eval import cli as eval_cli

  eval_cli.register(sub)
  return parser


def _bench(args) -> int:
  if args.max_length is not None:
    from jmmkv import bench_fit

    return bench_fit.main(args)
  from jmmkv import bench

  return bench.main(args)


def _show_warning(message, category, filename, lineno, file=None, line=None):
  """jmmkv's own warnings as one ``jmmkv: warning: ...`` line; others as Python shows them."""
  package = str(Path(__file__).parent)
  if str(filename).startswith(package):
    print(f"jmmkv: warning: {message}", file=sys.stderr if file is None else file)
  else:
    _default_show(message, category, filename, lineno, file, line)


_default_show = warnings.showwarning


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  for name in ("batch", "prompt_len", "max_new_tokens", "repeats", "decode_window"):
    value = getattr(args, name, None)
    if value is not None and value < 1:
      print(f"jmmkv: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
      return 2
  try:
    with warnings.catch_warnings():
      warnings.showwarning = _show_warning
      return args.func(args)
  except USER_ERRORS as e:
    print(f"jmmkv: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jmmkv: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
