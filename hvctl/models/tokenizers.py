"""Tokenizers built locally, for tiny models that must exist without any download.

Two byte-level BPE tokenizers in the formats HunyuanVideo uses:
- a Llama-3-style one (byte-level BPE, `<|begin_of_text|>` prepended, the chat-template special
  tokens as single tokens), saved as `tokenizer.json` for `PreTrainedTokenizerFast`;
- a CLIP one (lower-cased, `</w>` end-of-word suffix, `<|startoftext|>`/`<|endoftext|>`), saved
  by `CLIPTokenizer`.

Both learn their merges from a fixed corpus (the prompt templates and the toy world's words) with
a small deterministic BPE learner, so every build gives byte-identical files. Any text still
tokenizes: what the merges do not cover falls back to single bytes.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

from hvctl.models.templates import PROMPT_TEMPLATES

LLAMA_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CLIP_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]

# Words users and the toy world use. Their frequency only orders the merges.
_CORPUS_WORDS = """
a an the on in of and with at to by is are from into over under near its it this that
red green blue yellow magenta cyan black white gray grey orange purple pink brown
circle square triangle disc shape object ball box cube
moves stays still left right up down slowly quickly fast slow speed moving static
background foreground small medium large big tiny size radius starting start position centre center
top bottom corner middle frame frames pixels per second flat 2D graphics style shot wide
lighting even atmosphere calm lively camera movement video image toy world
cat dog walks runs grass sky sea water city street man woman car tree flower sunset
realistic cinematic close-up aerial view bright dark soft light night day
""".split()


@lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what byte-level BPE works on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [*printable, *range(256, 256 + len(extra))]
    return dict(zip([*printable, *extra], map(chr, chars)))


def _corpus_text() -> str:
    templates = " ".join(t.template.format("") for t in PROMPT_TEMPLATES.values())
    return templates + " " + " ".join(_CORPUS_WORDS * 2)


def learn_bpe(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Learn BPE merges over words given as tuples of symbols.

    The most frequent adjacent pair is merged first; ties go to the lexicographically smallest
    pair, so the result never depends on dict order.
    """
    words = Counter({tuple(w): n for w, n in words.items()})
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def _vocab_from(alphabet: list[str], merges: list[tuple[str, str]], specials: list[str]) -> dict[str, int]:
    vocab = {}
    for token in [*alphabet, *(a + b for a, b in merges), *specials]:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_llama_tokenizer(num_merges: int = 600):
    """A Llama-3-style byte-level BPE tokenizer (`PreTrainedTokenizerFast`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_map = _byte_to_unicode()
    chunks = Counter(piece for piece, _ in pre.pre_tokenize_str(_corpus_text()))
    merges = learn_bpe(Counter({tuple(c): n for c, n in chunks.items()}), num_merges)
    vocab = _vocab_from([byte_map[b] for b in range(256)], merges, LLAMA_SPECIAL_TOKENS)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(LLAMA_SPECIAL_TOKENS)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>", pad_token="<|end_of_text|>",
        padding_side="right", model_max_length=1024,
    )


def build_clip_tokenizer(num_merges: int = 400):
    """A CLIP BPE tokenizer (`CLIPTokenizer`): lower case, `</w>` marks a word's end."""
    from transformers import CLIPTokenizer

    byte_map = _byte_to_unicode()
    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", _corpus_text().lower()))
    symbols = Counter()
    for word, n in words.items():
        chars = [byte_map[b] for b in word.encode()]
        symbols[(*chars[:-1], chars[-1] + "</w>")] += n
    merges = learn_bpe(symbols, num_merges)
    alphabet = [byte_map[b] for b in range(256)]
    vocab = _vocab_from([*alphabet, *(c + "</w>" for c in alphabet)], merges, CLIP_SPECIAL_TOKENS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
