"""Trains the bundled tiny LLaVA (`jmmkv/synthetic/model/`) on the synthetic tasks, on CPU.

Architecture (HF ``LlavaForConditionalGeneration``): a CLIP ViT (32 px images, patch 8, so 16
tokens per image, CLS dropped), a 2-layer GELU projector and a Llama decoder with tied
embeddings, with the word-level tokenizer of `jmmkv.synthetic.vocab`. The forward below is
written on the HF tensors themselves (names and ``[out, in]`` layouts of ``save_pretrained``), so
saving is writing them out; the tests check that jmmkv and transformers load the result and
answer alike.

Training (`Recipe`): JAX + optax AdamW on this machine's CPU, in two phases: the vision tower
learns colour and shape from linear heads on its tokens, then the whole model learns the four
tasks (several questions per training context, loss on each reply ``ECHO ANSWER </s>``) under a
curriculum of more and more images. Training-only guides (`guide_loss`) give three heads
attention targets and read the previous frame from one layer's output: temporal order and
counting did not form from the answer loss alone. Everything is seeded (parameters; step ``i``'s
data from (seed, i)), so a rerun gives the same model up to XLA's floating-point
nondeterminism. Run it under ``nice`` on a shared machine::

  nice -n 19 python scripts/train_tiny_llava.py --out jmmkv/synthetic/model

``--steps 20 --vision-steps 20 --eval-n 4`` is a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import queue
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmmkv.synthetic import tasks, vocab


@dataclasses.dataclass(frozen=True)
class Arch:
  vocab_size: int = len(vocab.VOCAB)
  hidden: int = 128  # D
  intermediate: int = 256  # F
  layers: int = 4
  heads: int = 4
  kv_heads: int = 2
  vis_hidden: int = 64
  vis_intermediate: int = 256
  vis_layers: int = 2
  vis_heads: int = 4
  image_size: int = vocab.IMAGE_SIZE
  patch: int = vocab.PATCH_SIZE
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  ln_eps: float = 1e-5
  tie: bool = True  # tied input/output embeddings (copying a token is then an easy circuit)

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads

  @property
  def patches(self) -> int:
    return (self.image_size // self.patch) ** 2


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Two phases. (1) Vision: the ViT and projector learn colour and shape from linear heads on
  every image token (the colour and shape words' embeddings are the heads). (2) Tasks: the whole
  model learns the four tasks from the answer loss (plus ``aux`` times the vision loss and the
  guides), one AdamW run with warmup and cosine decay. The most images per episode is
  ``start_images`` for the first ``hold`` of the steps, then grows linearly to ``max_images``
  over the next ``ramp`` of them (a curriculum: short contexts are about 4x cheaper a step; with
  the guides, the needles and temporal order reach train accuracy 0.9 there, counting 0.6);
  the filler setting is drawn from
  0..``max_filler``. Each row of a batch is padded to the smallest of ``buckets`` that holds the
  longest row."""

  vision_steps: int = 2500
  vision_batch: int = 128
  vision_lr: float = 2e-3
  steps: int = 4000
  batch: int = 16
  lr: float = 2e-3
  warmup: int = 100
  start_images: int = 4
  hold: float = 0.4
  ramp: float = 0.25
  max_images: int = 16
  max_filler: int = 8
  buckets: tuple[int, ...] = (96, 192, 320, 512)
  aux: float = 0.3
  # Most questions per training context, per task (tasks.TASKS order). The text needle has one
  # passkey, as evaluated: with several colour-named ones to tell apart, its retrieval circuit did
  # not form beside the image tasks (train accuracy 0.01, against 0.94 with one).
  questions: tuple[int, ...] = (3, 1, 8, 4)
  # Training-only guides (`guide_loss`; 0 turns one off): attention targets for three heads
  # (`GUIDE_HEADS`) and linear heads reading the previous frame from layer 1's output. Without
  # them temporal order and counting stayed far below 0.9 (held-out 0.12 and 0.50, 16 images).
  guide: float = 0.2
  prev_probe: float = 0.1
  count_sink: int = 3  # counting guide: BOS weighs as much as this many images of the colour

  def images_at(self, step: int) -> int:
    frac = (step - self.hold * self.steps) / max(1.0, self.ramp * self.steps)
    frac = min(1.0, max(0.0, frac))
    return int(round(self.start_images + frac * (self.max_images - self.start_images)))


RECIPE = Recipe()


# ---- parameters (HF names and layouts) ------------------------------------------------------

TEXT, VISION, PROJ = "language_model.model.", "vision_tower.", "multi_modal_projector."


