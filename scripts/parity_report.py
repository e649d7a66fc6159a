"""Measured max |jmmkv - transformers| logits on the tiny text configs of the tests (fp32 and bf16),
and decode-step vs full-forward logits. A report, not a test: prints a table.

  python scripts/parity_report.py
"""

import os
import pathlib
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402

import jmmkv  # noqa: E402
from hf_models import (
  CONFIG_NAMES,
  build_model,
  hf_logits,
  pad_batch,
  positions_from_mask,
  random_ids,
)  # noqa: E402


def main():
  print(
    f"{'config':20s} {'fp32 max|diff|':>15s} {'bf16 max|diff|':>15s} {'logit scale':>12s} {'decode vs full':>15s}"
  )
  for name in CONFIG_NAMES:
    fp32 = bf16 = scale = decode = 0.0
    for seed in (0, 1, 2):
      hf = build_model(name, seed)
      d = tempfile.mkdtemp()
      hf.save_pretrained(d)
      rng = np.random.default_rng(seed)
      seqs = [random_ids(rng, 13), random_ids(rng, 7)]
      m32, m16 = jmmkv.load(d), jmmkv.load(d, dtype="bfloat16")
      for side in ("left", "right"):
        ids, mask = pad_batch(seqs, side)
        ref = hf_logits(hf, ids, mask, positions_from_mask(mask))
        valid = mask.astype(bool)
        fp32 = max(fp32, np.abs(m32.logits(ids, mask) - ref)[valid].max())
        bf16 = max(bf16, np.abs(m16.logits(ids, mask) - ref)[valid].max())
        scale = max(scale, np.abs(ref).max())
      out = jmmkv.generate(
        m32, m32.prepare(input_ids=seqs), max_new_tokens=16, eos_token_id=[], output_scores=True
      )
      for b, s in enumerate(seqs):
        full = m32.logits(np.array([list(s) + out.tokens[b]]))[0]
        decode = max(decode, np.abs(out.scores[b] - full[len(s) - 1 : len(s) + 15]).max())
    print(f"{name:20s} {fp32:15.2e} {bf16:15.3f} {scale:12.1f} {decode:15.2e}")


if __name__ == "__main__":
  main()
