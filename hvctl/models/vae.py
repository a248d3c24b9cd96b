"""VAE use in one place: media to latent posteriors, latents to uint8 frames.

Tiling builds on diffusers' own (AutoencoderKLHunyuanVideo.enable_tiling): overlapping spatial
tiles, linearly blended; long videos go in temporal chunks. A frame larger than the tile is tiled;
the official tile is 256 px with stride 192.

One change to it, on by default (`tile_stats="frame"`): diffusers runs each tile through the
network alone, so every GroupNorm normalises a tile with that tile's own statistics. A flat tile
then loses its colour (GroupNorm maps any constant to zero) and neighbouring tiles disagree,
which shows as colour shifts and seams. Here each chunk is first passed whole at a resolution
that fits one tile, recording every GroupNorm's per-group mean and variance, and the tiles are
normalised with those frame statistics. Memory stays bounded by the tile; the small pass adds
about a tenth to the time. `tile_stats="tile"` keeps diffusers' behaviour exactly.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from hvctl.errors import HvctlError

TILE_STATS = ("frame", "tile")


def configure_tiling(vae, enabled: bool | None, tile_size: int = 256, tile_stats: str = "frame") -> None:
    """enabled: True/None tile frames larger than `tile_size` px; False never tiles in space.
    tile_stats: "frame" normalises tiles with whole-frame GroupNorm statistics, "tile" with each
    tile's own (diffusers)."""
    for name in ("tiled_encode", "tiled_decode"):
        vae.__dict__.pop(name, None)  # back to diffusers' methods
    if enabled is False:
        vae.disable_tiling()
        return
    if tile_size < 32 or tile_size % 32:
        # diffusers' blending needs the 3/4 stride to be a whole number of latent pixels.
        raise HvctlError(f"VAE tile size must be a multiple of 32 px, got {tile_size}")
    if tile_stats not in TILE_STATS:
        raise HvctlError(f"VAE tile statistics must be one of {', '.join(TILE_STATS)}, got {tile_stats!r}")
    stride = tile_size * 3 // 4
    vae.enable_tiling(
        tile_sample_min_height=tile_size, tile_sample_min_width=tile_size,
        tile_sample_stride_height=stride, tile_sample_stride_width=stride,
    )
    if tile_stats == "frame":
        # diffusers calls self.tiled_encode / self.tiled_decode once per temporal chunk; instance
        # attributes put the frame statistics around them without touching the class.
        vae.tiled_encode = partial(_with_frame_stats, vae.tiled_encode, vae.encoder, vae.encoder, tile_size)
        vae.tiled_decode = partial(_with_frame_stats, vae.tiled_decode, vae.decoder,
                                   lambda small: vae.decoder(vae.post_quant_conv(small)),
                                   tile_size // vae.spatial_compression_ratio)


def _with_frame_stats(tiled, network, run_whole, tile: int, x: torch.Tensor, *args, **kwargs):
    """Run `tiled(x)` with every GroupNorm of `network` using the statistics that `run_whole`
    records on x shrunk (area-averaged, per frame) to about one tile's area."""
    height, width = x.shape[-2:]
    scale = min(1.0, math.sqrt(tile * tile / (height * width)))
    small = F.interpolate(x.float(), size=(x.shape[2], max(1, round(height * scale)), max(1, round(width * scale))),
                          mode="area").to(x.dtype)
    stats = {}
    with torch.no_grad(), _norm_hooks(network, pre=partial(_record_stats, stats)):
        run_whole(small)
    with _norm_hooks(network, post=partial(_apply_stats, stats)):
        return tiled(x, *args, **kwargs)


@contextmanager
def _norm_hooks(network, pre=None, post=None):
    norms = [m for m in network.modules() if isinstance(m, torch.nn.GroupNorm)]
    handles = [m.register_forward_pre_hook(pre) for m in norms] if pre else []
    handles += [m.register_forward_hook(post) for m in norms] if post else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _grouped(norm, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], norm.num_groups, -1).float()


def _record_stats(stats: dict, norm, args) -> None:
    groups = _grouped(norm, args[0])
    stats[norm] = (groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True))


def _apply_stats(stats: dict, norm, args, output) -> torch.Tensor:
    """Replaces the tile's GroupNorm output: normalise with the recorded frame statistics."""
    x = args[0]
    mean, var = stats[norm]
    y = ((_grouped(norm, x) - mean) * torch.rsqrt(var + norm.eps)).reshape(x.shape).to(x.dtype)
    if norm.affine:
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        y = y * norm.weight.view(per_channel) + norm.bias.view(per_channel)
    return y


def same_on_any_thread_count(device: torch.device):
    """On the CPU, oneDNN's 3D convolutions sum in an order that follows the intra-op thread count
    (1 and 2 threads gave frames a level apart), and that count varies with OMP_NUM_THREADS, the
    CPUs a shared machine grants, torchrun's setting. ATen's own convolution does not: about 30%
    slower for the VAE, but the same frames from every run."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    # None leaves the other flags alone (setting allow_tf32 warns about Intel GPUs).
    return torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None)


@torch.no_grad()
def decode_to_frames(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, T', H', W') latents -> (B, T, H, W, 3) uint8 frames."""
    with same_on_any_thread_count(latents.device):
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
    from hvctl.models.loading import input_device

    video = frames_to_tensor(frames).to(input_device(vae), vae.dtype)
    with same_on_any_thread_count(video.device):
        posterior = vae.encode(video).latent_dist
    scale = vae.config.scaling_factor
    return (posterior.mean[0] * scale).float(), (posterior.std[0] * scale).float()
