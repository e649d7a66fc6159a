"""Synthetic long-context multimodal tasks and the small LLaVA trained on them.

`tasks` generates the samples (four MileBench-like families), `images` draws their pictures,
`vocab` holds the word-level tokenizer and the LLaVA processor, `evaluate` scores a model under a
KV-cache policy. ``MODEL_DIR`` is the bundled checkpoint (HF LLaVA format), written by
``scripts/train_tiny_llava.py``; ``MODEL_DIR / "training.json"`` records how it was trained and
what it scores.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
