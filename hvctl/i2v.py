"""Image-to-video conditioning: the two designs, in training and in sampling, in one place.

- `latent_concat` (seed 003, the first official I2V): the model input is [noisy latents, the
  image latent in frame 0 and zeros after it, a mask that is 1 on frame 0] on channels: 2C+1
  input channels. A text-to-video model becomes one by zero-initialising the new input weights,
  so it starts out ignoring the image (tested), and everything else is copied.
- `token_replace` (the later official I2V): frame 0's latent is replaced by the clean image
  latent at every step; the model modulates those tokens with the timestep-0 embedding
  (diffusers' `image_condition_type`), and frame 0 is left out of the loss.

The design is stored in the transformer's config (`image_condition_type`), so a model folder
says how it is to be conditioned, and diffusers reads the same folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hvctl.errors import HvctlError

if TYPE_CHECKING:
    import torch

CONDITION_TYPES = ("latent_concat", "token_replace")
STABILITY_NOISE = 0.999  # official --i2v-stability: start from 0.999 noise + 0.001 image latent


def condition_type(transformer) -> str | None:
    return getattr(transformer.config, "image_condition_type", None)


def latent_channels(transformer) -> int:
    """Channels of the video latent (the transformer's own input may hold more)."""
    channels = transformer.config.in_channels
    return (channels - 1) // 2 if condition_type(transformer) == "latent_concat" else channels


def expand_for_i2v(transformer, kind: str):
    """A new transformer conditioned by `kind`, holding the text-to-video model's weights; for
    latent_concat the image and mask input channels get zero weights."""
    if kind not in CONDITION_TYPES:
        raise HvctlError(f"image condition {kind!r}: choose {' or '.join(CONDITION_TYPES)}")
    if condition_type(transformer) is not None:
        raise HvctlError(f"the transformer is already an image-to-video model ({condition_type(transformer)})")
    config = dict(transformer.config, image_condition_type=kind)
    channels = transformer.config.in_channels
    if kind == "latent_concat":
        config["in_channels"] = 2 * channels + 1
    import torch

    state = transformer.state_dict()
    if kind == "latent_concat":
        weight = state["x_embedder.proj.weight"]  # (inner, C, pt, p, p)
        extra = torch.zeros(weight.shape[0], channels + 1, *weight.shape[2:], dtype=weight.dtype)
        state["x_embedder.proj.weight"] = torch.cat([weight, extra], dim=1)
    expanded = type(transformer).from_config({k: v for k, v in config.items() if not k.startswith("_")})
    expanded.load_state_dict(state)
    return expanded.to(dtype=transformer.dtype)


@dataclass
class ImageCondition:
    """The first frame's clean latent (B, C, 1, H', W'), scaled like the video latents, and the design."""

    kind: str
    image_latent: torch.Tensor

    def initial(self, noise: torch.Tensor, stability: bool) -> torch.Tensor:
        latents = noise
        if stability:
            from hvctl.flow import add_noise

            latents = add_noise(self.image_latent.to(noise), noise, STABILITY_NOISE)
        return self.after_step(latents)

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        if self.kind == "token_replace":
            return self.after_step(latents)
        image = torch.zeros_like(latents)
        image[:, :, :1] = self.image_latent.to(latents)
        mask = torch.zeros_like(latents[:, :1])
        mask[:, :, :1] = 1.0
        return torch.cat([latents, image, mask], dim=1)

    def after_step(self, latents: torch.Tensor) -> torch.Tensor:
        """token_replace keeps frame 0 the image's at every step; latent_concat leaves it to the model."""
        if self.kind != "token_replace":
            return latents
        import torch

        return torch.cat([self.image_latent.to(latents), latents[:, :, 1:]], dim=2)

    def loss_mask(self, latents: torch.Tensor) -> torch.Tensor:
        """1 where the loss counts: every frame, or (token_replace) all but the given frame 0."""
        mask = latents.new_ones(latents[:, :1].shape)
        if self.kind == "token_replace":
            mask[:, :, :1] = 0.0
        return mask


def training_condition(transformer, x0: torch.Tensor) -> ImageCondition | None:
    """For an i2v model, the condition of a training clip: its own first latent frame (the causal
    VAE encodes frame 0 alone, so it is exactly the image's latent)."""
    kind = condition_type(transformer)
    if kind is None:
        return None
    if x0.shape[2] < 2:
        raise HvctlError("image-to-video training needs videos: an image sample has no frame after the condition")
    return ImageCondition(kind, x0[:, :, :1])
