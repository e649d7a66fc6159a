"""The training-only guides of scripts/train_tiny_llava.py point at what answers each question:
checked against the drawn images (`images.dominant_colour`) and the reply targets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from jmmkv.synthetic import images, tasks, vocab

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny_llava.py"


@pytest.fixture(scope="module")
def train():
  spec = importlib.util.spec_from_file_location("train_tiny_llava", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while it executes
  try:
    spec.loader.exec_module(module)
  finally:
    del sys.modules[spec.name]
  return module


def _image_of(feat_row, pos, patches):
  return int(feat_row[pos]) // patches


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_guide_targets_point_at_the_answers(train, seed):
  a, r = train.Arch(), train.RECIPE
  p = a.patches
  rng = np.random.default_rng(seed)
  s = tasks.TaskSettings(n_images=5, filler=3)
  eps = [
    tasks.episode("temporal", rng, s, 3),
    tasks.episode("text_needle", rng, s, 1),
    tasks.episode("counting", rng, s, 2),
    tasks.episode("image_needle", rng, s, 2),
  ]
  b = train.make_batch(eps, a, 320, sum(len(e.images) for e in eps))
  g = train.guide_targets(eps, b, a, r)
  feat, ids, tgt = b["feat"], b["ids"], b["tgt"]
  first = [0, 5, 10, 15]  # each row's first image in the batch's image slots

  # temporal: the hop targets the frame after the one asked about, whose colour is the answer
  for k, (question, answer) in enumerate(eps[0].qa):
    where = np.flatnonzero(g["hop_mask"][0, k])
    assert len(where) == p and np.all(np.diff(where) == 1)
    frame = _image_of(feat[0], where[0], p) - first[0]
    assert images.dominant_colour(eps[0].images[frame]) == answer
    assert images.dominant_colour(eps[0].images[frame - 1]) == question.split()[-3]
    assert tgt[0, g["hop_pos"][0, k]] == vocab.VOCAB[answer]
  assert not g["hop_mask"][0, len(eps[0].qa) :].any()
  # temporal: every frame after the first looks back at the frame before it
  for t in np.flatnonzero(feat[0] >= 0):
    frame = _image_of(feat[0], t, p)
    lo = g["prev_lo"][0, t]
    if frame == first[0]:
      assert lo == -1
    else:
      assert feat[0, lo] == (frame - 1) * p  # the previous frame's first token
      np.testing.assert_array_equal(g["prev_labels"][:, frame], b["labels"][:, frame - 1])
  assert (g["prev_lo"][1:] == -1).all() and (g["prev_labels"][:, 5:] == -1).all()

  # text needle: the hop targets the passkey's value token
  (question, answer), t = eps[1].qa[0], g["hop_pos"][1, 0]
  where = np.flatnonzero(g["hop_mask"][1, 0])
  assert len(where) == 1 and where[0] < t and ids[1, where[0]] == vocab.VOCAB[answer]
  assert tgt[1, t] == vocab.VOCAB[answer]

  # counting: BOS and the asked colour's images, BOS weighing `count_sink` images
  for k, (question, answer) in enumerate(eps[2].qa):
    q = g["count_q"][2, k]
    assert q.sum() == pytest.approx(1.0) and tgt[2, g["count_pos"][2, k]] == vocab.VOCAB[answer]
    shown = {_image_of(feat[2], t, p) - first[2] for t in np.flatnonzero(q[1:]) + 1}
    colour = question.split()[-2]
    assert len(shown) == int(answer)
    assert all(images.dominant_colour(eps[2].images[i]) == colour for i in shown)
    n = int(answer)
    assert q[0] == pytest.approx(r.count_sink / (r.count_sink + n))
  # the image needle has no guide targets
  assert not g["hop_mask"][3].any() and not g["count_q"][3].any()
