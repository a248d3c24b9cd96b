"""HunyuanVideo's chat templates for the LLM text encoder.

The prompt is placed inside a system/user chat; only the hidden states after the template's
prefix are kept. The official code hard-codes that prefix length (crop_start 95 for the video
template with Llama-3's tokenizer); hvctl measures it with the model's own tokenizer instead, so
any tokenizer works (see `crop_start`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    template: str  # one "{}" where the prompt goes

    @property
    def prefix(self) -> str:
        return self.template.split("{}")[0]


PROMPT_TEMPLATES = {
    t.name: t
    for t in [
        PromptTemplate(
            "video",
            "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
            "1. The main content and theme of the video."
            "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
            "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
            "4. background environment, light, style and atmosphere."
            "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
        ),
        PromptTemplate(
            "image",
            "<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, "
            "texture, quantity, text, spatial relationship of the objects and background:<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
        ),
    ]
}


def crop_start(tokenizer, template: PromptTemplate) -> int:
    """Number of tokens (BOS included) the template puts before the prompt."""
    return len(tokenizer(template.prefix, add_special_tokens=True)["input_ids"])


# The official HunyuanVideo-I2V's template (diffusers' HunyuanVideoImageToVideoPipeline): the
# LLaVA text encoder sees the image where `<image>` is, and the chat ends with the assistant's
# header. Kept out of PROMPT_TEMPLATES: those are the text-only ones, and the tiny tokenizers
# learn their merges from them (hvctl/models/tokenizers.py).
I2V_TEMPLATE = PromptTemplate(
    "i2v",
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following aspects "
    "according to the reference image: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
)
