"""hvctl's avatar plugins: the conditioners that drive a reference image (reference, pose, audio,
expression) and the audio encoders that turn a waveform into per-frame features (logmel, whisper).

Registered through the `hvctl.plugins` entry point like any third-party plugin. The factories import
torch only when called, so `hvctl plugins list` stays light.
"""

from hvctl.plugins import register


@register("conditioner", "reference", "the reference image's latent, repeated over time, joined to the noisy latents on channels")
def reference(model_config: dict):
    from hvctl_avatar.conditioners import LatentEmbedding

    return LatentEmbedding(model_config, "reference")


@register("conditioner", "pose", "pose videos encoded by the VAE, added to the noisy latents")
def pose(model_config: dict):
    from hvctl_avatar.conditioners import LatentEmbedding

    return LatentEmbedding(model_config, "pose")


@register("conditioner", "audio", "audio features by frame-aligned cross-attention after chosen dual-stream blocks, scaled by a mask")
def audio(model_config: dict, feature_dim: int, blocks: list[int] | None = None, heads: int | None = None):
    """blocks: dual-stream block indices (default: all of them)."""
    from hvctl_avatar.conditioners import FrameCrossAttention

    dual = model_config["num_layers"]
    blocks = list(range(dual)) if blocks is None else list(blocks)
    if any(not 0 <= b < dual for b in blocks):
        from hvctl.errors import HvctlError

        raise HvctlError(f"conditioner audio: blocks {blocks} must be dual-stream blocks, 0..{dual - 1}")
    return FrameCrossAttention(model_config, "audio", feature_dim, blocks, heads, masked=True)


@register("conditioner", "expression", "per-frame expression features by cross-attention every K blocks")
def expression(model_config: dict, feature_dim: int = 2, every: int = 2, heads: int | None = None):
    """every: after blocks K-1, 2K-1, ... counting dual-stream then single-stream blocks."""
    from hvctl_avatar.conditioners import FrameCrossAttention

    if every < 1:
        from hvctl.errors import HvctlError

        raise HvctlError(f"conditioner expression: every must be >= 1, got {every}")
    total = model_config["num_layers"] + model_config["num_single_layers"]
    return FrameCrossAttention(model_config, "expression", feature_dim, list(range(every - 1, total, every)), heads)


@register("audio_encoder", "logmel", "log-mel spectrogram (Whisper's), averaged per video frame; needs no weights")
def logmel(n_mels: int = 80):
    from hvctl_avatar.audio import LogMelEncoder

    return LogMelEncoder(n_mels)


@register("audio_encoder", "whisper", "a Whisper encoder's hidden states from a local transformers folder, per video frame")
def whisper(path: str, layer: int = -1):
    from hvctl_avatar.audio import WhisperEncoder

    return WhisperEncoder(path, layer)
