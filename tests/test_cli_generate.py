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
  code, out, err = _run(args + ["--max-new-tokens", "5"], capsys)
  assert code == 0
  model = jmmkv.load(llava_dir)
  batch = model.prepare(
    prompts=["w3 <image> w17 <image> w9"],
    images=[[Image.open(a).convert("RGB"), Image.open(b).convert("RGB")]],
  )
  want = jmmkv.generate(
    model, batch, jmmkv.policies.get("snapkv"), jmmkv.Budget(ratio=0.5), max_new_tokens=5
  )
  assert out.strip() == want.texts[0].strip()
  assert "[snapkv 0.5]" in err and "MiB allocated" in err and "ms/token" in err
  # Images without markers go first, as "<image>" each.
  code, out2, _ = _run(
    ["generate", "--model", str(llava_dir), "--image", a, "--image", b, "--prompt", "w9"]
    + ["--max-new-tokens", "3"],
    capsys,
  )
  assert code == 0 and out2.strip()


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--policy", "nope"], "unknown policy"),
    (["--policy", "snapkv", "--budget", "1.5"], "ratio"),
    (["--budget", "0"], "ratio"),  # full ignores the budget, but a bad one is still an error
    (["--image", "MISSING.png"], "does not exist"),
    (["--image", "NOTANIMAGE"], "cannot read image"),
    (["--video", "MISSING.gif"], "does not exist"),
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
