"""The bundled tokenizer and LLaVA processor: built with `tokenizers`, saved and reloaded as HF
files, and equal to the plain-Python encoding the training script uses."""

from __future__ import annotations

import numpy as np

from jmmkv.synthetic import tasks, vocab


def test_vocabulary_round_trips(tmp_path):
  from transformers import AutoProcessor

  vocab.build_processor().save_pretrained(tmp_path)
  proc = AutoProcessor.from_pretrained(tmp_path, backend="pil")
  tok = proc.tokenizer
  words = vocab.words()
  assert len(set(words)) == len(words)
  assert tok.convert_tokens_to_ids(words) == list(range(len(words)))
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (vocab.BOS, vocab.EOS, vocab.PAD)
  plain = " ".join(w for w in words if w not in vocab.SPECIALS)
  ids = tok(plain)["input_ids"]
  assert ids == vocab.encode(plain) and ids[0] == vocab.BOS and vocab.UNK not in ids
  assert tok.decode(ids, skip_special_tokens=True) == plain


def test_processor_matches_training_encoding(tmp_path):
  from transformers import AutoProcessor

  vocab.build_processor().save_pretrained(tmp_path)
  proc = AutoProcessor.from_pretrained(tmp_path, backend="pil")
  for task in tasks.TASKS:
    s = tasks.heldout(task, 1, tasks.TaskSettings(3, 2))[0]
    out = proc(text=[s.prompt], images=s.images, return_tensors="np")
    assert out["input_ids"][0].tolist() == vocab.encode(s.prompt)
    np.testing.assert_allclose(out["pixel_values"], vocab.pixels(s.images), atol=1e-6)
