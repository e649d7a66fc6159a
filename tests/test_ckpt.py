"""Orbax checkpoints: HF dir -> `jmmkv convert` -> `jmmkv.load` gives the same model."""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from mm_models import build_mm_model, llava_pixels, random_text

import jmmkv
from jmmkv import cli
from cli_errors import cli_error


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


@pytest.mark.parametrize("target", ["file", "under_file", "busy"])
def test_convert_checks_the_output_before_loading(
  tiny_model, tmp_path, capsys, monkeypatch, target
):
  src = tiny_model("llama_gqa", 1).path
  capsys.readouterr()  # building the model may print progress
  (tmp_path / "file").write_text("x")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "f").write_text("x")
  out = {"file": "file", "under_file": "file/ckpt", "busy": "busy"}[target]

  def no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the output was checked")

  monkeypatch.setattr(jmmkv, "load", no_load)
  assert cli.main(["convert", str(src), str(tmp_path / out)]) == 2
  err = capsys.readouterr().err
  want = {"file": "exists and is not a dir", "under_file": "cannot create", "busy": "not empty"}[
    target
  ]
  assert err.startswith("jmmkv: error:") and want in err and len(err.strip().splitlines()) == 1
  with pytest.raises((FileExistsError, NotADirectoryError), match=want):
    jmmkv.save(jmmkv.models.model.load(src), tmp_path / out)  # save checks it the same way


