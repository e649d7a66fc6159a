"""Orbax checkpoints: HF dir -> `jmmkv convert` -> `jmmkv.load` gives the same model."""

import json

import jax
import numpy as np
import pytest
from mm_models import build_mm_model, llava_pixels, random_text

import jmmkv
from jmmkv import cli


def _tree_equal(a, b):
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias"])
def test_text_round_trip_through_the_cli(tiny_model, tmp_path, name):
  src = tiny_model(name, 1).path
  out = tmp_path / "ckpt"
  assert cli.main(["convert", str(src), str(out)]) == 0
  assert json.loads((out / "jmmkv.json").read_text())["format"] == 1
  assert not list(out.glob("*.safetensors"))  # params live in orbax, not copied
  hf, ours = jmmkv.load(src), jmmkv.load(out)
  assert ours.config == hf.config
  _tree_equal(ours.params, hf.params)
  ids = np.random.default_rng(1).integers(3, hf.text_config.vocab_size, (2, 11))
  mask = np.ones_like(ids)
  np.testing.assert_array_equal(
    ours.logits(input_ids=ids, attention_mask=mask), hf.logits(input_ids=ids, attention_mask=mask)
  )


def test_bfloat16_restore_and_convert(tiny_model, tmp_path):
  src = tiny_model("llama_gqa", 2).path
  f32 = tmp_path / "f32"
  jmmkv.save(jmmkv.load(src), f32)
  restored = jmmkv.load(f32, dtype="bfloat16")  # cast while reading
  _tree_equal(restored.params, jmmkv.load(src, dtype="bfloat16").params)
  assert cli.main(["convert", str(src), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
  leaves = jax.tree.leaves(jmmkv.load(tmp_path / "bf16", dtype="bfloat16").params)
  assert {x.dtype.name for x in leaves} == {"bfloat16"}


def test_llava_round_trip_keeps_config_files_and_logits(tmp_path):
  hf = build_mm_model("llava", 0)
  src = tmp_path / "hf"
  hf.save_pretrained(src)
  (src / "README.md").write_text("model card")  # every non-weight file travels with the params
  jmmkv.save(jmmkv.load(src), tmp_path / "ckpt")
  copied = {f.name for f in (tmp_path / "ckpt").iterdir()}
  assert {"config.json", "generation_config.json", "README.md"} <= copied
  a, b = jmmkv.load(src), jmmkv.load(tmp_path / "ckpt")
  assert a.config == b.config
  _tree_equal(a.params, b.params)
  rng = np.random.default_rng(0)
  pixels = llava_pixels(rng, 1)
  per_image = a.image_features(pixels)[0].shape[0]
  ids = np.array(
    [random_text(rng, 5) + [a.config.image_token_id] * per_image + random_text(rng, 4)]
  )
  kw = dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pixels)
  np.testing.assert_array_equal(a.logits(**kw), b.logits(**kw))


def test_errors(tiny_model, tmp_path, capsys):
  src = tiny_model("llama_gqa", 1).path
  with pytest.raises(ValueError, match="random models have no config files"):
    jmmkv.save(jmmkv.random_model(jmmkv.load(src).text_config), tmp_path / "x")
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "file").write_text("x")
  assert cli.main(["convert", str(src), str(busy)]) == 2
  assert "exists and is not empty" in capsys.readouterr().err
  assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
  assert "does not exist" in capsys.readouterr().err
