"""The `vlm` captioner: a vision-language model from a local transformers folder writes the
structured caption as JSON.

A few frames, sampled evenly, go in with the instruction. The reply is forced to open the JSON
object (the cheapest constraint: a prefix the model continues), parsed, repaired where the fault
is mechanical (code fences, trailing commas, a missing tag list) and validated against the
schema; a reply that still fails is asked for once more, with what was wrong. A second failure
is that sample's failure, recorded by the stage.
"""

from __future__ import annotations

import json
import re

from hvctl.errors import HvctlError
from hvctl.data.captions import TAG_GROUPS, TEXT_FIELDS, caption_problems
from hvctl.plugins import SampleFailure, register

INSTRUCTION = (
    "You are a video captioner for training a text-to-video model. The images are frames of one clip, in order. "
    "Answer with one JSON object and nothing else, with these string fields: "
    "short_description (one sentence: the subject and what it does), dense_description (two or three sentences: "
    "subject, its size and place in the frame, how and how fast it moves), background, style, shot_type, "
    "lighting, atmosphere, camera_movement; and additional_metadata: an object with the lists of strings "
    "source_tags, quality_tags, other_tags."
)
REPLY_PREFIX = '{"short_description": "'


def parse_caption(reply: str) -> tuple[dict | None, list[str]]:
    """(caption, problems) from a model's reply: the first JSON object in it, mechanically repaired."""
    text = re.sub(r"```(?:json)?", "", reply)
    start = text.find("{")
    if start < 0:
        return None, ["no JSON object in the reply"]
    depth, end, in_string, escaped = 0, None, False, False
    for i, ch in enumerate(text[start:], start):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                end = i + 1
                break
    if end is None:
        return None, ["the JSON object is not closed"]
    body = re.sub(r",\s*([}\]])", r"\1", text[start:end])  # trailing commas
    try:
        caption = json.loads(body)
    except json.JSONDecodeError as e:
        return None, [f"invalid JSON ({e.msg})"]
    if isinstance(caption, dict):
        tags = caption.setdefault("additional_metadata", {})
        if isinstance(tags, dict):
            for group in TAG_GROUPS:
                tags.setdefault(group, [])
        for name in TEXT_FIELDS:
            if isinstance(caption.get(name), str):
                caption[name] = caption[name].strip()
    return caption, caption_problems(caption)


@register("captioner", "vlm")
class VlmCaptioner:
    """A vision-language model (a local transformers folder) writes the structured caption."""

    def __init__(self, model=None, frames: int = 4, max_new_tokens: int = 384, device: str = "auto"):
        from hvctl_transformers.common import check_folder, load

        path = check_folder(model, "vlm captioner")
        if frames < 1:
            raise HvctlError(f"vlm captioner: frames must be at least 1, got {frames}")
        self.model, self.processor = load(path, "AutoModelForImageTextToText", "AutoProcessor", device)
        self.frames, self.max_new_tokens = frames, max_new_tokens

    def caption(self, frames, record=None) -> dict:
        import numpy as np
        from PIL import Image

        picks = np.linspace(0, len(frames) - 1, min(self.frames, len(frames))).round().astype(int)
        images = [Image.fromarray(frames[i]) for i in picks]
        messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": INSTRUCTION}]}]
        caption, problems = parse_caption(self._ask(messages, images))
        if problems:  # once more, saying what was wrong
            messages += [{"role": "assistant", "content": [{"type": "text", "text": "(invalid answer)"}]},
                         {"role": "user", "content": [{"type": "text", "text": (
                             f"That answer was not valid: {'; '.join(problems[:3])}. "
                             "Answer again with only the JSON object.")}]}]
            caption, problems = parse_caption(self._ask(messages, images))
        if problems:
            raise SampleFailure(f"the VLM's reply is not a valid structured caption after one retry: {problems[0]}")
        return caption

    def _ask(self, messages, images) -> str:
        from hvctl_transformers.common import generate_reply

        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + REPLY_PREFIX
        inputs = self.processor(text=[prompt], images=images, return_tensors="pt")
        return REPLY_PREFIX + generate_reply(self.model, dict(inputs), self.max_new_tokens, self.processor.tokenizer)
