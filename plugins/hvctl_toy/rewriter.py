"""The lexicon rewriter: free wording about the toy world, English or Chinese, to the canonical
caption the toy models were trained on ("a red circle moves left on a black background").

The object colours and the background colours of the toy world are disjoint palettes, so a
colour word says by itself whether it is the object's or the background's. Normal mode gives the
canonical sentence; master mode adds the structured caption's style, shot and lighting fields,
which training composed into the text the same way (hvctl/data/captions.py).
"""

from __future__ import annotations

import re

from hvctl.plugins import SampleFailure, register

# Each attribute value with its words; Chinese entries are matched as substrings (no spaces to
# split on), English ones as whole words. Longer matches win over their own prefixes.
COLORS = {
    "red": ["red", "crimson", "scarlet", "红色", "红"],
    "green": ["green", "emerald", "绿色", "绿"],
    "blue": ["blue", "azure", "navy", "蓝色", "蓝"],
    "yellow": ["yellow", "golden", "gold", "黄色", "黄"],
    "magenta": ["magenta", "pink", "purple", "violet", "fuchsia", "洋红色", "品红色", "紫色", "粉色", "洋红", "品红", "紫", "粉"],
    "cyan": ["cyan", "turquoise", "aqua", "teal", "青色", "青"],
}
BACKGROUNDS = {
    "black": ["black", "dark", "黑色", "黑"],
    "white": ["white", "白色", "白"],
    "gray": ["gray", "grey", "灰色", "灰"],
}
SHAPES = {
    "circle": ["circle", "circles", "disc", "disk", "ball", "dot", "round", "圆形", "圆圈", "圆盘", "圆", "球"],
    "square": ["square", "squares", "box", "block", "cube", "正方形", "方形", "方块", "方"],
    "triangle": ["triangle", "triangles", "triangular", "三角形", "三角"],
}
# Motion: a destination ("from the left to the right", "从左到右") beats any other direction word.
# Bare 上 and 下 are left out: they mostly mean "on" and "under" (在背景上), and "top" and
# "bottom" mostly name a place, not a way.
MOTIONS = {
    "left": ["leftward", "leftwards", "left", "west", "westward", "向左", "往左", "左移", "左"],
    "right": ["rightward", "rightwards", "right", "east", "eastward", "向右", "往右", "右移", "右"],
    "up": ["upward", "upwards", "up", "rises", "rising", "ascends", "climbs", "向上", "往上", "上升", "上移"],
    "down": ["downward", "downwards", "down", "falls", "falling", "drops", "sinks", "descends",
             "向下", "往下", "下降", "下落", "下移"],
    "still": ["still", "static", "stationary", "motionless", "unmoving", "not moving", "doesn't move",
              "does not move", "stays", "rests", "静止", "不动", "停"],
}
DESTINATION = re.compile(r"\b(?:to|towards?|toward)\s+(?:the\s+)?(left|right|top|bottom|up|down)\b|[到至向往]([左右上下])")
DESTINATION_WORDS = {"left": "left", "right": "right", "top": "up", "up": "up", "bottom": "down", "down": "down",
                     "左": "left", "右": "right", "上": "up", "下": "down"}
MASTER_DETAIL = "Flat 2D graphics. Static wide shot. Flat, even lighting."


def _is_chinese(word: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in word)


def _find(text: str, lexicon: dict[str, list[str]]) -> list[tuple[int, str]]:
    """(position, value) of every lexicon word in text, longest words first, without overlaps."""
    entries = sorted(((w, v) for v, words in lexicon.items() for w in words), key=lambda e: -len(e[0]))
    taken = [False] * len(text)
    hits = []
    for word, value in entries:
        pattern = re.escape(word) if _is_chinese(word) else rf"\b{re.escape(word)}\b"
        for m in re.finditer(pattern, text):
            if not any(taken[m.start():m.end()]):
                taken[m.start():m.end()] = [True] * (m.end() - m.start())
                hits.append((m.start(), value))
    return sorted(hits)


def parse_toy_prompt(prompt: str) -> dict[str, str | None]:
    """The toy attributes a free-form prompt names; None where it names none."""
    text = prompt.lower()
    found = {}
    for name, lexicon in (("color", COLORS), ("shape", SHAPES), ("background", BACKGROUNDS)):
        hits = _find(text, lexicon)
        found[name] = hits[0][1] if hits else None
    destination = DESTINATION.search(text)
    if destination:
        found["motion"] = DESTINATION_WORDS[destination.group(1) or destination.group(2)]
    else:
        # "still" words outrank direction words: "stays still at the top" is still.
        hits = _find(text, MOTIONS)
        still = [v for _, v in hits if v == "still"]
        found["motion"] = "still" if still else (hits[0][1] if hits else None)
    return found


def canonical_prompt(color: str, shape: str, motion: str, background: str) -> str:
    verb = "stays still" if motion == "still" else f"moves {motion}"
    return f"a {color} {shape} {verb} on a {background} background"


@register("rewriter", "lexicon")
class LexiconRewriter:
    """Toy world: maps synonyms, word order and Chinese words to the canonical caption."""

    def __init__(self, default_background: str | None = None):
        if default_background is not None and default_background not in BACKGROUNDS:
            raise SampleFailure(f"default_background {default_background!r}: choose {', '.join(BACKGROUNDS)}")
        self.default_background = default_background

    def rewrite(self, prompt: str, mode: str = "normal") -> str:
        found = parse_toy_prompt(prompt)
        if found["background"] is None:
            found["background"] = self.default_background
        missing = [name for name, value in found.items() if value is None]
        if missing:
            raise SampleFailure(f"names no {', no '.join(missing)} of the toy world")
        sentence = canonical_prompt(found["color"], found["shape"], found["motion"], found["background"])
        return sentence if mode == "normal" else f"{sentence[0].upper()}{sentence[1:]}. {MASTER_DETAIL}"
