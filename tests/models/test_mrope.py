"""M-RoPE position ids (jmmkv.models.mrope) against transformers v5 Qwen2-VL / Qwen2.5-VL.

References: HF's own ``model.model.get_rope_index``, ``_prepare_position_ids_for_generation``,
and the position ids its language model receives in ``generate()`` and cached forwards. Exact
integer equality everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
  Qwen2_5_VLConfig,
  Qwen2_5_VLForConditionalGeneration,
  Qwen2VLConfig,
  Qwen2VLForConditionalGeneration,
)

from hf_models import TEXT
from jmmkv.models import mrope

SEEDS = (0, 1, 2)
VARIANTS = ("qwen2_vl", "qwen2_5_vl")  # Qwen3-VL (videos split per frame): test_qwen3_vl.py
MERGE = 2
IMAGE, VIDEO, VSTART, VEND = 999, 998, 997, 996
TOKEN_IDS = dict(
  image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND
)
QV = dict(
  TEXT,
  rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
)


def _build(variant: str):
  if variant == "qwen2_vl":
    vision = dict(
      depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
      spatial_merge_size=MERGE, temporal_patch_size=2,
    )  # fmt: skip
    cfg, cls = (
      Qwen2VLConfig(text_config=QV, vision_config=vision, **TOKEN_IDS),
      Qwen2VLForConditionalGeneration,
    )
  else:
    vision = dict(
      depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
      patch_size=14, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=56,
      fullatt_block_indexes=[1],
    )  # fmt: skip
    cfg = Qwen2_5_VLConfig(text_config=QV, vision_config=vision, **TOKEN_IDS)
    cls = Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(0)
  model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
  _randomize_(model, 0)
  return model.eval()


@torch.no_grad()
def _randomize_(model, seed):
  """Random non-degenerate params (positions do not depend on them; greedy tokens vary)."""
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=g)
    if p.ndim == 1:
      p.copy_(0.2 * noise if name.endswith(".bias") else 1.0 + 0.1 * noise)
    else:
      p.copy_(noise / np.sqrt(p[0].numel()))


@pytest.fixture(scope="module")
def hf():
  return {v: _build(v) for v in VARIANTS}


# ---------------------------------------------------------------- layouts


def _text(rng, lo=1, hi=6):
  return ("t", int(rng.integers(lo, hi + 1)))


def _grid(rng, t):
  return [t, 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5))]


def _layout(name: str, rng) -> list[list[tuple]]:
  """Rows of segments: ("t", n) text, ("i", grid) image, ("v", grid) video."""
  if name == "text_only":
    return [[_text(rng, 3, 12)]]
  if name == "one_image":
    return [[_text(rng), ("i", _grid(rng, 1)), _text(rng)]]
  if name == "three_images":
    imgs = [("i", [1, 4, 4]), ("i", [1, 4, 6]), ("i", [1, 2, 2])]
    return [[_text(rng), imgs[0], _text(rng), imgs[1], _text(rng), imgs[2], _text(rng)]]
  if name in ("video_t2", "video_t3"):
    return [[_text(rng), ("v", _grid(rng, int(name[-1]))), _text(rng)]]
  if name == "video_long":  # t axis outruns max(h, w)/m: text after the video reuses positions
    return [[_text(rng), ("v", [5, 2, 4])]]
  if name == "mixed":
    seg = [_text(rng), ("i", _grid(rng, 1)), _text(rng), ("v", _grid(rng, 2)), _text(rng)]
    return [seg + [("i", _grid(rng, 1)), _text(rng)]]
  if name.startswith("batch"):
    row0 = [_text(rng), ("i", [1, 4, 6]), _text(rng), ("v", _grid(rng, 3)), _text(rng, 8, 10)]
    return [row0, [_text(rng), ("v", [4, 2, 2])]]
  raise KeyError(name)


LAYOUTS = (
  "text_only", "one_image", "three_images", "video_t2", "video_t3", "video_long", "mixed",
  "batch_left", "batch_right",
)  # fmt: skip


def _row(rng, segments):
  ids, types, grids = [], [], {"i": [], "v": []}
  for kind, arg in segments:
    if kind == "t":
      ids += rng.integers(3, 990, size=arg).tolist()
      types += [0] * arg
    else:
      n = arg[0] * arg[1] * arg[2] // MERGE**2
      ids += [VSTART] + [IMAGE if kind == "i" else VIDEO] * n + [VEND]
      types += [0] + [1 if kind == "i" else 2] * n + [0]
      grids[kind].append(arg)
  return ids, types, grids


def _batch(rows, side="left"):
  """(ids, types, mask, image grids, video grids) as numpy, padded on `side`."""
  T = max(len(ids) for ids, _, _ in rows)
  ids_BT, types_BT, mask_BT = (np.zeros((len(rows), T), np.int64) for _ in range(3))
  grids = {"i": [], "v": []}
  for b, (ids, types, g) in enumerate(rows):
    sl = slice(T - len(ids), T) if side == "left" else slice(0, len(ids))
    ids_BT[b, sl], types_BT[b, sl], mask_BT[b, sl] = ids, types, 1
    grids["i"] += g["i"]
    grids["v"] += g["v"]
  img = np.array(grids["i"], np.int64).reshape(-1, 3) if grids["i"] else None
  vid = np.array(grids["v"], np.int64).reshape(-1, 3) if grids["v"] else None
  return ids_BT, types_BT, mask_BT, img, vid


def _make(name, seed):
  rng = np.random.default_rng(100 * seed + LAYOUTS.index(name))
  rows = [_row(rng, segs) for segs in _layout(name, rng)]
  ids, types, mask, img, vid = _batch(rows, "right" if name == "batch_right" else "left")
  return ids, types, (mask if name.startswith("batch") else None), img, vid


def _t(x, dtype=torch.long):
  return None if x is None else torch.as_tensor(x, dtype=dtype)


def _hf_rope_index(model, ids, types, img, vid, mask, **kw):
  # Keywords: the positional order differs (2.5 puts second_per_grid_ts before attention_mask).
  pos, deltas = model.model.get_rope_index(
    input_ids=_t(ids), mm_token_type_ids=_t(types, torch.int32), image_grid_thw=_t(img),
    video_grid_thw=_t(vid), attention_mask=_t(mask), **kw,
  )  # fmt: skip
  return pos.numpy(), deltas.numpy()


def _seconds_cases(rng, n_videos):
  """(HF value, jmmkv value) pairs of second_per_grid_ts: default, float32 tensors, lists."""
  if not n_videos:
    return [(None, None)]
  frac = rng.choice([0.3, 0.5, 0.7, 1.0, 1.5, 2.0], size=n_videos).tolist()
  cases = [(None, None), ([1.0] * n_videos, [1.0] * n_videos), (frac, frac)]
  for vals in ([1.0] * n_videos, [0.5] * n_videos, frac):
    cases.append((torch.tensor(vals, dtype=torch.float32), np.array(vals, np.float32)))
  return cases


# ---------------------------------------------------------------- rope_index vs HF


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rope_index_matches_hf(hf, variant, layout, seed):
  model = hf[variant]
  ids, types, mask, img, vid = _make(layout, seed)
  rng = np.random.default_rng(seed)
  n_vid = 0 if vid is None else len(vid)
  vision_cfg = model.model.config.vision_config
  default_tps = getattr(vision_cfg, "tokens_per_second", None)
  tps_cases = [default_tps, 2] if variant == "qwen2_5_vl" else [None]
  try:
    for tps in tps_cases:
      seconds = _seconds_cases(rng, n_vid) if variant == "qwen2_5_vl" else [(None, None)]
      for hf_sec, our_sec in seconds:
        if tps is not None:
          vision_cfg.tokens_per_second = tps
        kw = {} if variant == "qwen2_vl" else dict(second_per_grid_ts=hf_sec)
        want_pos, want_d = _hf_rope_index(model, ids, types, img, vid, mask, **kw)
        got_pos, got_d = mrope.rope_index(
          ids, types, img, vid, mask, spatial_merge_size=MERGE, variant=variant,
          second_per_grid_ts=our_sec, tokens_per_second=tps,
        )  # fmt: skip
        assert got_pos.dtype == np.int64 and got_d.dtype == np.int64
        assert got_pos.shape == (3, *ids.shape) and got_d.shape == (ids.shape[0], 1)
        np.testing.assert_array_equal(got_pos, want_pos, err_msg=f"tps={tps} sec={our_sec}")
        np.testing.assert_array_equal(got_d, want_d, err_msg=f"tps={tps} sec={our_sec}")
  finally:
    if default_tps is not None:
      vision_cfg.tokens_per_second = default_tps


@pytest.mark.parametrize("variant", VARIANTS)
def test_fractional_interval_truncates(hf, variant):
  """Qwen2.5-VL: t positions are floor(i * tps * seconds) (here 3 * 0.7 = 2.1 -> 0, 2, 4, 6)."""
  ids, types, _, _, vid = _batch([_row(np.random.default_rng(0), [("t", 2), ("v", [4, 2, 2])])])
  pos, _ = mrope.rope_index(
    ids, types, None, vid, spatial_merge_size=MERGE, variant=variant,
    second_per_grid_ts=np.array([0.7], np.float32), tokens_per_second=3,
  )  # fmt: skip
  start = 3  # 2 text tokens + <vision_start>
  want = [0, 2, 4, 6] if variant == "qwen2_5_vl" else [0, 1, 2, 3]
  np.testing.assert_array_equal(pos[0, 0, start : start + 4], np.array(want) + start)


def test_temporal_scaling_float32_like_torch(hf):
  """Qwen2.5-VL at 25 tokens/s with 2/fps seconds per grid: torch multiplies in float32, which
  truncates differently from float64 at some frames (e.g. fps 3: frame 3; fps 9, list: frame 45)."""
  model, vision_cfg = hf["qwen2_5_vl"], hf["qwen2_5_vl"].model.config.vision_config
  ids, types, _, _, vid = _batch([_row(np.random.default_rng(0), [("t", 2), ("v", [50, 2, 2])])])
  default_tps, vision_cfg.tokens_per_second = vision_cfg.tokens_per_second, 25
  differs_from_f64 = []
  try:
    for fps in (3, 7, 9, 12):
      for hf_sec, our_sec in (
        ([2 / fps], [2 / fps]),
        (torch.tensor([2 / fps]), np.float32([2 / fps])),
      ):
        want, _ = _hf_rope_index(model, ids, types, None, vid, None, second_per_grid_ts=hf_sec)
        got, _ = mrope.rope_index(
          ids, types, None, vid, spatial_merge_size=MERGE, variant="qwen2_5_vl",
          second_per_grid_ts=our_sec, tokens_per_second=25,
        )  # fmt: skip
        np.testing.assert_array_equal(got, want, err_msg=f"fps={fps} seconds={our_sec}")
        f64 = np.floor(np.arange(50) * 25 * (2 / fps)).astype(np.int64) + 3
        differs_from_f64.append((want[0, 0, 3:53] != f64).any())
  finally:
    vision_cfg.tokens_per_second = default_tps
  assert any(differs_from_f64) and not all(differs_from_f64)


# ---------------------------------------------------------------- text-only paths


def _capture_language_model(model):
  cap = []

  def hook(_, args, kwargs):
    cap.append(kwargs["position_ids"].clone() if kwargs.get("position_ids") is not None else None)

  return cap, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def _capture_rotary(model):
  cap = []
  hook = model.model.language_model.rotary_emb.register_forward_pre_hook(
    lambda _, args: cap.append(args[1].clone())
  )
  return cap, hook


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_text_positions_match_hf(hf, variant, seed):
  model = hf[variant]
  rng = np.random.default_rng(seed)
  rows = [_row(rng, [("t", int(rng.integers(3, 9)))]) for _ in range(2)]
  ids, types, mask, _, _ = _batch(rows, "left")
  # generate() prefill: mask cumsum on every axis, rope_deltas zeros; also rope_index on all-text.
  kwargs = dict(input_ids=_t(ids), attention_mask=_t(mask), mm_token_type_ids=_t(types))
  want = model._prepare_position_ids_for_generation(_t(ids), kwargs).numpy()
  got, deltas = mrope.text_positions(mask)
  np.testing.assert_array_equal(got, want[1:])
  np.testing.assert_array_equal(deltas, model.model.rope_deltas.numpy())
  got_ri, deltas_ri = mrope.rope_index(ids, types, None, None, mask, spatial_merge_size=MERGE)
  np.testing.assert_array_equal(got_ri, want[1:])
  np.testing.assert_array_equal(deltas_ri, deltas)
  # forward with position_ids=None and no grid: arange(T) + cache length, mask ignored.
  cap, hook = _capture_rotary(model)
  try:
    with torch.no_grad():
      model.model.rope_deltas = None
      out = model(input_ids=_t(ids), attention_mask=_t(mask), use_cache=True)
      nxt = out.logits[:, -1:].argmax(-1)
      model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
  finally:
    hook.remove()
  B, T = ids.shape
  np.testing.assert_array_equal(mrope.text_positions(batch=B, seq_len=T)[0], cap[0].numpy())
  np.testing.assert_array_equal(
    mrope.text_positions(batch=B, seq_len=1, past_len=T)[0], cap[1].numpy()
  )


# ---------------------------------------------------------------- decoding


def _seconds_kw(variant, vid):
  if variant == "qwen2_vl" or vid is None:
    return {}, None
  vals = [0.5, 1.0, 1.5][: len(vid)]
  return dict(second_per_grid_ts=torch.tensor(vals, dtype=torch.float32)), np.float32(vals)


def _our_index(model, variant, ids, types, img, vid, mask, seconds):
  return mrope.rope_index(
    ids, types, img, vid, mask, spatial_merge_size=MERGE, variant=variant,
    second_per_grid_ts=seconds, tokens_per_second=getattr(model.model.config.vision_config, "tokens_per_second", None),
  )  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_positions_match_hf_generate(hf, variant, seed):
  model = hf[variant]
  ids, types, mask, img, vid = _make("batch_left", seed)
  kw, seconds = _seconds_kw(variant, vid)
  cap, hook = _capture_language_model(model)
  try:
    with torch.no_grad():
      model.generate(
        input_ids=_t(ids), attention_mask=_t(mask), mm_token_type_ids=_t(types, torch.int32),
        image_grid_thw=_t(img), video_grid_thw=_t(vid), max_new_tokens=4, do_sample=False,
        pad_token_id=0, min_new_tokens=4, **kw,
      )  # fmt: skip
  finally:
    hook.remove()
  prompt, deltas = _our_index(model, variant, ids, types, img, vid, mask, seconds)
  assert len(cap) == 4 and cap[0].shape == (4, *ids.shape)
  np.testing.assert_array_equal(prompt, cap[0][1:].numpy())
  np.testing.assert_array_equal(deltas, model.model.rope_deltas.numpy())
  for step, got in enumerate(cap[1:]):
    np.testing.assert_array_equal(mrope.generate_positions(prompt, step=step), got[1:].numpy())
    np.testing.assert_array_equal(
      mrope.generate_positions(prompt, mask, step=step), got[1:].numpy()
    )
  # Row 1 ends in <video> <vision_end> whose t axis outruns the text: the forward's
  # cache + delta rule is one ahead there, and equal on row 0 (which ends in text).
  via_delta = mrope.decode_positions(deltas, mask.sum(1))
  via_last = mrope.generate_positions(prompt)
  np.testing.assert_array_equal(via_delta[:, 0], via_last[:, 0])
  assert (via_delta[:, 1] != via_last[:, 1]).all()
  # Right padding (not supported by HF generate): the last attended token gives the same ids.
  ids_r, types_r, mask_r, _, _ = _batch(
    [(ids[b][mask[b] == 1], types[b][mask[b] == 1], {"i": [], "v": []}) for b in range(2)],
    "right",
  )
  prompt_r, _ = _our_index(model, variant, ids_r, types_r, img, vid, mask_r, seconds)
  np.testing.assert_array_equal(
    mrope.generate_positions(prompt_r, mask_r, step=2), cap[3][1:].numpy()
  )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_positions_match_hf_forward(hf, variant, seed):
  model = hf[variant]
  ids, types, _, img, vid = _make("mixed", seed)
  ids, types = np.concatenate([ids, ids]), np.concatenate([types, types])  # B=2, no padding
  img, vid = np.concatenate([img, img]), np.concatenate([vid, vid])
  kw, seconds = _seconds_kw(variant, vid)
  cap, hook = _capture_language_model(model)
  try:
    with torch.no_grad():
      model.model.rope_deltas = None
      out = model(
        input_ids=_t(ids), mm_token_type_ids=_t(types, torch.int32), image_grid_thw=_t(img),
        video_grid_thw=_t(vid), use_cache=True, **kw,
      )  # fmt: skip
      past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
      for _ in range(2):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
  finally:
    hook.remove()
  prompt, deltas = _our_index(model, variant, ids, types, img, vid, None, seconds)
  np.testing.assert_array_equal(prompt, cap[0].numpy())
  T = ids.shape[1]
  for step, got in enumerate(cap[1:]):
    np.testing.assert_array_equal(mrope.decode_positions(deltas, T + step), got.numpy())
    np.testing.assert_array_equal(mrope.decode_positions(deltas, [T + step] * 2), got.numpy())
  np.testing.assert_array_equal(
    mrope.decode_positions(deltas, T, num_new=2), np.concatenate([c.numpy() for c in cap[1:]], -1)
  )


# ---------------------------------------------------------------- errors


def _err_inputs():
  rng = np.random.default_rng(0)
  segs = [("t", 2), ("i", [1, 2, 4]), ("t", 1), ("v", [2, 2, 2]), ("t", 1), ("i", [1, 2, 2])]
  return _batch([_row(rng, segs)])


def test_group_grid_count_mismatch(hf):
  ids, types, mask, img, vid = _err_inputs()
  kw = dict(spatial_merge_size=MERGE)
  with pytest.raises(ValueError, match="2 image token groups but 1 image_grid_thw"):
    mrope.rope_index(ids, types, img[:1], vid, **kw)
  with pytest.raises(ValueError, match="2 image token groups but 0 image_grid_thw"):
    mrope.rope_index(ids, types, None, vid, **kw)
  with pytest.raises(ValueError, match="1 video token groups but 2 video_grid_thw"):
    mrope.rope_index(ids, types, img, np.concatenate([vid, vid]), **kw)
  with pytest.raises(ValueError, match="2 image token groups but 3 image_grid_thw"):
    mrope.rope_index(ids, types, np.concatenate([img, img[:1]]), vid, **kw)
  # HF: a missing grid fails (StopIteration); a left-over grid is silently ignored.
  with pytest.raises(StopIteration):
    _hf_rope_index(hf["qwen2_vl"], ids, types, img[:1], vid, None)
  _hf_rope_index(hf["qwen2_vl"], ids, types, np.concatenate([img, img[:1]]), vid, None)


def test_invalid_inputs():
  ids, types, mask, img, vid = _err_inputs()
  kw = dict(spatial_merge_size=MERGE)
  with pytest.raises(ValueError, match=r"\(1, 15\) and \(1, 14\)"):
    mrope.rope_index(ids, types[:, :-1], img, vid, **kw)
  with pytest.raises(ValueError, match=r"attention_mask shape \(2, 15\)"):
    mrope.rope_index(ids, types, img, vid, np.ones((2, 15)), **kw)
  with pytest.raises(ValueError, match=r"image_grid_thw must have shape \[N, 3\], got \(3,\)"):
    mrope.rope_index(ids, types, img[0], vid, **kw)
  with pytest.raises(ValueError, match=r"has 2 tokens but grid \[1, 2, 6\] gives 3"):
    mrope.rope_index(ids, types, np.array([[1, 2, 6], [1, 2, 2]]), vid, **kw)
  with pytest.raises(ValueError, match="variant"):
    mrope.rope_index(ids, types, img, vid, variant="qwen4_vl", **kw)
  with pytest.raises(ValueError, match="tokens_per_second"):
    mrope.rope_index(ids, types, img, vid, variant="qwen2_5_vl", **kw)
  with pytest.raises(ValueError, match="second_per_grid_ts has 2 values for 1"):
    mrope.rope_index(
      ids, types, img, vid, variant="qwen2_5_vl", second_per_grid_ts=[1.0, 2.0],
      tokens_per_second=2, **kw,
    )  # fmt: skip
  bad = types.copy()
  bad[0, 0] = 3
  with pytest.raises(ValueError, match="mm_token_type_ids must be"):
    mrope.rope_index(ids, bad, img, vid, **kw)
  ids2, types2 = np.concatenate([ids, ids]), np.concatenate([types, types])
  mask2 = np.stack([np.ones(15), np.zeros(15)])
  with pytest.raises(ValueError, match="no attended token"):
    mrope.rope_index(ids2, types2, np.concatenate([img, img]), vid, mask2, **kw)
  with pytest.raises(ValueError, match=r"deltas must be \[B, 1\]"):
    mrope.decode_positions(np.zeros(3), 4)
  with pytest.raises(ValueError, match=r"position_ids must be \[3, B, T\]"):
    mrope.generate_positions(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="batch and seq_len"):
    mrope.text_positions()