def init_params(a: Arch, seed: int) -> dict[str, jax.Array]:
  shapes: dict[str, tuple[int, ...]] = {
    TEXT + "embed_tokens.weight": (a.vocab_size, a.hidden),
    TEXT + "norm.weight": (a.hidden,),
  }
  if not a.tie:
    shapes["language_model.lm_head.weight"] = (a.vocab_size, a.hidden)
  kvd = a.kv_heads * a.head_dim
  for i in range(a.layers):
    p = f"{TEXT}layers.{i}."
    shapes |= {
      p + "input_layernorm.weight": (a.hidden,),
      p + "post_attention_layernorm.weight": (a.hidden,),
      p + "self_attn.q_proj.weight": (a.hidden, a.hidden),
      p + "self_attn.k_proj.weight": (kvd, a.hidden),
      p + "self_attn.v_proj.weight": (kvd, a.hidden),
      p + "self_attn.o_proj.weight": (a.hidden, a.hidden),
      p + "mlp.gate_proj.weight": (a.intermediate, a.hidden),
      p + "mlp.up_proj.weight": (a.intermediate, a.hidden),
      p + "mlp.down_proj.weight": (a.hidden, a.intermediate),
    }
  e = a.vis_hidden
  shapes |= {
    VISION + "embeddings.class_embedding": (e,),
    VISION + "embeddings.patch_embedding.weight": (e, 3, a.patch, a.patch),
    VISION + "embeddings.position_embedding.weight": (a.patches + 1, e),
    VISION + "pre_layrnorm.weight": (e,),
    VISION + "pre_layrnorm.bias": (e,),
    VISION + "post_layernorm.weight": (e,),
    VISION + "post_layernorm.bias": (e,),
    PROJ + "linear_1.weight": (a.hidden, e),
    PROJ + "linear_1.bias": (a.hidden,),
    PROJ + "linear_2.weight": (a.hidden, a.hidden),
    PROJ + "linear_2.bias": (a.hidden,),
  }
  for i in range(a.vis_layers):
    p = f"{VISION}encoder.layers.{i}."
    for n in ("layer_norm1", "layer_norm2"):
      shapes |= {p + n + ".weight": (e,), p + n + ".bias": (e,)}
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      shapes |= {p + f"self_attn.{n}.weight": (e, e), p + f"self_attn.{n}.bias": (e,)}
    shapes |= {
      p + "mlp.fc1.weight": (a.vis_intermediate, e),
      p + "mlp.fc1.bias": (a.vis_intermediate,),
      p + "mlp.fc2.weight": (e, a.vis_intermediate),
      p + "mlp.fc2.bias": (e,),
    }
  params, key = {}, jax.random.key(seed)
  # Words of one kind (colours, shapes, digits, passkeys, filler, ...) share a random direction
  # in their initial embeddings, so "attend to the passkey" or "copy a colour" need not first be
  # learned token by token from rare gradients.
  group = np.zeros(a.vocab_size, np.int32)
  for g, words in enumerate(vocab.GROUPS, 1):
    group[[vocab.VOCAB[w] for w in words]] = g
  shared = 0.02 * jax.random.normal(
    jax.random.fold_in(key, 10_000), (len(vocab.GROUPS) + 1, a.hidden)
  )
  for i, (name, shape) in enumerate(sorted(shapes.items())):
    if name.endswith(
      ("norm.weight", "layernorm.weight", "layrnorm.weight", "_norm1.weight", "_norm2.weight")
    ):
      params[name] = jnp.ones(shape, jnp.float32)
    elif name.endswith(".bias"):
      params[name] = jnp.zeros(shape, jnp.float32)
    else:
      params[name] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
  params[TEXT + "embed_tokens.weight"] += jnp.where((group > 0)[:, None], shared[group], 0.0)
  return params


# ---- forward (HF semantics) -----------------------------------------------------------------


def _linear(p, name, x):
  y = x @ p[name + ".weight"].T
  return y + p[name + ".bias"] if name + ".bias" in p else y


def _layer_norm(p, name, x, eps):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p[name + ".weight"] + p[name + ".bias"]


def _rms_norm(p, name, x, eps):
  return p[name + ".weight"] * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


