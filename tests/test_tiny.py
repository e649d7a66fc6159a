"""jmmkv.tiny.write_tiny_llava: a torch-free tiny LLaVA-1.5 directory that transformers and jmmkv
both load, with the same logits."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

import jmmkv
from jmmkv.tiny import IMAGE_SIZE, PATCH, VOCAB, write_tiny_llava

IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return write_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "model", seed=0)


def _images(seed: int, sizes=((40, 50), (24, 70))) -> list[Image.Image]:
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in sizes]


def test_transformers_loads_it_and_logits_match(tiny_dir):
  hf, info = LlavaForConditionalGeneration.from_pretrained(
    tiny_dir, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
  )
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  proc = AutoProcessor.from_pretrained(tiny_dir, backend="pil")
  arrays = proc(
    text=["USER: <image> what changed ? <image> compare the two pictures . ASSISTANT:"],
    images=_images(1),
    return_tensors="np",
  )
  ids = arrays["input_ids"]
  assert (ids == VOCAB - 2).sum() == 2 * IMAGE_TOKENS and (ids == 0).sum() == 0  # no <unk>
  with torch.no_grad():
    ref = hf(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(arrays["attention_mask"]),
      pixel_values=torch.from_numpy(arrays["pixel_values"]),
    ).logits.numpy()
  got = jmmkv.load(tiny_dir, dtype="float32").logits(
    input_ids=ids, attention_mask=arrays["attention_mask"], pixel_values=arrays["pixel_values"]
  )
  assert got.shape == ref.shape == (1, ids.shape[1], VOCAB)
  assert ref.std() > 0.1  # random weights, not a degenerate model
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_prepare_and_generate(tiny_dir):
  model = jmmkv.load(tiny_dir)
  batch = model.prepare(prompts=["<image> <image> describe"], images=[_images(2)])
  assert (batch.modality[0] == 2).sum() == 2 * IMAGE_TOKENS
  assert set(batch.media_index[0].tolist()) == {-1, 0, 1}
  policy, budget = jmmkv.policies.get("madakv"), jmmkv.Budget(ratio=0.2)
  out = jmmkv.generate(model, batch, policy, budget, max_new_tokens=4, eos_token_id=[])
  assert len(out.tokens[0]) == 4 and all(0 <= t < VOCAB for t in out.tokens[0])
  assert isinstance(out.texts[0], str) and out.stats["kept_fraction"] < 0.5


def test_seeds_give_different_weights(tmp_path):
  a = load_file(write_tiny_llava(tmp_path / "s0", seed=0) / "model.safetensors")
  again = load_file(write_tiny_llava(tmp_path / "s0b", seed=0) / "model.safetensors")
  b = load_file(write_tiny_llava(tmp_path / "s1", seed=1) / "model.safetensors")
  assert a.keys() == b.keys() == again.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], again[k])
    assert a[k].shape == b[k].shape and not np.allclose(a[k], b[k]), k


def test_written_without_torch(tmp_path):
  code = (
    "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
    "from jmmkv.tiny import write_tiny_llava\n"
    f"write_tiny_llava({str(tmp_path / 'm')!r})\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
  names = {p.name for p in (tmp_path / "m").iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
