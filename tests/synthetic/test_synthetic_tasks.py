"""The synthetic task generators: deterministic per seed, and each answer checked independently
of the generator (from the prompt text, or from the pixels of the drawn images)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jmmkv.synthetic import images, tasks, vocab

SMALL = tasks.TaskSettings(n_images=6, filler=3)


def _pixels(sample):
  return np.stack([np.asarray(im) for im in sample.images])


@pytest.mark.parametrize("task", tasks.TASKS)
def test_deterministic_per_seed(task):
  a, b = tasks.heldout(task, 3, SMALL), tasks.heldout(task, 3, SMALL)
  assert [(s.prompt, s.answer) for s in a] == [(s.prompt, s.answer) for s in b]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(_pixels(x), _pixels(y))
  # Sample i does not depend on how many are drawn; other seeds and the train split differ.
  assert tasks.heldout(task, 1, SMALL)[0].prompt == a[0].prompt
  other = tasks.heldout(task, 3, SMALL, seed=1)
  train = [e.sample() for e in tasks.episodes(task, 3, settings=SMALL, split="train")]
  for xs in (other, train):
    assert [s.prompt for s in xs] != [s.prompt for s in a]


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("settings", [SMALL, tasks.TaskSettings(2, 0), tasks.DEFAULTS])
def test_markers_lengths_and_answers(task, settings):
  for s in tasks.heldout(task, 4, settings):
    assert s.prompt.count(tasks.IMAGE) == len(s.images) == settings.n_images
    assert all(im.size == (images.SIZE, images.SIZE) and im.mode == "RGB" for im in s.images)
    assert s.answer in vocab.VOCAB and len(s.answer.split()) == 1
    assert all(w in vocab.VOCAB for w in s.prompt.split())  # no unknown word
    ids = vocab.encode(s.prompt)
    assert tasks.num_tokens(s.prompt) == len(ids)
    assert ids.count(vocab.IMAGE_ID) == tasks.IMAGE_TOKENS * len(s.images)


def test_long_prompts():
  """Prompts of a few thousand tokens are a matter of settings."""
  s = tasks.heldout("counting", 1, tasks.TaskSettings(n_images=96, filler=16))[0]
  assert 3000 < tasks.num_tokens(s.prompt) < 4500
  assert tasks.heldout("text_needle", 1, tasks.TaskSettings(0, 10))[0].images == []


def test_image_needle_shows_the_answer():
  for e in tasks.episodes("image_needle", 20, settings=SMALL, split="heldout"):
    shape = re.fullmatch(r"what colour is the (\w+) \?", e.qa[0][0]).group(1)
    where = [i for i, (_, sh) in enumerate(e.contents) if sh == shape]
    assert len(where) == 1  # exactly one image shows the queried shape
    assert images.dominant_colour(e.images[where[0]]) == e.qa[0][1]


def test_text_needle_one_unnamed_passkey():
  for s in tasks.heldout("text_needle", 20, tasks.TaskSettings(4, 6)):
    assert s.prompt.endswith("what is the passkey ?") and s.echo == "passkey"
    assert re.findall(r"the passkey is (\d+) \.", s.prompt) == [s.answer]
    assert len(re.findall(r"\b\d+\b", s.prompt)) == 1  # no other number in the prompt


def test_text_needle_colour_named_passkeys():
  for s in tasks.heldout("text_needle", 20, tasks.TaskSettings(4, 6, keys=3)):
    assert s.echo in tasks.COLOURS
    colour = re.search(r"what is the (\w+) passkey \?$", s.prompt).group(1)
    found = re.findall(rf"the {colour} passkey is (\d+) \.", s.prompt)
    assert found == [s.answer]
    assert len(re.findall(r"passkey is \d+ \.", s.prompt)) == 3


def test_temporal_answer_is_the_next_frame():
  for e in tasks.episodes("temporal", 20, settings=SMALL, split="heldout"):
    assert len(set(e.contents)) == len(e.contents)  # every frame distinct
    colour, shape = re.fullmatch(r"what colour comes after the (\w+) (\w+) \?", e.qa[0][0]).groups()
    j = e.contents.index((colour, shape))
    assert images.dominant_colour(e.images[j]) == colour
    assert images.dominant_colour(e.images[j + 1]) == e.qa[0][1]
    assert " ".join([tasks.IMAGE] * len(e.images)) in e.context  # consecutive frames


def test_counting_matches_an_independent_count():
  answers = set()
  for s in tasks.heldout("counting", 30, SMALL):
    colour = re.fullmatch(r".* how many images are (\w+) \?", s.prompt).group(1)
    count = sum(images.dominant_colour(im) == colour for im in s.images)
    assert str(count) == s.answer
    answers.add(s.answer)
  assert len(answers) >= 4  # the counts vary


def test_training_episodes_ask_several_questions():
  e = tasks.episode("counting", np.random.default_rng(0), SMALL, n_questions=3)
  assert len(e.qa) == 3 and len({q for q, _ in e.qa}) == 3
  assert e.sample(2).prompt == f"{e.context} {e.qa[2][0]}"


def test_digits_are_drawn():
  rng = np.random.default_rng(0)
  masks = [images.foreground(images.digit_image(d, "white", rng)) for d in range(10)]
  assert masks[8].sum() > masks[1].sum() > 0  # 8 lights every segment, 1 two
  with pytest.raises(ValueError):
    images.shape_image("hexagon", "red", rng)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_split_cuts_the_prompt_before_its_question(task):
  for s in tasks.heldout(task, 5):
    context, question = s.split()
    assert f"{context} {question}" == s.prompt
    assert question.split()[0] in ("what", "how") and question.endswith("?")
    assert "what" not in context.split() and "how" not in context.split()
