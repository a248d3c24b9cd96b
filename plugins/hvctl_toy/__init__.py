"""hvctl's toy-world plugins: a captioner that reads the attributes from pixels, a scorer, and a lexicon
rewriter that maps free wording to the canonical caption. Registered through the `hvctl.plugins`
entry point like any third-party plugin."""

from hvctl_toy import captioner, rewriter, scorer  # noqa: F401  (importing registers)
