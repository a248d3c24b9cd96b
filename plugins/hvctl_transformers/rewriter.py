"""The `llm` rewriter: a causal language model from a local transformers folder rewrites a prompt
with the instruction of its mode.

The output is checked before it replaces anything (the seed's revision step: compare the rewrite
with what the user wrote): the first paragraph only, not empty, not an echo of the instruction,
not many times longer than asked for, and, for a prompt written in Latin letters, keeping the
prompt's content words, since a rewrite that drops the user's subject has lost a fact. A rewrite
that fails is a SampleFailure; the stage then keeps the user's prompt, with a warning.
"""

from __future__ import annotations

import re

from hvctl.plugins import SampleFailure, register

INSTRUCTIONS = {
    "normal": (
        "Rewrite the user's video prompt for a text-to-video model. Keep every fact it states (subjects, "
        "colours, counts, actions, directions, places). Write in English, translating if needed. If it is only "
        "a word or two, expand it into one clear sentence. Add the visual style and lighting the prompt implies. "
        "Answer with the rewritten prompt only, in one paragraph."
    ),
    "master": (
        "Rewrite the user's video prompt for a text-to-video model, as a cinematographer would. Keep every fact "
        "it states (subjects, colours, counts, actions, directions, places). Write in English, translating if "
        "needed. Add detail on composition, lighting, colour and camera: shot size, angle and movement. "
        "Answer with the rewritten prompt only, in one paragraph."
    ),
}
STOPWORDS = set("a an the on in of and with at to by is are from into over under near its it this that as "
                "for while very some".split())
MAX_WORDS = 160
MIN_KEPT = 0.5  # share of the prompt's content words the rewrite must keep


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS and len(w) > 1}


def check_rewrite(prompt: str, reply: str, mode: str) -> str:
    """The usable rewrite in `reply`, or SampleFailure saying why there is none."""
    text = reply.strip().split("\n\n")[0].strip().strip('"').strip()
    if not text:
        raise SampleFailure("the model's output is empty")
    if INSTRUCTIONS[mode][:40] in text or "Rewrite the user" in text:
        raise SampleFailure("the model's output repeats the instruction")
    if len(text.split()) > MAX_WORDS:
        raise SampleFailure(f"the model's output is {len(text.split())} words long (at most {MAX_WORDS})")
    if not re.search(r"[A-Za-z]{2,}", text):
        raise SampleFailure("the model's output has no English words")
    wanted = content_words(prompt)
    latin = re.sub(r"[^A-Za-z]", "", prompt)
    if wanted and len(latin) >= 0.5 * len(re.sub(r"\s", "", prompt)):  # a prompt in another script is translated
        kept = wanted & content_words(text)
        if len(kept) < MIN_KEPT * len(wanted):
            lost = ", ".join(sorted(wanted - kept)[:5])
            raise SampleFailure(f"the rewrite drops the prompt's words ({lost})")
    return text


@register("rewriter", "llm")
class LlmRewriter:
    """A causal language model (a local transformers folder) rewrites the prompt per mode."""

    def __init__(self, model=None, max_new_tokens: int = 200, device: str = "auto"):
        from hvctl_transformers.common import check_folder, load

        path = check_folder(model, "llm rewriter")
        self.model, self.tokenizer = load(path, "AutoModelForCausalLM", "AutoTokenizer", device)
        self.max_new_tokens = max_new_tokens

    def rewrite(self, prompt: str, mode: str = "normal") -> str:
        from hvctl_transformers.common import generate_reply

        if self.tokenizer.chat_template:
            messages = [{"role": "system", "content": INSTRUCTIONS[mode]}, {"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = f"{INSTRUCTIONS[mode]}\n\nPrompt: {prompt}\nRewritten prompt:"
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=not self.tokenizer.chat_template)
        return check_rewrite(prompt, generate_reply(self.model, dict(inputs), self.max_new_tokens, self.tokenizer), mode)
