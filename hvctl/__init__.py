"""hvctl: one command-line toolkit for HunyuanVideo-style text-to-video models."""

__version__ = "0.1.0"