def vision_features(p, a: Arch, pix_MCHW):
  """Projected image features ``[M, P, D]`` (last CLIP layer, CLS dropped)."""
  m, g, s = pix_MCHW.shape[0], a.image_size // a.patch, a.patch
  patches = pix_MCHW.reshape(m, 3, g, s, g, s).transpose(0, 2, 4, 1, 3, 5).reshape(m, g * g, -1)
  w = p[VISION + "embeddings.patch_embedding.weight"].reshape(a.vis_hidden, -1)
  x = patches @ w.T
  cls = jnp.broadcast_to(p[VISION + "embeddings.class_embedding"], (m, 1, a.vis_hidden))
  x = jnp.concatenate([cls, x], 1) + p[VISION + "embeddings.position_embedding.weight"]
  x = _layer_norm(p, VISION + "pre_layrnorm", x, a.ln_eps)
  nh = a.vis_heads
  hd = a.vis_hidden // nh
  for i in range(a.vis_layers):
    q = f"{VISION}encoder.layers.{i}."
    h = _layer_norm(p, q + "layer_norm1", x, a.ln_eps)
    split = lambda t: t.reshape(m, -1, nh, hd)
    qh, kh, vh = (split(_linear(p, q + f"self_attn.{n}_proj", h)) for n in "qkv")
    att = jax.nn.softmax(jnp.einsum("mtnh,msnh->mnts", qh, kh) * hd**-0.5, -1)
    o = jnp.einsum("mnts,msnh->mtnh", att, vh).reshape(m, -1, a.vis_hidden)
    x = x + _linear(p, q + "self_attn.out_proj", o)
    h = _linear(p, q + "mlp.fc1", _layer_norm(p, q + "layer_norm2", x, a.ln_eps))
    x = x + _linear(p, q + "mlp.fc2", h * jax.nn.sigmoid(1.702 * h))
  h = jax.nn.gelu(_linear(p, PROJ + "linear_1", x[:, 1:]), approximate=False)
  return _linear(p, PROJ + "linear_2", h)


def _rope(x_BTNH, theta: float):
  t, hd = x_BTNH.shape[1], x_BTNH.shape[-1]
  inv = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  f = jnp.arange(t, dtype=jnp.float32)[:, None] * inv
  cos, sin = jnp.cos(jnp.concatenate([f, f], -1)), jnp.sin(jnp.concatenate([f, f], -1))
  half = hd // 2
  rot = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], -1)
  return x_BTNH * cos[:, None] + rot * sin[:, None]


def _attention(q_BTNH, k_BTKH, v_BTKH):
  """Causal attention with its probabilities ``[B, N, T, T]`` (for the guides)."""
  rep = q_BTNH.shape[2] // k_BTKH.shape[2]
  k_BTNH, v_BTNH = jnp.repeat(k_BTKH, rep, 2), jnp.repeat(v_BTKH, rep, 2)
  s = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH) * q_BTNH.shape[-1] ** -0.5
  t = s.shape[-1]
  att_BNTS = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30), -1)
  return jnp.einsum("bnts,bsnh->btnh", att_BNTS, v_BTNH), att_BNTS


def logits(p, a: Arch, ids_BT, pix_MCHW, feat_BT, feats_MPD=None, trace=False):
  """``[B, T, V]``; ``feat_BT`` indexes the flat image features of image tokens (else -1).
  With ``trace``: also the attention probabilities of the `GUIDE_HEADS` layers ``{layer:
  [B, N, T, T]}`` and the residual stream after layer 1's attention ``[B, T, D]``."""
  emb = p[TEXT + "embed_tokens.weight"][ids_BT]
  if feats_MPD is None:
    feats_MPD = vision_features(p, a, pix_MCHW)
  feats = feats_MPD.reshape(-1, a.hidden)
  x = jnp.where((feat_BT >= 0)[..., None], feats[jnp.maximum(feat_BT, 0)], emb)
  b, t = ids_BT.shape
  atts, hid = {}, None
  for i in range(a.layers):
    q = f"{TEXT}layers.{i}."
    h = _rms_norm(p, q + "input_layernorm", x, a.rms_eps)
    qh = _rope(_linear(p, q + "self_attn.q_proj", h).reshape(b, t, a.heads, -1), a.rope_theta)
    kh = _rope(_linear(p, q + "self_attn.k_proj", h).reshape(b, t, a.kv_heads, -1), a.rope_theta)
    vh = _linear(p, q + "self_attn.v_proj", h).reshape(b, t, a.kv_heads, -1)
    if trace and i in {layer for layer, _ in GUIDE_HEADS.values()}:
      o, atts[i] = _attention(qh, kh, vh)
    else:
      o = jax.nn.dot_product_attention(qh, kh, vh, is_causal=True)
    x = x + _linear(p, q + "self_attn.o_proj", o.reshape(b, t, a.hidden))
    if i == PREV_PROBE_LAYER:
      hid = x
    h = _rms_norm(p, q + "post_attention_layernorm", x, a.rms_eps)
    gate = jax.nn.silu(_linear(p, q + "mlp.gate_proj", h))
    x = x + _linear(p, q + "mlp.down_proj", gate * _linear(p, q + "mlp.up_proj", h))
  x = _rms_norm(p, TEXT + "norm", x, a.rms_eps)
  out = x @ p[TEXT + "embed_tokens.weight" if a.tie else "language_model.lm_head.weight"].T
  return (out, atts, hid) if trace else out


