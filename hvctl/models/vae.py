"""VAE use in one place: media to latent posteriors, latents to uint8 frames.

Tiling is diffusers' own (AutoencoderKLHunyuanVideo.enable_tiling): overlapping spatial tiles,
linearly blended; frames are always decoded in temporal chunks by diffusers. A frame larger than
the tile is tiled; the official tile is 256 px with stride 192.
"""

from __future__ import annotations

import torch

from hvctl.errors import HvctlError


def configure_tiling(vae, enabled: bool | None, tile_size: int = 256) -> None:
    """enabled: True/None tile frames larger than `tile_size` px; False never tiles in space."""
    if enabled is False:
        vae.disable_tiling()
        return
    if tile_size < 32 or tile_size % 32:
        # diffusers' blending needs the 3/4 stride to be a whole number of latent pixels.
        raise HvctlError(f"VAE tile size must be a multiple of 32 px, got {tile_size}")
    stride = tile_size * 3 // 4
    vae.enable_tiling(
        tile_sample_min_height=tile_size, tile_sample_min_width=tile_size,
        tile_sample_stride_height=stride, tile_sample_stride_width=stride,
    )


@torch.no_grad()
def decode_to_frames(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, T', H', W') latents -> (B, T, H, W, 3) uint8 frames."""
    video = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    video = ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu()


def latent_shape(vae_config: dict, latent_channels: int, frames: int, height: int, width: int) -> tuple[int, ...]:
    t = vae_config.get("temporal_compression_ratio", 4)
    s = vae_config.get("spatial_compression_ratio", 8)
    return (latent_channels, (frames - 1) // t + 1, height // s, width // s)


def frames_to_tensor(frames) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (1, 3, T, H, W) float in [-1, 1], the VAE's input."""
    video = torch.as_tensor(frames).permute(3, 0, 1, 2).unsqueeze(0).float()
    return video / 127.5 - 1.0


@torch.no_grad()
def encode_posterior(vae, frames) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of (T, H, W, 3) uint8 frames, as the DiT sees latents: (mean, std) times
    the scaling factor, each (C, T', H', W')."""
    video = frames_to_tensor(frames).to(vae.device, vae.dtype)
    posterior = vae.encode(video).latent_dist
    scale = vae.config.scaling_factor
    return (posterior.mean[0] * scale).float(), (posterior.std[0] * scale).float()
