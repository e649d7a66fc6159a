"""`jmmkv generate`: one prompt with two images on a tiny LLaVA, and one clear line per error."""

import numpy as np
import pytest
from mm_models import build_mm_model
from PIL import Image
from test_mm_prepare import _save_processor

import jmmkv
from jmmkv import cli


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llava_cli")
  build_mm_model("llava", 3).save_pretrained(path)
  _save_processor("llava", path)
  rng = np.random.default_rng(0)
  for name, size in (("a.png", (40, 50)), ("b.jpg", (32, 32))):
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path / name)
  return path


def _run(args, capsys):
  code = cli.main(args)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_generate_answers_a_two_image_prompt(llava_dir, capsys):
  a, b = str(llava_dir / "a.png"), str(llava_dir / "b.jpg")
  args = ["generate", "--model", str(llava_dir), "--image", a, "--image", b]
  args += ["--prompt", "w3 <image> w17 <image> w9", "--policy", "snapkv", "--budget", "0.5"]
  code, out, err = _run(args + ["--max-new-tokens", "5", "--decode-window", "2"], capsys)
  assert code == 0
  model = jmmkv.load(llava_dir)
  batch = model.prepare(
    prompts=["w3 <image> w17 <image> w9"],
    images=[[Image.open(a).convert("RGB"), Image.open(b).convert("RGB")]],
  )
  snapkv, budget = jmmkv.policies.get("snapkv"), jmmkv.Budget(ratio=0.5)
  want = jmmkv.generate(model, batch, snapkv, budget, max_new_tokens=5, decode_window=2)
  assert out.strip() == want.texts[0].strip()
  assert "[snapkv 0.5]" in err and "MiB allocated" in err and "ms/token" in err
  # Images without markers go first, as "<image>" each.
  code, out2, _ = _run(
    ["generate", "--model", str(llava_dir), "--image", a, "--image", b, "--prompt", "w9"]
    + ["--max-new-tokens", "3"],
    capsys,
  )
  assert code == 0 and out2.strip()


def test_repeated_prompts_are_turns_of_one_conversation(llava_dir, capsys):
  a = str(llava_dir / "a.png")
  args = ["generate", "--model", str(llava_dir), "--image", a, "--prompt", "w3 <image> w17"]
  args += ["--prompt", "w9 w4", "--policy", "snapkv", "--budget", "0.5", "--max-new-tokens", "3"]
  code, out, err = _run(args, capsys)
  assert code == 0
  chat = jmmkv.Conversation(jmmkv.load(llava_dir), "snapkv", 0.5, max_new_tokens=3)
  first = chat.ask(["w3 <image> w17"], images=[[Image.open(a).convert("RGB")]])
  second = chat.ask(["w9 w4"])
  assert out == f"{first.texts[0]}\n{second.texts[0]}\n"
  assert "[snapkv 0.5, turn 1]" in err and "[snapkv 0.5, turn 2]" in err


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--policy", "nope"], "unknown policy"),
    (["--policy", "snapkv", "--budget", "1.5"], "ratio"),
    (["--budget", "0"], "ratio"),  # full ignores the budget, but a bad one is still an error
    (["--image", "MISSING.png"], "does not exist"),
    (["--image", "NOTANIMAGE"], "cannot read image"),
    (["--video", "MISSING.gif"], "does not exist"),
    (["--decode-window", "0"], "--decode-window must be >= 1"),
  ],
)
def test_generate_errors_are_one_line(llava_dir, tmp_path, capsys, extra, message):
  bad = tmp_path / "bad.png"
  bad.write_text("not an image")
  extra = [
    str(tmp_path / x) if x.startswith("MISSING") else str(bad) if x == "NOTANIMAGE" else x
    for x in extra
  ]
  code, _, err = _run(["generate", "--model", str(llava_dir), "--prompt", "w3"] + extra, capsys)
  assert code == 2
  assert err.startswith("jmmkv: error:") and message in err and len(err.strip().splitlines()) == 1


def test_generate_missing_model(tmp_path, capsys):
  code, _, err = _run(["generate", "--model", str(tmp_path / "none"), "--prompt", "hi"], capsys)
  assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def _one_error_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jmmkv: error: "), err
  return lines[0]


def test_a_compressing_policy_needs_a_budget(llava_dir, capsys):
  code, _, err = _run(
    ["generate", "--model", str(llava_dir), "--prompt", "w3", "--policy", "snapkv"], capsys
  )
  assert code == 2
  assert _one_error_line(err) == (
    "jmmkv: error: --budget is needed for policy snapkv (a kept fraction in (0, 1], e.g. 0.2)"
  )
  # full needs none
  code, out, _ = _run(
    ["generate", "--model", str(llava_dir), "--prompt", "w3", "--max-new-tokens", "2"], capsys
  )
  assert code == 0 and out.strip()


def test_policy_specs_take_several_settings_and_list_valid_ones(llava_dir, capsys):
  base = ["generate", "--model", str(llava_dir), "--prompt", "w3 w5 w7", "--budget", "0.5"]
  code, _, err = _run(
    base + ["--policy", "snapkv:window=2,kernel=3", "--max-new-tokens", "2"], capsys
  )
  assert code == 0 and "[snapkv:window=2,kernel=3 0.5]" in err
  code, _, err = _run(base + ["--policy", "snapkv:window=2,kernal=3"], capsys)
  assert code == 2 and _one_error_line(err) == (
    "jmmkv: error: policy 'snapkv' has no setting 'kernal'; its settings: window, kernel, "
    "pooling, gqa"
  )


def test_an_image_over_the_decompression_bomb_limit_is_one_line(
  llava_dir, tmp_path, capsys, monkeypatch
):
  """PIL refuses images over twice ``MAX_IMAGE_PIXELS`` (178956970 by default: a 15000 x 15000
  image); the limit is lowered here so that a small image passes it."""
  big = tmp_path / "big.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 70, 3), np.uint8)).save(big)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  code, _, err = _run(
    ["generate", "--model", str(llava_dir), "--prompt", "w3", "--image", str(big)], capsys
  )
  assert code == 2
  line = _one_error_line(err)
  assert line.startswith(f"jmmkv: error: image {big} is too large to read safely (")
  assert "4200 pixels" in line and line.endswith("resize it first")


def test_generating_past_max_positions_warns_in_one_line(llava_dir, capsys):
  """The tiny LLaVA has 512 positions: a 5-token prompt plus 600 new tokens pass them."""
  args = ["generate", "--model", str(llava_dir), "--prompt", "w3"]
  code, _, err = _run(args + ["--max-new-tokens", "600"], capsys)
  assert code == 0
  warning = [ln for ln in err.splitlines() if ln.startswith("jmmkv: warning: ")]
  assert len(warning) == 1 and "max_new_tokens=600 reach position" in warning[0]
  assert "max_position_embeddings=512" in warning[0]
  code, _, err = _run(args + ["--max-new-tokens", "3"], capsys)
  assert code == 0 and "warning" not in err
