"""The avatar conditioners: small modules that hvctl/avatar.py hooks into a plain diffusers
HunyuanVideo transformer. Each one starts at zero, so a text-to-video model given them still
draws what it drew; training teaches them to steer it.

A conditioner reads its own entry of the call's inputs (see hvctl/avatar.py) and contributes
either input tokens (added to the patch embedding's output) or a residual after given blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LatentEmbedding(nn.Module):
    """A latent aligned with the video latents (the reference image's, repeated over time, or a pose
    video's) through its own zero-initialised patch embedding, added to the video tokens.

    For the reference this is exactly joining it to the noisy latents on channels: a convolution
    over [noisy; reference] is the sum of one convolution over each part. Keeping the extra
    weights here leaves the transformer a plain text-to-video model that diffusers loads.
    """

    blocks: tuple[int, ...] = ()

    def __init__(self, model_config: dict, key: str):
        super().__init__()
        self.key = key
        p, pt = model_config["patch_size"], model_config["patch_size_t"]
        inner = model_config["num_attention_heads"] * model_config["attention_head_dim"]
        self.proj = nn.Conv3d(model_config["out_channels"], inner, kernel_size=(pt, p, p), stride=(pt, p, p))
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def input_tokens(self, inputs: dict, grid: tuple[int, int, int]) -> torch.Tensor:
        latent = inputs[self.key]
        frames = grid[0] * self.proj.stride[0]
        if latent.shape[2] == 1 and frames > 1:  # a reference: the same latent at every time
            latent = latent.expand(-1, -1, frames, -1, -1)
        return self.proj(latent.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


def frame_windows(features: torch.Tensor, latent_frames: int, per_latent: int) -> torch.Tensor:
    """(B, T, F) per-frame features -> (B, T', per_latent, F): for each latent frame, the video
    frames the causal VAE folded into it (frame 0 alone, repeated; then per_latent at a time)."""
    last = features.shape[1] - 1
    starts = torch.arange(latent_frames, device=features.device) * per_latent - (per_latent - 1)
    index = (starts[:, None] + torch.arange(per_latent, device=features.device)).clamp(0, last)
    return features[:, index]


class FrameCrossAttention(nn.Module):
    """Per-frame features (audio, expression) entering by cross-attention after chosen blocks: the
    video tokens of each latent frame attend to the features of that frame's own video frames
    only, which keeps them in sync. The output projection starts at zero; with `masked`, the result
    is scaled by a mask over the picture (a face mask: where the audio may act)."""

    def __init__(self, model_config: dict, key: str, feature_dim: int, blocks: list[int], heads: int | None = None,
                 masked: bool = False, frames_per_latent: int = 4):
        super().__init__()
        self.key, self.masked, self.per_latent = key, masked, frames_per_latent
        self.blocks = tuple(blocks)
        dim = model_config["num_attention_heads"] * model_config["attention_head_dim"]
        self.heads = heads or model_config["num_attention_heads"]
        if dim % self.heads:
            raise ValueError(f"{key}: {self.heads} heads do not divide the width {dim}")
        self.attention = nn.ModuleDict({str(b): _CrossAttention(dim, feature_dim, self.heads, frames_per_latent)
                                        for b in self.blocks})

    def after_block(self, block: int, hidden: torch.Tensor, inputs: dict, grid: tuple[int, int, int]) -> torch.Tensor:
        t, h, w = grid
        features = frame_windows(inputs[self.key].to(hidden.dtype), t, self.per_latent)
        delta = self.attention[str(block)](hidden, features, t)
        if self.masked and inputs.get(f"{self.key}_mask") is not None:
            mask = F.adaptive_avg_pool2d(inputs[f"{self.key}_mask"].to(hidden.dtype), (h, w))  # (B, 1, h, w)
            delta = delta * mask.flatten(1).repeat(1, t)[..., None]
        return delta


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, feature_dim: int, heads: int, frames_per_latent: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(feature_dim, dim)
        self.to_v = nn.Linear(feature_dim, dim)
        self.frame_position = nn.Parameter(torch.zeros(frames_per_latent, dim))  # which of a latent frame's frames
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden: torch.Tensor, features: torch.Tensor, latent_frames: int) -> torch.Tensor:
        b, n, dim = hidden.shape
        per_frame, k = n // latent_frames, features.shape[2]
        split = lambda x, length: x.reshape(b * latent_frames, length, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        q = split(self.to_q(self.norm(hidden)), per_frame)
        keys = self.to_k(features) + self.frame_position
        k_, v = split(keys, k), split(self.to_v(features), k)
        out = F.scaled_dot_product_attention(q, k_, v).transpose(1, 2).reshape(b, n, dim)
        return self.to_out(out)
