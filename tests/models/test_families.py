"""Model families as adapters (`jmmkv.models.family`): the registry, docs/adding_a_family.md's
example (Mistral) against transformers, and `Model` free of family branches."""

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import jmmkv
from hf_models import TEXT, hf_greedy_generate, hf_logits, pad_batch, random_ids, randomize_
from jmmkv.models import families, family, llava, qwen2_vl
from jmmkv.models.configs import DecoderConfig

ROOT = Path(__file__).resolve().parents[2]


def test_every_architecture_has_one_family():
  archs = [a for f in families.FAMILIES for a in f.architectures]
  assert len(archs) == len(set(archs)) and set(archs) == set(families.ARCHITECTURES)
  assert families.for_architecture("MistralForCausalLM").name == "Mistral"
  assert families.for_architecture("Qwen2_5_VLForConditionalGeneration") is qwen2_vl.FAMILY
  with pytest.raises(ValueError, match=r"unsupported architecture 'GPT2LMHeadModel' in x/c\.json"):
    families.for_architecture("GPT2LMHeadModel", "x/c.json")
  with pytest.raises(TypeError, match="no model family has a config of type dict"):
    families.for_config({})


def test_config_type_picks_the_run_time_family():
  text = DecoderConfig(8, 8, 8, 1, 1, 1, 8)
  assert type(families.for_config(text)) is family.Family
  assert families.for_config(llava.LlavaConfig.__new__(llava.LlavaConfig)) is llava.FAMILY


def test_model_names_no_family():
  """model.py imports no family module or config class and never tests the config's type."""
  source = (ROOT / "jmmkv" / "models" / "model.py").read_text()
  tree = ast.parse(source)
  imported = {
    a.name
    for n in ast.walk(tree)
    if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("jmmkv.models")
    for a in n.names
  }
  assert not imported & {"llava", "qwen2_vl", "mistral", "LlavaConfig", "QwenVLConfig"}
  assert not re.search(
    r"isinstance\(\s*(self\.)?(config|cfg)\b|is_llava|is_qwen|\.architecture ==", source
  )


