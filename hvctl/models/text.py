"""Prompt encoding the HunyuanVideo way.

The LLM reads the prompt inside a chat template; the hidden states of layer -(skip+1) after the
template's prefix are the per-token text features, with their attention mask. CLIP's pooled
output is the global text vector that joins the timestep embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from hvctl.models.templates import PROMPT_TEMPLATES, crop_start


@dataclass
class TextConditions:
    llm_states: torch.Tensor  # (B, text_len, D_llm)
    llm_mask: torch.Tensor  # (B, text_len), 1 for real tokens
    pooled: torch.Tensor  # (B, D_clip)

    def to(self, *args, **kwargs) -> "TextConditions":
        return TextConditions(*(getattr(self, f.name).to(*args, **kwargs) for f in fields(self)))

    @staticmethod
    def cat(items: list["TextConditions"]) -> "TextConditions":
        return TextConditions(*(torch.cat([getattr(c, f.name) for c in items]) for f in fields(TextConditions)))


class PromptEncoder:
    """Turns prompts into TextConditions with the model's two text encoders."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, *, template: str = "video",
                 text_len: int = 256, skip_layers: int = 2, clip_len: int = 77):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.template = PROMPT_TEMPLATES[template]
        self.crop_start = crop_start(tokenizer, self.template)
        self.text_len, self.skip_layers, self.clip_len = text_len, skip_layers, clip_len

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> TextConditions:
        device = self.text_encoder.device
        llm_inputs = self.tokenizer(
            [self.template.template.format(p) for p in prompts], max_length=self.crop_start + self.text_len,
            padding="max_length", truncation=True, return_tensors="pt",
        ).to(device)
        hidden = self.text_encoder(
            input_ids=llm_inputs.input_ids, attention_mask=llm_inputs.attention_mask, output_hidden_states=True
        ).hidden_states[-(self.skip_layers + 1)]
        clip_ids = self.tokenizer_2(
            prompts, max_length=self.clip_len, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids.to(self.text_encoder_2.device)
        pooled = self.text_encoder_2(clip_ids).pooler_output
        return TextConditions(
            llm_states=hidden[:, self.crop_start:],
            llm_mask=llm_inputs.attention_mask[:, self.crop_start:],
            pooled=pooled,
        )
