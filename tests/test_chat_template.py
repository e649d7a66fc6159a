"""Chat templates that take a message's content as a string or as typed parts both keep the
prompt; one that drops it is an error, never a silently empty prompt."""

from __future__ import annotations

import pytest
from test_mm_prepare import _tokenizer

from jmmkv.models.processing import _apply_chat_template

STRING = "{% for m in messages %}USER: {{ m['content'] }}{% endfor %} ASSISTANT:"
PARTS = (  # llava-hf style: iterates the content's parts and prints the text ones
  "{% for m in messages %}USER: {% for p in m['content'] %}{% if p['type'] == 'text' %}"
  "{{ p['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"
)
DROPS = "{% for m in messages %}USER:{% endfor %} ASSISTANT:"


@pytest.mark.parametrize("template", [STRING, PARTS])
def test_both_content_forms_keep_the_prompt(template):
  tok = _tokenizer({999: "<image>"})
  tok.chat_template = template
  prompt = "w3 <image> w17 w9"
  assert _apply_chat_template(tok, prompt) == f"USER: {prompt} ASSISTANT:"


def test_a_template_that_drops_the_prompt_is_an_error():
  tok = _tokenizer({999: "<image>"})
  tok.chat_template = DROPS
  with pytest.raises(ValueError, match="drops the prompt text"):
    _apply_chat_template(tok, "w3 w4")
