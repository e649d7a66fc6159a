"""MEDA's paper entropy on a conversation's next turn (`CrossEntropy.compute_after`): each KV
head has its own cache slots, so the head average is taken per token. Checked against a NumPy
loop written from the definition (ALGORITHMS.md 1.1, with the new turn's queries), on random
data where heads keep different tokens at different slots."""

from collections import defaultdict

import jax.numpy as jnp
import numpy as np
import pytest

from jmmkv.cache.stats import Keys
from jmmkv.cache.statistics import CrossEntropy

B, T, N, K, H, C = 2, 6, 4, 2, 8, 10  # C cache slots per head, then the T new tokens


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _reference(q, k, kvalid, kmod, ktok, qvalid, qmod):
  """[B, 2]: mean over the new text (visual) queries of the entropy of the head-averaged
  probabilities, per token, over the visual (text) keys each head holds."""
  g = N // K
  out = np.zeros((B, 2))
  for b in range(B):
    q_text, q_vis = qvalid[b] & (qmod[b] == 1), qvalid[b] & (qmod[b] >= 2)
    k_text, k_vis = kvalid[b] & (kmod[b] == 1), kvalid[b] & (kmod[b] >= 2)
    for d, (rows, cols) in enumerate(((q_text, k_vis), (q_vis, k_text))):
      if not rows.any() or not cols.any():
        continue
      ents = []
      for t in np.flatnonzero(rows):
        pbar = defaultdict(float)
        for n in range(N):
          slots = np.flatnonzero(cols[n // g])
          if len(slots) == 0:
            continue
          p = _softmax(k[b, n // g, slots] @ q[b, t, n] * H**-0.5)
          for slot, pi in zip(slots, p):
            pbar[ktok[b, n // g, slot]] += pi / N
        v = np.array(list(pbar.values()))
        ents.append(-(v * np.log(v)).sum())
      out[b, d] = np.mean(ents)
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_entropy_after_a_cache_averages_heads_per_token(seed):
  rng = np.random.default_rng(seed)
  tok_mod = rng.integers(1, 3, 40)  # each earlier token's modality (1 text, 2 image)
  q = rng.standard_normal((B, T, N, H)).astype(np.float32)
  k = rng.standard_normal((B, K, C + T, H)).astype(np.float32)
  ktok = np.full((B, K, C + T), -1)
  kvalid = np.zeros((B, K, C + T), bool)
  qvalid = np.arange(T)[None] < np.array([[T], [T - 2]])  # row 1: 2 padding tokens
  qmod = rng.integers(1, 3, (B, T))
  qmod[:, :2] = [1, 2]  # every row asks in both directions
  for b in range(B):
    for h in range(K):  # each head keeps its own tokens, in ascending order, slots first
      kept = np.sort(rng.choice(40, size=rng.integers(4, C + 1), replace=False))
      ktok[b, h, : len(kept)] = kept
      kvalid[b, h, : len(kept)] = True
    ktok[b, :, C:] = 100 + np.arange(T)  # the new tokens, the same in every head
    kvalid[b, :, C:] = qvalid[b]
  kmod = np.zeros_like(ktok)
  for b in range(B):  # a token has one modality, whichever head holds it
    new = qmod[b][np.clip(ktok[b] - 100, 0, T - 1)]
    kmod[b] = np.where(ktok[b] >= 100, new, tok_mod[np.clip(ktok[b], 0, 39)])
  kmod = np.where(kvalid, kmod, 0)
  keys = Keys(
    jnp.asarray(k),
    jnp.asarray(kvalid),
    jnp.asarray(qvalid),
    C,
    C + T,
    jnp.asarray(kmod, jnp.int32),
    jnp.asarray(ktok, jnp.int32),
    jnp.asarray(np.where(qvalid, qmod, 0), jnp.int32),
  )
  got = np.asarray(CrossEntropy(block=4).compute_after(jnp.asarray(q), keys))
  want = _reference(q, k, kvalid, kmod, ktok, qvalid, np.where(qvalid, qmod, 0))
  assert (want > 0).all()  # both directions have queries and keys in both rows
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
