"""Sampling filters vs transformers' logits warpers (the reference), and the draw distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
  TemperatureLogitsWarper,
  TopKLogitsWarper,
  TopPLogitsWarper,
)

from jmmkv.sampling import Sampling


def _reference(logits, temperature, top_k, top_p):
  x = torch.tensor(logits)
  x = TemperatureLogitsWarper(temperature)(None, x)
  if top_k is not None:
    x = TopKLogitsWarper(top_k)(None, x)
  if top_p is not None:
    x = TopPLogitsWarper(top_p)(None, x)
  return x.numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
  "temperature, top_k, top_p",
  [
    (1.0, None, None),
    (0.7, 5, None),
    (1.3, None, 0.9),
    (0.5, 20, 0.8),
    (2.0, 1, None),
    (1.0, None, 0.05),
  ],
)
def test_filter_matches_transformers(seed, temperature, top_k, top_p):
  logits = np.random.default_rng(seed).normal(0, 3, (4, 97)).astype(np.float32)
  ours = np.asarray(Sampling(temperature, top_k, top_p).filter(jnp.asarray(logits)))
  ref = _reference(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
  np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


def test_greedy_is_argmax_with_ties_to_lower_id():
  logits = jnp.array([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 0.0, 0.0]])
  np.testing.assert_array_equal(Sampling()(logits, jax.random.key(0)), [1, 0])


def test_draws_follow_the_filtered_distribution():
  logits = np.random.default_rng(3).normal(0, 1, (1, 12)).astype(np.float32)
  s = Sampling(temperature=0.8, top_k=6, top_p=0.9)
  p = torch.softmax(torch.tensor(_reference(logits, 0.8, 6, 0.9)), -1).numpy()[0]
  n = 20000
  keys = jax.random.split(jax.random.key(7), n)
  draws = np.asarray(jax.vmap(lambda k: s(jnp.asarray(logits), k))(keys))[:, 0]
  freq = np.bincount(draws, minlength=12) / n
  assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(p))
  tol = 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9  # 4.5 binomial standard deviations per token
  assert np.all(np.abs(freq - p) <= tol), (freq, p)
