"""Peak memory of whole `jmmkv.generate` calls on the llava-mini shapes, per policy x budget.

``python scripts/peak_memory.py 16384 full snapkv@0.2 lookm:keep_all_text=false@0.05 full``
prints one JSON line per spec: the peak above the memory held just before the call
(`jmmkv.memory.peak_bytes`: process peak RSS on CPU), each call compiled by a first call, and
the kept fraction. Bench windows (`jmmkv.bench.SMALL_WINDOW`) apply. Name ``full`` twice (first
and last) to see the spread of the baseline.
"""

from __future__ import annotations

import json
import sys

import jmmkv
from jmmkv import memory
from jmmkv.bench import PRESETS, SMALL_WINDOW, prompt
from jmmkv.models.configs import tiny_decoder


def main(length: int, specs: list[str]) -> None:
  cfg = tiny_decoder(**PRESETS["llava-mini"])
  model = jmmkv.random_model(cfg, seed=0)
  batch = prompt(length, cfg.vocab_size)
  for item in specs:
    spec, _, ratio = item.partition("@")
    name = spec.split(":")[0]
    policy = jmmkv.policies.from_spec(spec, **SMALL_WINDOW.get(name, {}))
    budget = None if name == "full" else jmmkv.Budget(ratio=float(ratio))
    kw = dict(max_new_tokens=32, eos_token_id=[])
    jmmkv.generate(model, batch, policy, budget, **kw)  # compiles
    out, peak, how = memory.peak_bytes(jmmkv.generate, model, batch, policy, budget, **kw)
    row = dict(T=length, spec=item, peak_mib=peak and round(peak / 2**20, 1), measured=how)
    print(json.dumps(row | dict(kept=round(out.stats["kept_fraction"], 3))), flush=True)


if __name__ == "__main__":
  if len(sys.argv) < 3:
    raise SystemExit(__doc__)
  main(int(sys.argv[1]), sys.argv[2:])
