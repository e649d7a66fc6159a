"""model.prepare with a tokenizer and chat template from the checkpoint dir; jmmkv.compress."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import jmmkv
from hf_models import build_model

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":"] + [f"w{i}" for i in range(200)]
TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
  "{% if add_generation_prompt %}assistant :{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama_tok")
  build_model("llama_gqa", seed=4).save_pretrained(d)
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
  )
  fast.chat_template = TEMPLATE
  fast.save_pretrained(d)
  return d


def test_prepare_uses_the_chat_template_and_texts_decode(model_dir):
  model = jmmkv.load(model_dir)
  ref = AutoTokenizer.from_pretrained(model_dir)
  prompts = ["w1 w2 w3", "w7 w150 w9 w10 w11 w12"]
  batch = model.prepare(prompts=prompts)
  for p, row in zip(prompts, batch.input_ids):
    want = ref.apply_chat_template(
      [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert row.tolist() == list(want)
    assert row.tolist()[:3] == [1, WORDS.index("user"), WORDS.index(":")]
  plain = model.prepare(prompts=prompts, chat_template=False)
  assert plain.input_ids[0].tolist() == ref("w1 w2 w3")["input_ids"]
  out = jmmkv.generate(model, batch, max_new_tokens=6, eos_token_id=[])
  assert out.texts == [ref.decode(t, skip_special_tokens=True) for t in out.tokens]


def test_compress_returns_the_prompt_cache(model_dir):
  model = jmmkv.load(model_dir)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 1000, 19), rng.integers(3, 1000, 6)]
  cache = jmmkv.compress(model, model.prepare(input_ids=prompts), jmmkv.policies.get("full"))
  cfg = model.config
  assert cache.k.shape == (cfg.num_layers, 2, cfg.num_kv_heads, 32, cfg.head_dim)
  assert cache.append_k.shape[3] == 0
  np.testing.assert_array_equal(np.asarray(cache.lengths), [19, 6])
  pos = np.asarray(cache.positions)
  np.testing.assert_array_equal(
    pos[:, 0], np.broadcast_to(np.r_[np.arange(19), -np.ones(13)], pos[:, 0].shape)
  )
  np.testing.assert_array_equal(np.asarray(cache.modality)[:, 1, :, :6], 1)
  np.testing.assert_array_equal(np.asarray(cache.modality)[:, 1, :, 6:], 0)


def test_cached_kv_equals_transformers_past_key_values(model_dir):
  import torch

  hf = build_model("llama_gqa", seed=4)
  model = jmmkv.load(model_dir)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, 1000, 21), rng.integers(3, 1000, 8)]
  cache = jmmkv.compress(model, model.prepare(input_ids=prompts))
  for b, p in enumerate(prompts):
    with torch.no_grad():
      past = hf(input_ids=torch.tensor(p[None]), use_cache=True).past_key_values
    for layer in range(model.config.num_layers):
      k_ref = past.layers[layer].keys[0].numpy()  # [K, T, H], after RoPE
      v_ref = past.layers[layer].values[0].numpy()
      np.testing.assert_allclose(
        np.asarray(cache.k[layer, b, :, : len(p)]), k_ref, atol=1e-5, rtol=0
      )
      np.testing.assert_allclose(
        np.asarray(cache.v[layer, b, :, : len(p)]), v_ref, atol=1e-5, rtol=0
      )


def test_generation_config_eos_ids_are_used(tmp_path):
  import json

  hf = build_model("qwen2_bias", seed=2)
  hf.save_pretrained(tmp_path)
  gen = json.loads((tmp_path / "generation_config.json").read_text())
  gen["eos_token_id"] = [2, 777]
  (tmp_path / "generation_config.json").write_text(json.dumps(gen))
  model = jmmkv.load(tmp_path)
  assert model.config.eos_token_ids == (2, 777)
  assert "params" not in repr(model) and len(repr(model)) < 2000


@pytest.mark.parametrize("dtype", ["float16", "int8", "fp64"])
def test_unsupported_dtype(model_dir, dtype):
  with pytest.raises(ValueError, match="unsupported dtype"):
    jmmkv.load(model_dir, dtype=dtype)


def test_an_empty_list_of_prompts_is_one_clear_error():
  import jmmkv
  from jmmkv.models.configs import tiny_decoder

  model = jmmkv.random_model(tiny_decoder(num_layers=1, hidden_size=32, intermediate_size=64))
  with pytest.raises(ValueError, match="^prompts is empty: give at least one prompt$"):
    model.prepare(prompts=[])
  with pytest.raises(ValueError, match="^a batch needs at least one prompt$"):
    model.prepare(input_ids=[])