# ---- data -----------------------------------------------------------------------------------


def encode_episode(ep: tasks.Episode, a: Arch, train: bool):
  """(ids, targets): the context, then each question followed by the reply ``ECHO ANSWER </s>``
  with targets on the reply tokens (training); or the first question and the echo, no targets
  (evaluation: the answer is predicted at the last position)."""
  ids = vocab.encode(ep.context, a.patches)
  tgt = [-1] * len(ids)
  for q, ans in ep.qa if train else ep.qa[:1]:
    ids += vocab.encode(q, bos=False)
    tgt += [-1] * (len(ids) - len(tgt))
    reply = [vocab.VOCAB[w] for w in tasks.echo(ep.task, q).split()]
    if not train:
      ids += reply
      tgt += [-1] * len(reply)
      break
    reply += [vocab.VOCAB[ans], vocab.EOS]
    tgt[-1] = reply[0]
    ids += reply[:-1]
    tgt += reply[1:]
    ids.append(vocab.EOS)
    tgt.append(-1)
  return ids, tgt


def max_images_for(length: int, batch: int, a: Arch) -> int:
  """Static image-slot count of a batch of rows of ``length`` tokens."""
  return batch * max(1, min(RECIPE.max_images, length // a.patches))


def make_batch(eps: list[tasks.Episode], a: Arch, length: int, max_images: int, train=True):
  b = len(eps)
  ids = np.full((b, length), vocab.PAD, np.int32)
  tgt = np.full((b, length), -1, np.int32)
  feat = np.full((b, length), -1, np.int32)
  pix = np.zeros((max(max_images, 1), 3, a.image_size, a.image_size), np.float32)
  last = np.zeros((b,), np.int32)
  labels = np.full((2, max(max_images, 1)), -1, np.int32)  # (colour, shape) of each image
  m = 0
  for r, ep in enumerate(eps):
    row, t = encode_episode(ep, a, train)
    if len(row) > length or m + len(ep.images) > max_images:
      raise ValueError(f"episode of {len(row)} tokens / {len(ep.images)} images does not fit")
    ids[r, : len(row)], tgt[r, : len(row)], last[r] = row, t, len(row) - 1
    where = np.flatnonzero(ids[r] == vocab.IMAGE_ID)
    feat[r, where] = m * a.patches + np.arange(len(where))
    if ep.images:
      pix[m : m + len(ep.images)] = vocab.pixels(ep.images)
      for k, (colour, shape) in enumerate(ep.contents):
        labels[:, m + k] = tasks.COLOURS.index(colour), tasks.SHAPES.index(shape)
    m += len(ep.images)
  # The answer target sits just before the EOS target (after the echo targets).
  answer = np.zeros_like(tgt)
  answer[:, :-1] = tgt[:, 1:] == vocab.EOS
  return dict(ids=ids, tgt=tgt, feat=feat, pix=pix, last=last, labels=labels, answer=answer)


def train_episode(rng: np.random.Generator, r: Recipe, task: str, most: int) -> tasks.Episode:
  """A training context of ``task`` with up to ``most`` images and several questions."""
  lo = {"text_needle": 0, "temporal": 2}.get(task, 1)
  n = int(rng.integers(lo, max(lo, most) + 1))
  f = int(rng.integers(0, r.max_filler + 1))
  cap = r.questions[tasks.TASKS.index(task)]
  if task == "temporal":
    cap = min(cap, n - 1)
  elif task == "image_needle":
    cap = min(cap, n)
  elif task == "counting":
    cap = min(cap, max(1, n // 2))
  q = int(rng.integers(1, cap + 1))
  return tasks.episode(task, rng, tasks.TaskSettings(n, f), q)


def batches(r: Recipe, a: Arch, seed: int, start: int = 0):
  """Yields (step, batch) from ``start`` on; rows cycle through the tasks; episodes longer than
  the largest bucket are redrawn. Step ``i``'s data depends only on (seed, i)."""
  for i in range(start, r.steps):
    rng = np.random.default_rng([seed, 1, i])
    most = r.images_at(i)
    eps, rows = [], []
    while len(eps) < r.batch:
      task = tasks.TASKS[len(eps) % len(tasks.TASKS)]
      ep = train_episode(rng, r, task, most)
      n = len(encode_episode(ep, a, True)[0])
      if n <= r.buckets[-1]:
        eps.append(ep)
        rows.append(n)
    length = min(b for b in r.buckets if b >= max(rows))
    batch = make_batch(eps, a, length, max_images_for(length, r.batch, a))
    yield i, batch | guide_targets(eps, batch, a, r)


def vision_batches(r: Recipe, a: Arch, seed: int):
  """(pixels, labels) batches of single shape images for the vision phase."""
  for i in range(r.vision_steps):
    rng = np.random.default_rng([seed, 0, i])
    lab = np.stack(
      [
        rng.integers(0, len(tasks.COLOURS), r.vision_batch),
        rng.integers(0, len(tasks.SHAPES), r.vision_batch),
      ]
    ).astype(np.int32)
    imgs = [tasks.draw.shape_image(tasks.SHAPES[s], tasks.COLOURS[c], rng) for c, s in lab.T]
    yield vocab.pixels(imgs), lab


def prefetch(gen, size: int = 3):
  q: queue.Queue = queue.Queue(size)

  def work():
    try:
      for item in gen:
        q.put(item)
      q.put(StopIteration())
    except BaseException as e:  # re-raised in the consumer
      q.put(e)

  threading.Thread(target=work, daemon=True).start()
  while True:
    item = q.get()
    if isinstance(item, StopIteration):
      return
    if isinstance(item, BaseException):
      raise item
    yield item


# ---- guides (training only) ------------------------------------------------------------------

# (layer, head) of the guided heads. "prev": each temporal frame's tokens attend to the frame
# before, so they carry what came before them. "hop": the reply's last echo token attends to what
# answers it (the frame after the asked one; the passkey's value). "count": the counting echo
# attends to BOS and to the asked colour's images in proportion, so the head's output mixes the two
# by the count. Linear heads (the "probe." parameters, not saved) read the previous frame's colour
# and shape from the residual stream after `PREV_PROBE_LAYER`'s attention.
GUIDE_HEADS = {"prev": (1, 0), "hop": (3, 0), "count": (2, 1)}
PREV_PROBE_LAYER = 1


def guide_targets(eps: list[tasks.Episode], b: dict, a: Arch, r: Recipe) -> dict:
  """Targets of `guide_loss` for a batch from `make_batch` (training rows)."""
  n, length = b["ids"].shape
  q = max(r.questions)
  out = dict(
    prev_lo=np.full((n, length), -1, np.int32),  # first token of the previous frame
    hop_pos=np.zeros((n, q), np.int32),
    hop_mask=np.zeros((n, q, length), np.float32),
    count_pos=np.zeros((n, q), np.int32),
    count_q=np.zeros((n, q, length), np.float32),
    prev_labels=np.full_like(b["labels"], -1),
  )
  m = 0
  for row, ep in enumerate(eps):
    starts = np.flatnonzero(b["feat"][row] >= 0)[:: a.patches]
    answers = np.flatnonzero(b["answer"][row])
    for k, (question, answer) in enumerate(ep.qa):
      asked, t = tasks.echo(ep.task, question).split(), answers[k]
      if ep.task == "temporal":
        j = ep.contents.index(tuple(asked)) + 1
        out["hop_pos"][row, k] = t
        out["hop_mask"][row, k, starts[j] : starts[j] + a.patches] = 1
      elif ep.task == "text_needle":
        out["hop_pos"][row, k] = t
        out["hop_mask"][row, k, np.flatnonzero(b["ids"][row, :t] == vocab.VOCAB[answer])[0]] = 1
      elif ep.task == "counting":
        out["count_pos"][row, k] = t
        weights = out["count_q"][row, k]
        weights[0] = r.count_sink * a.patches  # BOS
        for i, (colour, _) in enumerate(ep.contents):
          if colour == asked[0]:
            weights[starts[i] : starts[i] + a.patches] = 1
        weights /= weights.sum()
    if ep.task == "temporal":
      for i in range(1, len(starts)):
        out["prev_lo"][row, starts[i] : starts[i] + a.patches] = starts[i - 1]
        out["prev_labels"][:, m + i] = b["labels"][:, m + i - 1]
    m += len(ep.images)
  return out


def init_probe(a: Arch, seed: int) -> dict[str, jax.Array]:
  key = jax.random.fold_in(jax.random.key(seed), 20_000)
  return {
    f"probe.prev_{name}": 0.02 * jax.random.normal(jax.random.fold_in(key, i), (a.hidden, len(w)))
    for i, (name, w) in enumerate(zip(("colour", "shape"), AUX_WORDS))
  }


def _head_rows(atts, which, pos_BQ):
  layer, head = GUIDE_HEADS[which]
  return jnp.take_along_axis(atts[layer][:, head], pos_BQ[..., None], 1)  # [B, Q, S]


def guide_loss(p, a: Arch, r: Recipe, atts, hid_BTD, batch):
  """Weighted sum of: -log of the "prev" head's mass on the previous frame and of the "hop"
  head's on the answer; KL(target || "count" head); the previous frame's colour and shape
  cross-entropy from the "probe." heads."""
  eps, total = 1e-6, 0.0
  # prev: mass on [lo, lo + P) from a cumulative sum over key positions
  layer, head = GUIDE_HEADS["prev"]
  att = atts[layer][:, head]
  cum = jnp.concatenate([jnp.zeros(att.shape[:2] + (1,)), jnp.cumsum(att, -1)], -1)
  lo = jnp.maximum(batch["prev_lo"], 0)[..., None]
  mass = (jnp.take_along_axis(cum, lo + a.patches, -1) - jnp.take_along_axis(cum, lo, -1))[..., 0]
  w = (batch["prev_lo"] >= 0).astype(jnp.float32)
  total += -(jnp.log(mass + eps) * w).sum() / jnp.maximum(w.sum(), 1.0)
  # hop
  mass = (_head_rows(atts, "hop", batch["hop_pos"]) * batch["hop_mask"]).sum(-1)
  w = batch["hop_mask"].max(-1)
  total += -(jnp.log(mass + eps) * w).sum() / jnp.maximum(w.sum(), 1.0)
  # count
  tq = batch["count_q"]
  att = _head_rows(atts, "count", batch["count_pos"])
  kl = (tq * (jnp.log(tq + eps) - jnp.log(att + eps))).sum(-1)
  w = (tq.sum(-1) > 0).astype(jnp.float32)
  total += (kl * w).sum() / jnp.maximum(w.sum(), 1.0)
  loss = r.guide * total
  # previous frame's colour and shape
  img = jnp.maximum(batch["feat"], 0) // a.patches
  for name, lab in zip(("colour", "shape"), batch["prev_labels"]):
    y = jnp.where(batch["feat"] >= 0, lab[img], -1)
    lp = jax.nn.log_softmax(hid_BTD @ p[f"probe.prev_{name}"], -1)
    nll = -jnp.take_along_axis(lp, jnp.maximum(y, 0)[..., None], -1)[..., 0]
    w = (y >= 0).astype(jnp.float32)
    loss += r.prev_probe * (nll * w).sum() / jnp.maximum(w.sum(), 1.0)
  return loss


# ---- training -------------------------------------------------------------------------------


EMBED = TEXT + "embed_tokens.weight"
# The vision loss classifies every image token's projected feature with the word embeddings of
# the colour and shape words as the linear heads: image features are grounded in the words (as a
# LLaVA projector maps into the word-embedding space), so "find the image of the asked shape" and
# "say its colour" start as near-identity attention circuits.
AUX_WORDS = (tasks.COLOURS, tasks.SHAPES)


def _aux_heads(p):
  return [p[EMBED][np.array([vocab.VOCAB[w] for w in words])] for words in AUX_WORDS]


def _aux_loss(p, feats_MPD, labels_2M):
  """Cross-entropy of the colour / shape word heads on every image token's projected feature."""
  total = 0.0
  for head, lab in zip(_aux_heads(p), labels_2M):
    lp = jax.nn.log_softmax(feats_MPD @ head.T, -1)  # [M, P, classes]
    w = (lab >= 0).astype(jnp.float32)
    nll = -jnp.take_along_axis(lp, jnp.maximum(lab, 0)[:, None, None], -1)[..., 0].mean(1)
    total = total + (nll * w).sum() / jnp.maximum(w.sum(), 1.0)
  return total


def _aux_accuracy(p, feats_MPD, labels_2M):
  return [
    (jnp.argmax(feats_MPD @ head.T, -1) == lab[:, None]).mean()
    for head, lab in zip(_aux_heads(p), labels_2M)
  ]


def _optimizer(lr: float, warmup: int, steps: int):
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * 0.05)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.98, weight_decay=0.01))


def make_vision_step(a: Arch, opt):
  def loss_fn(p, pix, labels):
    feats = vision_features(p, a, pix)
    return _aux_loss(p, feats, labels), _aux_accuracy(p, feats, labels)

  @jax.jit
  def step(p, s, pix, labels):
    (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(p, pix, labels)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss, acc

  return step


def make_step(a: Arch, opt, r: Recipe):
  def loss_fn(p, batch):
    feats = vision_features(p, a, batch["pix"])
    guided = bool(r.guide or r.prev_probe)
    out = logits(p, a, batch["ids"], batch["pix"], batch["feat"], feats, trace=guided)
    lg, atts, hid = out if guided else (out, None, None)
    tgt = batch["tgt"]
    w = (tgt >= 0).astype(jnp.float32)
    lp = jax.nn.log_softmax(lg, -1)
    nll = -jnp.take_along_axis(lp, jnp.maximum(tgt, 0)[..., None], -1)[..., 0]
    # Answer accuracy per row (echo and EOS targets excluded): rows cycle through the tasks.
    is_answer = w * (tgt != vocab.EOS) * (batch["answer"] > 0)
    correct = (jnp.argmax(lg, -1) == tgt).astype(jnp.float32) * is_answer
    loss = (nll * w).sum() / w.sum()
    if r.aux:
      loss = loss + r.aux * _aux_loss(p, feats, batch["labels"])
    if guided:
      loss = loss + guide_loss(p, a, r, atts, hid, batch)
    return loss, (correct.sum(1), is_answer.sum(1))

  @jax.jit
  def step(p, s, batch):
    (loss, (right, count)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss, right, count

  return step


@functools.partial(jax.jit, static_argnames=("a",))
def _predict(p, ids, pix, feat, last, a: Arch):
  lg = logits(p, a, ids, pix, feat)
  return jnp.argmax(jnp.take_along_axis(lg, last[:, None, None], 1)[:, 0], -1)


def evaluate(p, a: Arch, n: int, settings: tasks.TaskSettings, batch: int = 8) -> dict[str, float]:
  """Greedy answer accuracy per task on the first ``n`` held-out samples (training forward, full
  context: the prompt and the reply token, answer predicted at the last position)."""
  out = {}
  for task in tasks.TASKS:
    eps = tasks.episodes(task, n, settings=settings, split="heldout")
    length = max(len(encode_episode(e, a, False)[0]) for e in eps)
    length = -(-length // 64) * 64
    right = 0
    for i in range(0, n, batch):
      chunk = eps[i : i + batch]
      chunk += [chunk[-1]] * (batch - len(chunk))
      bt = make_batch(chunk, a, length, sum(len(e.images) for e in chunk), train=False)
      pred = np.asarray(_predict(p, bt["ids"], bt["pix"], bt["feat"], bt["last"], a=a))
      for j, e in enumerate(eps[i : i + batch]):
        right += int(pred[j] == vocab.VOCAB[e.qa[0][1]])
    out[task] = right / n
  return out


def train_vision(params, a: Arch, r: Recipe, seed: int, log_every: int):
  """Trains the vision tower, the projector and the word embeddings (only the colour and shape
  rows get gradients); the rest of the decoder is left as it is."""
  rest = {k: v for k, v in params.items() if not k.startswith((VISION, PROJ, EMBED))}
  params = {k: v for k, v in params.items() if k not in rest}
  opt = _optimizer(r.vision_lr, min(50, r.vision_steps // 5), r.vision_steps)
  state, step = opt.init(params), make_vision_step(a, opt)
  t0 = time.time()
  for i, (pix, lab) in enumerate(prefetch(vision_batches(r, a, seed))):
    params, state, loss, acc = step(params, state, pix, lab)
    if (i + 1) % log_every == 0 or i + 1 == r.vision_steps:
      print(
        f"vision step {i + 1}/{r.vision_steps} loss {float(loss):.3f} token accuracy: colour "
        f"{float(acc[0]):.3f} shape {float(acc[1]):.3f} [{time.time() - t0:.0f} s]",
        flush=True,
      )
  return params | rest


def train_tasks(params, a: Arch, r: Recipe, seed: int, log_every: int):
  """Trains everything on the tasks (plus ``aux`` times the vision loss)."""
  params = params | init_probe(a, seed)
  opt = _optimizer(r.lr, min(r.warmup, r.steps // 5), r.steps)
  state, step = opt.init(params), make_step(a, opt, r)
  nt = len(tasks.TASKS)
  row_task = np.arange(r.batch) % nt
  losses, right, count, t0 = [], np.zeros(nt), np.zeros(nt), time.time()
  for i, batch in prefetch(batches(r, a, seed)):
    params, state, loss, rt, c = step(params, state, batch)
    losses.append(float(loss))
    np.add.at(right, row_task, np.asarray(rt))
    np.add.at(count, row_task, np.asarray(c))
    if (i + 1) % log_every == 0 or i + 1 == r.steps:
      accs = " ".join(f"{t[:5]} {x / c:.2f}" for t, x, c in zip(tasks.TASKS, right, count) if c)
      print(
        f"step {i + 1}/{r.steps} images<={r.images_at(i)} len {batch['ids'].shape[1]} loss "
        f"{np.mean(losses):.3f} train acc: {accs} [{time.time() - t0:.0f} s]",
        flush=True,
      )
      losses, right, count = [], np.zeros(nt), np.zeros(nt)
  return {k: v for k, v in params.items() if not k.startswith("probe.")}


# ---- export ---------------------------------------------------------------------------------


def hf_config(a: Arch) -> dict:
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

  text = LlamaConfig(
    vocab_size=a.vocab_size,
    hidden_size=a.hidden,
    intermediate_size=a.intermediate,
    num_hidden_layers=a.layers,
    num_attention_heads=a.heads,
    num_key_value_heads=a.kv_heads,
    head_dim=a.head_dim,
    max_position_embeddings=8192,
    rms_norm_eps=a.rms_eps,
    rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
    bos_token_id=vocab.BOS,
    eos_token_id=vocab.EOS,
    pad_token_id=vocab.PAD,
    tie_word_embeddings=a.tie,
  )
  vis = CLIPVisionConfig(
    hidden_size=a.vis_hidden,
    intermediate_size=a.vis_intermediate,
    num_hidden_layers=a.vis_layers,
    num_attention_heads=a.vis_heads,
    image_size=a.image_size,
    patch_size=a.patch,
    layer_norm_eps=a.ln_eps,
    projection_dim=a.vis_hidden,
  )
  return LlavaConfig(
    vision_config=vis,
    text_config=text,
    image_token_index=vocab.IMAGE_ID,
    image_seq_length=a.patches,
    vision_feature_layer=-1,
    vision_feature_select_strategy="default",
    projector_hidden_act="gelu",
    tie_word_embeddings=a.tie,
  )


def save(params, a: Arch, out: Path, meta: dict):
  from safetensors.numpy import save_file
  from transformers import GenerationConfig

  out.mkdir(parents=True, exist_ok=True)
  cfg = hf_config(a)
  cfg.architectures = ["LlavaForConditionalGeneration"]
  cfg.save_pretrained(out)
  GenerationConfig(
    bos_token_id=vocab.BOS, eos_token_id=vocab.EOS, pad_token_id=vocab.PAD, do_sample=False
  ).save_pretrained(out)
  tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in params.items()}
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  vocab.build_processor().save_pretrained(out)
  (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", type=Path, default=Path("jmmkv/synthetic/model"))
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--steps", type=int, default=RECIPE.steps, help="task-phase steps")
  ap.add_argument("--vision-steps", type=int, default=RECIPE.vision_steps)
  ap.add_argument("--eval-n", type=int, default=50, help="held-out samples per task")
  ap.add_argument("--log-every", type=int, default=50)
  ap.add_argument("--init", type=Path, default=None, help="start from this model directory")
  ap.add_argument(
    "--vision-init",
    type=Path,
    default=None,
    help="skip the vision phase: take its parameters (vision tower, projector, embeddings) from a "
    "model directory",
  )
  args = ap.parse_args()
  a = Arch()
  r = dataclasses.replace(RECIPE, steps=args.steps, vision_steps=args.vision_steps)
  if args.vision_init is not None:  # the decoder from init_params, the vision side from a file
    from safetensors.numpy import load_file

    params = init_params(a, args.seed)
    loaded = load_file(str(args.vision_init / "model.safetensors"))
    params |= {k: jnp.asarray(v) for k, v in loaded.items() if k.startswith((VISION, PROJ, EMBED))}
    r = dataclasses.replace(r, vision_steps=0)
  elif args.init is not None:
    from safetensors.numpy import load_file

    params = {k: jnp.asarray(v) for k, v in load_file(str(args.init / "model.safetensors")).items()}
  else:
    params = init_params(a, args.seed)
  n_params = sum(int(np.prod(v.shape)) for v in params.values())
  print(f"{a}\n{r}\n{n_params / 1e6:.2f}M parameters", flush=True)
  t0 = time.time()
  if r.vision_steps:
    params = train_vision(params, a, r, args.seed, args.log_every)
  t1 = time.time()
  if r.steps:
    params = train_tasks(params, a, r, args.seed, args.log_every)
  wall = time.time() - t0
  acc = evaluate(params, a, args.eval_n, tasks.DEFAULTS) if args.eval_n else {}
  print(f"held-out ({args.eval_n}/task, {tasks.DEFAULTS}): {acc}", flush=True)
  meta = dict(
    seed=args.seed,
    wall_time_s=dict(
      vision=round(t1 - t0, 1), tasks=round(wall - (t1 - t0), 1), total=round(wall, 1)
    ),
    recipe=dataclasses.asdict(r),
    arch=dataclasses.asdict(a),
    heldout=dict(n=args.eval_n, settings=dataclasses.asdict(tasks.DEFAULTS), accuracy=acc),
    jax=jax.__version__,
    cpu_devices=len(jax.devices("cpu")),
  )
  save(params, a, args.out, meta)
  print(f"saved {args.out} after {wall:.0f} s of training", flush=True)


if __name__ == "__main__":
  main()
