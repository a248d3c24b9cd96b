"""Prompt encoding the HunyuanVideo way.

The LLM reads the prompt inside a chat template; the hidden states of layer -(skip+1) after the
template's prefix are the per-token text features, with their attention mask. CLIP's pooled
output is the global text vector that joins the timestep embedding.

The official HunyuanVideo-I2V's LLM is a LLaVA that reads the image too (ImagePromptEncoder).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from hvctl.errors import HvctlError
from hvctl.models.loading import input_device
from hvctl.models.templates import I2V_TEMPLATE, PROMPT_TEMPLATES, PromptTemplate, crop_start

# diffusers' HunyuanVideoImageToVideoPipeline keeps every 2nd (latent_concat) or 4th
# (token_replace) of the image's hidden states.
IMAGE_TOKEN_STRIDE = {"latent_concat": 2, "token_replace": 4}


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

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, *, template: str | PromptTemplate = "video",
                 text_len: int = 256, skip_layers: int = 2, clip_len: int = 77):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.template = PROMPT_TEMPLATES[template] if isinstance(template, str) else template
        self.crop_start = crop_start(tokenizer, self.template)
        self.text_len, self.skip_layers, self.clip_len = text_len, skip_layers, clip_len

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: list | None = None) -> TextConditions:
        """images: only encoders that read them (ImagePromptEncoder) use them."""
        llm_inputs = self.llm_inputs(prompts)
        hidden = self.text_encoder(
            input_ids=llm_inputs.input_ids, attention_mask=llm_inputs.attention_mask, output_hidden_states=True
        ).hidden_states[-(self.skip_layers + 1)]
        return TextConditions(
            llm_states=hidden[:, self.crop_start:],
            llm_mask=llm_inputs.attention_mask[:, self.crop_start:],
            pooled=self.pooled(prompts),
        )

    def prompt_tokens(self, prompt: str) -> int:
        """The prompt's length in LLM tokens after the template's prefix, before truncation to text_len."""
        return len(self.tokenizer(self.template.template.format(prompt))["input_ids"]) - self.crop_start

    def llm_inputs(self, prompts: list[str]):
        return self.tokenizer(
            [self.template.template.format(p) for p in prompts], max_length=self.crop_start + self.text_len,
            padding="max_length", truncation=True, return_tensors="pt",
        ).to(input_device(self.text_encoder))

    def pooled(self, prompts: list[str]) -> torch.Tensor:
        clip_ids = self.tokenizer_2(
            prompts, max_length=self.clip_len, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids.to(input_device(self.text_encoder_2))
        return self.text_encoder_2(clip_ids).pooler_output


class ImagePromptEncoder(PromptEncoder):
    """The official HunyuanVideo-I2V's encoding, as diffusers' HunyuanVideoImageToVideoPipeline.encode_prompt
    computes it: a LLaVA (`text_encoder`, with `image_processor`) reads the prompt inside I2V_TEMPLATE,
    whose one `<image>` token stands for the image's vision tokens. The DiT gets every `stride`-th
    of the image tokens' hidden states, then the prompt's: without the template's prefix and the
    assistant's header (`<|eot_id|><|start_header_id|>assistant<|end_header_id|>`, 4 tokens for
    Llama-3, where diffusers hard-codes 4), the padding kept with mask 0. The positions diffusers
    hard-codes for Llama-3 and a 336-px CLIP (crop_start 103, image tokens 5 to 581) are measured.
    """

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, image_processor, *, condition: str,
                 text_len: int = 256, skip_layers: int = 2, clip_len: int = 77):
        super().__init__(tokenizer, text_encoder, tokenizer_2, text_encoder_2, template=I2V_TEMPLATE,
                         text_len=text_len, skip_layers=skip_layers, clip_len=clip_len)
        self.image_processor = image_processor
        config = text_encoder.config
        self.image_token = config.image_token_index
        prefix = tokenizer(self.template.prefix)["input_ids"]
        if prefix.count(self.image_token) != 1:
            raise HvctlError(f"the tokenizer does not make '<image>' the LLaVA's image token {self.image_token}")
        self.image_start = prefix.index(self.image_token)
        vision = config.vision_config
        self.image_len = (vision.image_size // vision.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
        self.stride = IMAGE_TOKEN_STRIDE.get(condition, 1)
        pad = getattr(config, "pad_token_id", None)  # diffusers expands the ids with the LLaVA's pad id
        self.pad_id = tokenizer.pad_token_id if pad is None else pad
        self.end_header = tokenizer.convert_tokens_to_ids("<|end_header_id|>")
        self.assistant_header = len(tokenizer("<|eot_id|><|start_header_id|>assistant<|end_header_id|>",
                                              add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: list | None = None) -> TextConditions:
        """images: [H, W, 3] uint8, one per prompt."""
        import numpy as np
        from PIL import Image

        if images is None or len(images) != len(prompts):
            raise ValueError("the LLaVA text encoder needs one image per prompt")
        inputs = self.llm_inputs(prompts)
        ids, mask = inputs.input_ids, inputs.attention_mask
        if ((ids == self.image_token).sum(1) != 1).any():
            raise HvctlError("a prompt may not contain the image token '<image>'")
        device = ids.device
        # The one <image> token becomes image_len of them; the LLaVA puts the vision features there.
        image_ids = torch.full((len(prompts), self.image_len), self.image_token, dtype=ids.dtype, device=device)
        expanded = torch.cat([ids[:, :self.image_start], image_ids, ids[:, self.image_start + 1:]], dim=1)
        expanded_mask = (expanded != self.pad_id).to(mask.dtype)
        positions = (expanded_mask.cumsum(-1) - 1).masked_fill_(expanded_mask == 0, 1)
        pixels = self.image_processor([Image.fromarray(np.asarray(i)) for i in images], return_tensors="pt").pixel_values
        hidden = self.text_encoder(
            input_ids=expanded, attention_mask=expanded_mask, position_ids=positions, pixel_values=pixels.to(device),
            output_hidden_states=True,
        ).hidden_states[-(self.skip_layers + 1)]
        states, masks = [], []
        for row in range(len(prompts)):
            kept = self.prompt_positions(ids[row])
            image = hidden[row, self.image_start:self.image_start + self.image_len][::self.stride]
            states.append(torch.cat([image, hidden[row, kept + self.image_len - 1]]))
            masks.append(torch.cat([mask.new_ones(len(image)), mask[row, kept]]))
        return TextConditions(llm_states=torch.stack(states), llm_mask=torch.stack(masks), pooled=self.pooled(prompts))

    def prompt_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Positions (in the tokenized template, before the image's expansion) whose states the DiT
        gets: after the prefix, without the assistant's header (the last tokens, when truncated)."""
        headers = torch.nonzero(ids[self.crop_start:] == self.end_header).flatten()
        end = self.crop_start + int(headers[-1]) + 1 if len(headers) else len(ids)
        positions = torch.arange(len(ids), device=ids.device)
        return positions[(positions >= self.crop_start) & ((positions < end - self.assistant_header) | (positions >= end))]
