"""The prefill's MLP runs over token chunks: the same numbers, activations bounded by the chunk.

Peak memory is measured from the process (Linux ``VmHWM``): XLA CPU's ``memory_analysis`` does not
count the matmul outputs of the unchunked MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jmmkv
from jmmkv.cache import stats
from jmmkv.models import llama
from jmmkv.models.configs import tiny_decoder


def _prefill(cfg, params, x, valid):
  pos = jnp.broadcast_to(jnp.arange(x.shape[1]), valid.shape)
  dec = llama.Decoder(cfg)
  return dec.apply(params, x, pos, valid, None, stats.NONE, method=llama.Decoder.prefill)[:3]


def test_chunked_mlp_equals_the_whole_prompt_at_once(monkeypatch):
  """3 seeds, padded rows, 4 chunks of 16 tokens against the whole 64-token prompt."""
  cfg = tiny_decoder(vocab_size=64, hidden_size=32, intermediate_size=96, num_layers=2)
  whole = jax.jit(lambda p, x, v: _prefill(cfg, p, x, v))  # traced before the chunk changes
  valid = jnp.asarray(np.arange(64)[None] < np.array([[64], [41]]))
  args = []
  for seed in range(3):
    params = jmmkv.random_model(cfg, seed=seed).params["text"]
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 64, 32)), jnp.float32)
    args.append((params, x, valid, whole(params, x, valid)))
  monkeypatch.setattr(llama, "MLP_CHUNK", 16)
  chunked = jax.jit(lambda p, x, v: _prefill(cfg, p, x, v))
  for params, x, valid, want in args:
    for a, b in zip(want, chunked(params, x, valid)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


_MEASURE = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jmmkv.cache import stats
from jmmkv.models import llama
from jmmkv.models.configs import tiny_decoder

t, f = 8192, 4096
cfg = tiny_decoder(  # narrow and one head: the MLP's [T, F] activations are what is measured
  vocab_size=64, hidden_size=32, intermediate_size=f, num_layers=1, num_heads=1, num_kv_heads=1,
  head_dim=32,
)
params = jax.jit(lambda key: llama.init_params(cfg, key))(jax.random.key(0))  # not op by op
x = jnp.asarray(np.random.default_rng(0).normal(size=(1, t, 32)), jnp.float32)
valid = jnp.ones((1, t), bool)


def peak():  # MiB: this process's peak RSS (VmHWM: not inherited from a parent, as ru_maxrss is)
  status = open("/proc/self/status").read()
  return int(status.split("VmHWM:")[1].split()[0]) / 1024


growth = []
for chunk in (llama.MLP_CHUNK, 10**9):  # chunked (the default), then the whole prompt at once
  llama.MLP_CHUNK = chunk
  fn = jax.jit(
    lambda p, x, v: llama.Decoder(cfg).apply(
      p, x, jnp.arange(t)[None], v, None, stats.NONE, method=llama.Decoder.prefill
    )[:3]
  )
  compiled = fn.lower(params, x, valid).compile()
  open("/proc/self/clear_refs", "w").write("5")  # VmHWM := the RSS now
  before = peak()
  jax.block_until_ready(compiled(params, x, valid))
  growth.append(peak() - before)
print(growth)
"""


def test_mlp_activations_do_not_grow_with_the_prompt():
  """One layer with a wide MLP (F = 4096) at T = 8192, where one [T, F] float32 activation is
    128 MiB: the chunked prefill raises the process's peak memory by less than that; the same
    prefill without chunks raises it by more (so the measurement sees the activations). One fresh
  process; its peak RSS is reset (``/proc/self/clear_refs``) before each run."""
  import ast
  import subprocess
  import sys

  out = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  chunked, whole = ast.literal_eval(out.stdout.strip().splitlines()[-1])
  assert chunked < 100, f"chunked prefill: +{chunked:.0f} MiB"
  assert whole > 128, f"unchunked prefill: +{whole:.0f} MiB (a [T, F] activation is 128 MiB)"
