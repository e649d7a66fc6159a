"""A tiny random LLaVA-1.5 checkpoint, written without torch: for notebooks' smoke modes and demos.

`write_tiny_llava` writes the files of an HF ``llava-hf/llava-1.5-7b-hf`` directory (same
architecture, key names and processor classes, tiny sizes): ``config.json``,
``generation_config.json``, ``model.safetensors`` (numpy weights, hub key names), a word-level
``tokenizer.json`` with ``<image>`` and ``<pad>``, and the processor files with the PIL (no
torchvision) CLIP image processor. Each image becomes 16 ``<image>`` tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SIZE, PATCH = 32, 8  # CLIP input pixels and patch: (32 / 8)^2 = 16 tokens per image
VOCAB = 256
VISION = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  image_size=IMAGE_SIZE,
  patch_size=PATCH,
  projection_dim=32,
)
TEXT = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=1024,
  rms_norm_eps=1e-5,
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=VOCAB - 1,
  tie_word_embeddings=False,
)
CHAT_TEMPLATE = (  # LLaVA-1.5's "USER: ... ASSISTANT:" format, for string message contents
  "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] + ' ' }}"
  "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_WORDS = (
  "user assistant system describe the a an this that these image images picture pictures photo "
  "what which who where when how why is are was be do does in on of and or to with from between "
  "first second third last left right top bottom front back same different difference changed "
  "compare find show tell count many much more less one two three four five color colors red "
  "green blue yellow black white orange brown gray pink cat cats dog dogs bird car bus train "
  "person people man woman child tree trees house room table chair bed sky water road street "
  "city sign book food plate ball grass snow light dark small large big little old new near far "
  "inside outside up down there here it they he she we you i yes no not all some each both only "
  "very answer question scene object objects animal animals background foreground sitting "
  "standing looking holding walking"
).split()
_PUNCT = list(".,:;?!'\"()-/") + [str(d) for d in range(10)]


def _vocab() -> dict[str, int]:
  """``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, words, pseudo-syllables up to VOCAB - 2, then
  ``<image>`` VOCAB - 2 and ``<pad>`` VOCAB - 1 (as llava-hf: image and pad after the text)."""
  words = ["<unk>", "<s>", "</s>"] + _WORDS + _PUNCT
  syllables = (c + v + e for e in ("", "n", "r", "s") for c in "bdfgklmnprstvz" for v in "aeiou")
  words += [s for s in syllables if s not in words][: VOCAB - 2 - len(words)]
  assert len(words) == VOCAB - 2 and len(set(words)) == len(words)
  return {w: i for i, w in enumerate(words + ["<image>", "<pad>"])}


def _tokenizer():
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel(_vocab(), unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
  tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces, no space before punctuation
  specials = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<s>",
    eos_token="</s>",
    unk_token="<unk>",
    pad_token="<pad>",
    add_bos_token=True,
  )


def _param_shapes() -> dict[str, tuple[int, ...]]:
  """HF key -> shape, with the llava-hf hub key names."""
  v, t = VISION, TEXT
  e, fv = v["hidden_size"], v["intermediate_size"]
  d, f, vocab = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
  kv = d // t["num_attention_heads"] * t["num_key_value_heads"]
  vt = "vision_tower.vision_model."
  shapes = {
    vt + "embeddings.class_embedding": (e,),
    vt + "embeddings.patch_embedding.weight": (e, 3, PATCH, PATCH),
    vt + "embeddings.position_embedding.weight": ((IMAGE_SIZE // PATCH) ** 2 + 1, e),
    vt + "pre_layrnorm.weight": (e,),
    vt + "pre_layrnorm.bias": (e,),
    vt + "post_layernorm.weight": (e,),
    vt + "post_layernorm.bias": (e,),
    "multi_modal_projector.linear_1.weight": (d, e),
    "multi_modal_projector.linear_1.bias": (d,),
    "multi_modal_projector.linear_2.weight": (d, d),
    "multi_modal_projector.linear_2.bias": (d,),
    "language_model.model.embed_tokens.weight": (vocab, d),
    "language_model.model.norm.weight": (d,),
    "language_model.lm_head.weight": (vocab, d),
  }
  for i in range(v["num_hidden_layers"]):
    p = f"{vt}encoder.layers.{i}."
    for name, shape in (
      ("self_attn.q_proj", (e, e)),
      ("self_attn.k_proj", (e, e)),
      ("self_attn.v_proj", (e, e)),
      ("self_attn.out_proj", (e, e)),
      ("mlp.fc1", (fv, e)),
      ("mlp.fc2", (e, fv)),
      ("layer_norm1", (e,)),
      ("layer_norm2", (e,)),
    ):
      shapes[p + name + ".weight"] = shape
      shapes[p + name + ".bias"] = shape[:1]
  for i in range(t["num_hidden_layers"]):
    p = f"language_model.model.layers.{i}."
    shapes |= {
      p + "self_attn.q_proj.weight": (d, d),
      p + "self_attn.k_proj.weight": (kv, d),
      p + "self_attn.v_proj.weight": (kv, d),
      p + "self_attn.o_proj.weight": (d, d),
      p + "mlp.gate_proj.weight": (f, d),
      p + "mlp.up_proj.weight": (f, d),
      p + "mlp.down_proj.weight": (d, f),
      p + "input_layernorm.weight": (d,),
      p + "post_attention_layernorm.weight": (d,),
    }
  return shapes


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """Random, non-degenerate float32 weights: norm scales 1 + N(0, 0.1^2), biases N(0, 0.2^2),
  embeddings N(0, 0.3^2), the CLIP class embedding N(0, 1), matrices N(0, 1 / fan_in)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in sorted(_param_shapes().items()):
    x = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith(".bias"):
      x *= 0.2
    elif "norm" in name:
      x = 1.0 + 0.1 * x
    elif "embed_tokens" in name or "position_embedding" in name:
      x *= 0.3
    elif len(shape) > 1:
      x /= np.sqrt(np.prod(shape[1:]))
    out[name] = np.ascontiguousarray(x, np.float32)
  return out


def write_tiny_llava(path: str | Path, seed: int = 0) -> Path:
  """Writes a tiny random LLaVA-1.5 HF directory at ``path`` (created if needed); returns it.

  `jmmkv.load` and transformers' ``LlavaForConditionalGeneration.from_pretrained`` read it;
  ``seed`` picks the weights. Needs numpy, safetensors, tokenizers and transformers, not torch.
  """
  from safetensors.numpy import save_file
  from transformers import CLIPImageProcessorPil, GenerationConfig, LlavaConfig, LlavaProcessor

  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  cfg = LlavaConfig(
    vision_config=dict(VISION, model_type="clip_vision_model"),
    text_config=dict(TEXT, model_type="llama"),
    image_token_index=VOCAB - 2,
    image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    pad_token_id=VOCAB - 1,
    tie_word_embeddings=False,
  )
  cfg.architectures = ["LlavaForConditionalGeneration"]
  cfg.save_pretrained(path)
  gen = dict(bos_token_id=1, eos_token_id=2, pad_token_id=VOCAB - 1)
  GenerationConfig(**gen).save_pretrained(path)
  save_file(random_weights(seed), str(path / "model.safetensors"), metadata={"format": "pt"})
  image_processor = CLIPImageProcessorPil(
    size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
  )
  tokenizer = _tokenizer()
  tokenizer.chat_template = CHAT_TEMPLATE
  processor = LlavaProcessor(
    image_processor=image_processor,
    tokenizer=tokenizer,
    patch_size=PATCH,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,
    chat_template=CHAT_TEMPLATE,
  )
  processor.save_pretrained(path)
  return path
