"""Mistral (``MistralForCausalLM``): a Llama decoder with its own config name, and a sliding
window that jmmkv does not apply (its prefill and decode attend to every kept token), so a
checkpoint whose window is shorter than its context is refused."""

from __future__ import annotations

from jmmkv.models.family import Family


class MistralFamily(Family):
  name = "Mistral"
  architectures = ("MistralForCausalLM",)

  def config_from_hf(self, hf_cfg: dict, architecture: str, eos_ids: tuple[int, ...]):
    window = hf_cfg.get("sliding_window")
    context = hf_cfg.get("max_position_embeddings", 4096)
    if window is not None and window < context:
      raise ValueError(
        f"sliding_window={window} below max_position_embeddings={context} is not supported "
        "(jmmkv attends to every token); Mistral v0.2 and later have no window"
      )
    return super().config_from_hf(hf_cfg, architecture, eos_ids)


FAMILY = MistralFamily()
