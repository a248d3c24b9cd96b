"""hvctl's transformers plugins: a vision-language captioner and a language-model rewriter, each
from a local model folder (nothing is downloaded). Registered through the `hvctl.plugins` entry
point like any third-party plugin; torch and transformers load only when one is made."""

from hvctl_transformers import captioner, rewriter  # noqa: F401  (importing registers)
