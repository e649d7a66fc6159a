"""Tiny synthetic MileBench tasks in MileBench's on-disk format, written to a directory.

``<root>/<Task>/<Task>.json`` = {"meta_data": {"dataset", "split", "num_sample",
"task_instruction", "question_type"}, "data": [{"sample_id", "task_instruction_id",
"task_instance": {"context", "images_path", ["choice_list"]}, "response",
"image_quantity_level"}]}, and the images (tiny random PNGs) under ``<root>/<Task>/images/``.
Words are "wN" so that the tiny test tokenizer knows them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (question_type, instructions, samples); a sample: (context, n_images, choices,
# response, level or None). With the tiny LLaVA (16 tokens per image, 5 chat-template tokens)
# every prompt is 33-64 tokens long: one prompt-length bucket, so one compilation.
SUITE = {
  "ActionSequence": (  # T, multiple choice
    "multi-choice",
    ["w100 w101 w102", "w110 w111"],
    [
      ("{image#1} w5 w6 {image#2} w7 w8", 2, ["w20", "w21", "w22", "w23"], "w22", "Few"),
      ("w9 {image#1} w10", 1, ["w30", "w31"], "w30", "Few"),
    ],
  ),
  "ALFRED": (  # S, open-ended: ROUGE-L
    "open-ended",
    ["w120 w121 w122"],
    [
      ("w40 {image#1} w41 {image#2} w42", 2, None, "w43 w44 w45", "Medium"),
      ("{image#1} w46 w47 w48 w49 w50 w51 w52 w53 w54 w55", 1, None, "w48 w49", None),
    ],
  ),
  "TextNeedleInAHaystack": (  # NH: needle match
    "open-ended",
    ["w130 w131"],
    [
      (
        "w50 w51 w52 w53 {image#1} w54 w55 w56 w57 w58 w59 w60 w61 {image#2} "
        "w62 w63 w64 w65 w66 w67 w68 w69 w70 w71",
        2,
        None,
        "w56",
        "Many",
      )
    ],
  ),
}


def write_task(root: Path, name: str, question_type: str, instructions, samples, seed=0) -> Path:
  """Writes one task; returns its directory."""
  rng = np.random.default_rng(seed)
  task_dir = Path(root) / name
  (task_dir / "images").mkdir(parents=True, exist_ok=True)
  data = []
  for i, (context, n_images, choices, response, level) in enumerate(samples):
    paths = []
    for k in range(n_images):
      h, w = (int(x) for x in rng.integers(16, 40, 2))
      paths.append(f"{i}_{k}.png")
      pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(task_dir / "images" / paths[-1])
    instance = {"context": context, "images_path": paths}
    if choices is not None:
      instance["choice_list"] = list(choices)
    sample = {
      "sample_id": i,
      "task_instruction_id": i % len(instructions),
      "task_instance": instance,
      "response": response,
    }
    if level is not None:
      sample["image_quantity_level"] = level
    data.append(sample)
  meta = {
    "dataset": name,
    "split": "test",
    "num_sample": len(data),
    "task_instruction": list(instructions),
    "question_type": question_type,
  }
  (task_dir / f"{name}.json").write_text(json.dumps({"meta_data": meta, "data": data}, indent=1))
  return task_dir


def write_suite(root: Path, suite=SUITE, seed: int = 0) -> Path:
  """Writes every task of ``suite`` under ``root``; returns ``root``."""
  for j, (name, (qtype, instructions, samples)) in enumerate(suite.items()):
    write_task(root, name, qtype, instructions, samples, seed=seed + j)
  return Path(root)