def test_doc_shows_the_module_as_it_is():
  doc = (ROOT / "docs" / "adding_a_family.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
  assert blocks[0] == (ROOT / "jmmkv" / "models" / "mistral.py").read_text()
  assert blocks[1].strip() in (ROOT / "jmmkv" / "models" / "families.py").read_text()


def _mistral(tmp_path, seed: int, **kw):
  cfg = MistralConfig(**{**TEXT, "head_dim": 16, "sliding_window": None, **kw})
  torch.manual_seed(seed)
  hf = MistralForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
  randomize_(hf, seed)
  hf.eval().save_pretrained(tmp_path)
  return hf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mistral_logits_equal_transformers(tmp_path, seed):
  hf = _mistral(tmp_path, seed)
  model = jmmkv.load(tmp_path)
  assert model.config.architecture == "MistralForCausalLM"
  rng = np.random.default_rng(seed)
  ids, mask = pad_batch([random_ids(rng, 23), random_ids(rng, 9)], "left")
  want = hf_logits(hf, ids, mask)
  got = model.logits(ids, mask)
  m = mask.astype(bool)
  assert np.abs(got[m] - want[m]).max() <= 1e-4
  if seed == 0:  # the decoder's run-time path is Llama's (tested there); one generate suffices
    batch = model.prepare(input_ids=ids, attention_mask=mask)
    out = jmmkv.generate(model, batch, "snapkv", 0.5, max_new_tokens=3, eos_token_id=[])
    assert [len(t) for t in out.tokens] == [3, 3]


def test_mistral_window_refused(tmp_path):
  _mistral(tmp_path, 0, sliding_window=64)
  with pytest.raises(ValueError, match="sliding_window=64 below max_position_embeddings=512"):
    jmmkv.load(tmp_path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qwen3_logits_and_greedy_equal_transformers(tmp_path, seed):
  """Qwen3: q/k RMSNorm per head before RoPE, no q/k/v bias, an explicit head_dim."""
  from transformers import Qwen3Config, Qwen3ForCausalLM

  cfg = Qwen3Config(**{**TEXT, "head_dim": 24, "tie_word_embeddings": seed == 1})
  torch.manual_seed(seed)
  hf = Qwen3ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
  randomize_(hf, seed)
  hf.eval().save_pretrained(tmp_path)
  model = jmmkv.load(tmp_path)
  assert model.config.qk_norm and not model.config.qkv_bias and model.config.head_dim == 24
  _logits_and_greedy_equal(hf, model, seed)


def _gemma3_text(seed: int, **kw):
  from transformers import Gemma3TextConfig

  return Gemma3TextConfig(
    **{
      **TEXT,
      "num_hidden_layers": 4,
      "head_dim": 16,
      "query_pre_attn_scalar": 24,  # not head_dim: the score scale is its own
      "sliding_window": (5, 8, 11)[seed],  # prompts of 21 and 8 tokens, then 16 generated
      "layer_types": ["sliding_attention", "full_attention"] * 2,
      "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
      },
      "final_logit_softcapping": None if seed == 2 else 30.0,
      "tie_word_embeddings": seed == 1,
      "pad_token_id": 0,
      **kw,
    }
  )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gemma3_text_logits_and_greedy_equal_transformers(tmp_path, seed):
  """Gemma 3's (1 + w) and sandwich norms, q/k norms, gelu-tanh MLP, scaled embeddings, its own
  score scale, local layers with their RoPE and a sliding window shorter than the prompt (and
  than the generated tokens), and logit soft-capping."""
  from transformers import Gemma3ForCausalLM

  torch.manual_seed(seed)
  hf = Gemma3ForCausalLM._from_config(
    _gemma3_text(seed), attn_implementation="eager", dtype=torch.float32
  )
  randomize_(hf, seed)
  hf.eval().save_pretrained(tmp_path)
  model = jmmkv.load(tmp_path)
  assert model.config.local_layers == (0, 2) and model.config.local_rope.theta == 1e4
  assert model.config.sliding_window == (5, 8, 11)[seed]
  _logits_and_greedy_equal(hf, model, seed)


def test_gemma3_text_hub_config_spelling_and_refusals():
  """The hub's rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern read as
  transformers reads them; a window that is not a positive integer, and score soft-capping,
  refused."""
  from transformers import Gemma3TextConfig

  from jmmkv.models import gemma3

  hub = dict(
    TEXT,
    num_hidden_layers=6,
    head_dim=16,
    sliding_window=512,
    rope_theta=500000.0,
    rope_local_base_freq=20000.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
    sliding_window_pattern=3,
  )
  cfg = gemma3.config_from_hf(hub, "Gemma3ForCausalLM")
  hf = Gemma3TextConfig(**dict(hub))
  want_local = tuple(i for i, t in enumerate(hf.layer_types) if t == "sliding_attention")
  assert cfg.local_layers == want_local == (0, 1, 3, 4)
  full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
  assert (cfg.rope.theta, cfg.rope.rope_type, cfg.rope.factor) == (
    full["rope_theta"],
    full["rope_type"],
    full["factor"],
  )
  assert cfg.local_rope.theta == local["rope_theta"] == 20000.0
  assert cfg.sliding_window == 512 and cfg.window_layers == cfg.local_layers
  for bad in (0, 2.5):
    with pytest.raises(ValueError, match=f"sliding_window must be a positive integer, got {bad}"):
      gemma3.config_from_hf(dict(hub, sliding_window=bad), "Gemma3ForCausalLM")
  with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
    gemma3.config_from_hf(dict(hub, attn_logit_softcapping=50.0), "Gemma3ForCausalLM")


def _logits_and_greedy_equal(hf, model, seed: int):
  """Logits within 1e-4 and greedy 16 tokens equal to transformers', batch 2 left-padded."""
  rng = np.random.default_rng(seed)
  rows = [random_ids(rng, 21), random_ids(rng, 8)]
  ids, mask = pad_batch(rows, "left")
  want = hf_logits(hf, ids, mask)
  got = model.logits(ids, mask)
  m = mask.astype(bool)
  assert np.abs(got[m] - want[m]).max() <= 1e-4
  tokens, margins = hf_greedy_generate(hf, rows, 16)
  assert min(min(x) for x in margins) > 1e-4, f"seed={seed}: near tie in HF greedy"
  batch = model.prepare(input_ids=ids, attention_mask=mask)
  out = jmmkv.generate(model, batch, max_new_tokens=16, eos_token_id=[])
  assert [[int(t) for t in r] for r in out.tokens] == tokens