def test_user_os_errors_are_one_line(monkeypatch, capsys):
  for error in (NotADirectoryError, IsADirectoryError, PermissionError):

    def fail(args, error=error):
      raise error(f"{error.__name__} raised")

    monkeypatch.setattr(cli, "_convert", fail)
    assert cli.main(["convert", "a", "b"]) == 2
    assert capsys.readouterr().err == f"jmmkv: error: {error.__name__} raised\n"


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_malformed_json_names_the_file(tiny_model, tmp_path, capsys, name):
  import shutil

  src = tmp_path / "hf"
  shutil.copytree(tiny_model("llama_gqa", 1).path, src)
  (src / name).write_text('{"architectures": ["LlamaForCausalLM"],')
  capsys.readouterr()
  with pytest.raises(ValueError, match=f"{src / name} is not valid JSON"):
    jmmkv.load(src)
  assert cli.main(["convert", str(src), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"jmmkv: error: {src / name} is not valid JSON")


def test_demo_and_eval_synthetic_take_a_jmmkv_checkpoint(tmp_path, capsys):
  from jmmkv.synthetic import MODEL_DIR, demo

  out = tmp_path / "ckpt"
  assert cli.main(["convert", str(MODEL_DIR), str(out)]) == 0
  _tree_equal(demo.load_bundled(out).params, jmmkv.load(MODEL_DIR).params)
  argv = ["demo", "--model", str(out), "--policies", "full", "--images", "2", "--dtype", "fp32"]
  assert cli.main(argv) == 0
  assert any(line.startswith("full ") for line in capsys.readouterr().out.splitlines())
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor a jmmkv checkpoint"):
    demo.load_bundled(tmp_path)


# ---------------------------------------------------------------- broken and unfinished checkpoints


@pytest.fixture(scope="module")
def saved(jmmkv_model, tmp_path_factory):
  """A jmmkv checkpoint of the tiny llama_gqa model (hidden 64, 2 layers, vocab 1000), shared:
  tests break copies of it (`broken`)."""
  return jmmkv.save(jmmkv_model("llama_gqa", 1), tmp_path_factory.mktemp("saved") / "ckpt")


@pytest.fixture
def broken(saved, tmp_path):
  import shutil

  return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def _generate_error(capsys, model_dir) -> str:
  return cli_error(capsys, ["generate", "--model", str(model_dir), "--prompt", "hi"])


def _edit_config(path, key, value):
  cfg = json.loads((path / "config.json").read_text())
  cfg[key] = value
  (path / "config.json").write_text(json.dumps(cfg))


_LAYER = "text/params/layers_{}/"
_EDITS = {  # config edit -> what the checkpoint's params say against it
  "hidden_size": (
    128,
    "param text/params/embedding has shape (1000, 64), the config implies (1000, 128)",
  ),
  "vocab_size": (
    999,
    "param text/params/embedding has shape (1000, 64), the config implies (999, 64)",
  ),
  "num_hidden_layers=3": (
    3,
    "the config implies params it lacks: "
    + ", ".join(
      _LAYER.format(2) + p
      for p in ("input_norm/scale", "post_norm/scale", "gate_proj/w", "up_proj/w", "down_proj/w")
    )
    + " and 4 more",
  ),
  "num_hidden_layers=1": (
    1,
    "params the config does not imply: "
    + ", ".join(
      _LAYER.format(1) + p
      for p in ("down_proj/w", "gate_proj/w", "input_norm/scale", "k_proj/w", "o_proj/w")
    )
    + " and 4 more",
  ),
}


@pytest.mark.parametrize("edit", list(_EDITS))
def test_edited_config_is_refused_at_load(broken, capsys, edit):
  value, problem = _EDITS[edit]
  _edit_config(broken, edit.split("=")[0], value)
  want = f"jmmkv checkpoint {broken} does not match its config.json: {problem}"
  with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
    jmmkv.load(broken)
  assert _generate_error(capsys, broken) == want


def _drop_params(path):
  import shutil

  shutil.rmtree(path / "params")


def _truncate(file):
  file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _largest_file(path):
  return max((f for f in path.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


_DAMAGE = {  # damage -> (what it does, the reason the error gives)
  "no_params": (_drop_params, re.escape("no params/ directory")),
  "truncated_metadata": (
    lambda path: _truncate(path / "params" / "_METADATA"),
    re.escape("params/ has no readable metadata"),
  ),
  "truncated_data": (lambda path: _truncate(_largest_file(path / "params")), ".+"),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_damaged_checkpoint_is_one_line(broken, capsys, damage):
  do, reason = _DAMAGE[damage]
  do(broken)
  want = (
    rf"^cannot read jmmkv checkpoint {re.escape(str(broken))}: {reason}; "
    r"it is incomplete or damaged, convert the model again$"
  )
  with pytest.raises(ValueError, match=want):
    jmmkv.load(broken)
  assert re.match(want, _generate_error(capsys, broken))


@pytest.mark.parametrize("left", ["params", "orbax_tmp"])
def test_unfinished_convert_is_reported_as_incomplete(broken, tmp_path, capsys, left):
  (broken / "jmmkv.json").unlink()
  if left == "orbax_tmp":  # orbax was still writing params/
    (broken / "params").rename(broken / "params.orbax-checkpoint-tmp-1733400000")
  want = (
    f"{broken} is an incomplete jmmkv checkpoint (params/ but no jmmkv.json: its convert did "
    "not finish); convert the model again"
  )
  with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
    jmmkv.load(broken)
  assert _generate_error(capsys, broken) == want
  assert cli_error(capsys, ["convert", str(broken), str(tmp_path / "again")]) == want


@pytest.mark.parametrize("target", ["absent", "empty_dir"])
def test_interrupted_save_leaves_nothing_and_can_be_rerun(
  jmmkv_model, tmp_path, monkeypatch, target
):
  import orbax.checkpoint as ocp

  model = jmmkv_model("llama_gqa", 1)
  out = tmp_path / "ckpt"
  if target == "empty_dir":
    out.mkdir()

  def interrupted(self, *args, **kwargs):
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(ocp.StandardCheckpointer, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
      jmmkv.save(model, out)
  left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
  assert left == ([] if target == "absent" else ["ckpt"])
  assert jmmkv.save(model, out) == out
  assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt"]
  _tree_equal(jmmkv.load(out).params, model.params)
