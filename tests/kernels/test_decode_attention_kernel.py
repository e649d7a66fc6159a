"""Paged decode attention: the Pallas page-partials kernel (interpret mode) against its jnp
reference, and `paged_partials` + normalisation against dense NumPy softmax attention per owner."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import kernel_calls, lowered

from jmmkv.kernels import decode_attention as da
from jmmkv.models.attention import MASK_VALUE


def _pages(seed, p, s, h, g, dtype):
  """Random q/k/v (never zeros) and validity: pages ``seed % 3`` (mod 3) empty, the others
  partly valid with at least one valid slot."""
  rng = np.random.default_rng(seed)
  q, k, v = (
    jnp.asarray(rng.standard_normal(shape) + 0.1, dtype)
    for shape in ((p, g, h), (p, s, h), (p, s, h))
  )
  valid = rng.random((p, s)) < 0.6
  valid[np.arange(p), rng.integers(0, s, p)] = True
  valid[seed % 3 :: 3] = False
  return q, k, v, valid


KERNEL_CASES = [  # P, S, H, G, dtype, seed, pages per block
  (1, 8, 16, 1, jnp.float32, 0, 8),  # one empty page
  (1, 16, 64, 4, jnp.float32, 1, 8),  # one partly valid page
  (5, 16, 64, 4, jnp.float32, 1, 8),
  (13, 32, 64, 4, jnp.float32, 2, 4),
  (13, 8, 16, 1, jnp.float32, 0, 1),
  (13, 16, 64, 8, jnp.float32, 1, 8),
  (5, 16, 64, 4, jnp.bfloat16, 0, 8),
  (13, 32, 16, 1, jnp.bfloat16, 1, 4),
]


@pytest.mark.parametrize("p,s,h,g,dtype,seed,pages", KERNEL_CASES)
def test_kernel_matches_reference(p, s, h, g, dtype, seed, pages):
  q, k, v, valid = _pages(seed, p, s, h, g, dtype)
  scale = h**-0.5
  got = da.page_partials(
    q, k, v, valid, scale=scale, block=da.PageBlocks(pages=pages), interpret=True
  )
  want = da.page_partials_reference(q, k, v, valid, scale=scale)
  rtol = 1e-5 if dtype == jnp.float32 else 1e-3
  for name, x, y in zip("oml", got, want):
    assert x.dtype == jnp.float32 and x.shape == y.shape, name
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max(), err_msg=name)
  o, m, l = (np.asarray(x) for x in got)
  empty = ~valid.any(-1)
  assert empty.any() == (seed % 3 < p) and (~empty).any() == (p > 1 or seed % 3 > 0)
  assert (m[empty] == MASK_VALUE).all() and (l[empty] == 0).all() and (o[empty] == 0).all()
  assert (m[~empty] > MASK_VALUE).all() and (l[~empty] >= 1).all()


@pytest.mark.parametrize("seed,p,s,h,g", [(0, 5, 12, 24, 7), (1, 13, 16, 96, 3), (2, 3, 5, 40, 1)])
def test_kernel_with_the_gpu_padding_matches_reference(seed, p, s, h, g):
  """The GPU path (query rows to >= 16, S and H zero-padded to powers of two) in interpret mode,
  on sizes that are not powers of two."""
  q, k, v, valid = _pages(seed, p, s, h, g, jnp.float32)
  got = da.page_partials(q, k, v, valid, scale=0.3, interpret=True, platform="gpu")
  want = da.page_partials_reference(q, k, v, valid, scale=0.3)
  for name, x, y in zip("oml", got, want):
    assert x.shape == y.shape, name
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(y).max(), err_msg=name)
  with pytest.raises(ValueError, match="power of two"):
    da.page_partials(q, k, v, valid, scale=0.3, block=da.PageBlocks(pages=6), platform="gpu")


@pytest.mark.parametrize("platform,target", [("tpu", "tpu"), ("gpu", "cuda")])
@pytest.mark.parametrize("dtype,h,x64", [(jnp.float32, 64, False), (jnp.bfloat16, 96, True)])
def test_kernel_lowers(platform, target, dtype, h, x64):
  """Lowering for a TPU (Mosaic) or GPU (Triton) target from the CPU host (no compile); H = 96
  (not a power of two, which Triton refuses unpadded), and under x64."""
  q, k, v, valid = _pages(0, 13, 16, h, 4, dtype)
  fn = jax.jit(functools.partial(da.page_partials, scale=0.125, platform=platform))
  assert kernel_calls(lowered(fn, q, k, v, valid, target=target, x64=x64), target) == 1


def _layout(rng, pages_per_owner, s, h, g, pad_pages, pad_owner):
  """Paged layout with ``pages_per_owner[o]`` pages for owner o, then ``pad_pages`` padding pages
  (owner ``pad_owner``) with random validity (they must be ignored)."""
  n_owners = len(pages_per_owner)
  owner = np.repeat(np.arange(n_owners), pages_per_owner)
  owner = np.concatenate([owner, np.full(pad_pages, pad_owner)]).astype(np.int32)
  p = owner.size
  q = rng.standard_normal((n_owners, g, h)).astype(np.float32) + 0.1
  k = rng.standard_normal((p, s, h)).astype(np.float32) + 0.1
  v = rng.standard_normal((p, s, h)).astype(np.float32) + 0.1
  valid = rng.random((p, s)) < 0.5
  return q, k, v, valid, owner


def _dense_reference(q, k, v, valid, owner, scale):
  """Per owner: its valid slots concatenated, softmax(scale q k^T) v and the log-sum-exp."""
  out, lse = [], []
  for o in range(q.shape[0]):
    mine = (owner == o)[:, None] & valid
    k_o, v_o = k[mine].astype(np.float64), v[mine].astype(np.float64)
    if not len(k_o):
      out.append(None)
      lse.append(None)
      continue
    s = scale * q[o].astype(np.float64) @ k_o.T
    mx = s.max(-1, keepdims=True)
    e = np.exp(s - mx)
    out.append(e @ v_o / e.sum(-1, keepdims=True))
    lse.append(mx[:, 0] + np.log(e.sum(-1)))
  return out, lse


@pytest.mark.parametrize("impl", ["reference", "interpret"])
@pytest.mark.parametrize("seed,s,h,g,pad_owner", [(0, 8, 16, 4, -1), (1, 32, 64, 1, 7)])
def test_paged_partials_matches_dense_attention(monkeypatch, impl, seed, s, h, g, pad_owner):
  monkeypatch.setenv("JMMKV_KERNELS", impl)
  rng = np.random.default_rng(seed)
  pages_per_owner = [0, 1, 3, 2, 0, 1, 4]  # owner 0 and 4 have no page
  q, k, v, valid, owner = _layout(rng, pages_per_owner, s, h, g, pad_pages=3, pad_owner=pad_owner)
  first = np.cumsum(pages_per_owner) - pages_per_owner
  valid[first[5]] = False  # owner 5: its only page is empty
  valid[first[2] + 1] = False  # owner 2: one of its three pages is empty
  for o in (1, 2, 3, 6):
    valid[first[o], 0] = True
  scale = h**-0.5
  fn = jax.jit(lambda *a: da.paged_partials(*a, scale=scale))
  o_OGH, m_OG, l_OG = (np.asarray(x) for x in fn(q, k, v, valid, owner))
  assert o_OGH.shape == (7, g, h) and m_OG.shape == l_OG.shape == (7, g)
  assert np.isfinite(o_OGH).all() and np.isfinite(m_OG).all() and np.isfinite(l_OG).all()
  want_o, want_lse = _dense_reference(q, k, v, valid, owner, scale)
  for o in range(7):
    if want_o[o] is None:  # no page, or only empty pages
      assert o in (0, 4, 5)
      assert (m_OG[o] == MASK_VALUE).all() and (l_OG[o] == 0).all() and (o_OGH[o] == 0).all()
      continue
    got = o_OGH[o] / l_OG[o][:, None]
    np.testing.assert_allclose(got, want_o[o], rtol=1e-5, atol=1e-5, err_msg=f"owner {o}")
    lse = m_OG[o] + np.log(l_OG[o])
    np.testing.assert_allclose(lse, want_lse[o], rtol=1e-5, atol=1e-5, err_msg=f"owner {o}")


def test_combine_empty_layout_is_nan_free():
  """No real page at all (only padding): every owner reads as empty."""
  o, m, l = da.combine(
    jnp.ones((2, 3, 4)), jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.array([-1, 5]), num_owners=5
  )
  assert o.shape == (5, 3, 4) and (np.asarray(o) == 0).all() and (np.asarray(l) == 0).all()
  assert (np.asarray(m) == MASK_VALUE).all()
