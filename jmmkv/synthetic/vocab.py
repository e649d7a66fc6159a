"""The bundled model's tokenizer (word level, built with `tokenizers`) and its LLaVA processor.

Ids: ``<pad>`` 0, ``<s>`` 1 (prepended to every prompt), ``</s>`` 2 (ends every answer),
``<unk>`` 3, ``<image>`` 4 (the LLaVA image token), then the task words in a fixed order.
`encode` is the same mapping in plain Python, for fast training-data encoding; the tests check
that it agrees with the HF tokenizer.
"""

from __future__ import annotations

import numpy as np

from jmmkv.synthetic import images, tasks

PAD, BOS, EOS, UNK, IMAGE_ID = 0, 1, 2, 3, 4
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", tasks.IMAGE)
IMAGE_SIZE, PATCH_SIZE = images.SIZE, 8
# CLIP's normalisation (the image processor's defaults).
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


GROUPS = (  # the words by kind, in id order after the specials
  tasks.QUESTION_WORDS,
  tasks.COLOURS,
  tasks.SHAPES,
  tuple(str(d) for d in range(10)),
  tasks.PASSKEYS,
  tasks.FILLER,
)


def words() -> list[str]:
  """Every token, in id order."""
  out = list(SPECIALS)
  for group in GROUPS:
    out += [w for w in group if w not in out]
  return out


VOCAB = {w: i for i, w in enumerate(words())}


def encode(text: str, image_tokens: int = tasks.IMAGE_TOKENS, bos: bool = True) -> list[int]:
  """Token ids of ``text`` with each ``<image>`` expanded to ``image_tokens`` image ids."""
  ids = [BOS] if bos else []
  for w in text.split():
    if w == tasks.IMAGE:
      ids += [IMAGE_ID] * image_tokens
    else:
      ids.append(VOCAB.get(w, UNK))
  return ids


def pixels(images_: list) -> np.ndarray:
  """``[N, 3, 32, 32]`` float32 pixel values, as the processor computes them."""
  x = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images_]) / 255.0
  return ((x - IMAGE_MEAN) / IMAGE_STD).transpose(0, 3, 1, 2).astype(np.float32)


def build_tokenizer():
  """A `transformers.PreTrainedTokenizerFast` over `words` (whitespace split, BOS prepended)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
  )
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<s>",
    eos_token="</s>",
    unk_token="<unk>",
    pad_token="<pad>",
    extra_special_tokens={"image_token": tasks.IMAGE},
    padding_side="left",
  )


def build_processor(tokenizer=None):
  """The `LlavaProcessor` (PIL CLIP image processor, 32 px, CLIP normalisation)."""
  from transformers import LlavaProcessor
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  image_processor = CLIPImageProcessorPil(
    size={"shortest_edge": IMAGE_SIZE},
    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    image_mean=IMAGE_MEAN.tolist(),
    image_std=IMAGE_STD.tolist(),
  )
  return LlavaProcessor(
    image_processor=image_processor,
    tokenizer=tokenizer or build_tokenizer(),
    patch_size=PATCH_SIZE,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,
    image_token=tasks.IMAGE,
  )
