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

Task mixing (Seaweed: about 20% image-to-video helps text-to-video; much more hurts it): a
latent_concat model trains on text-to-video (no frame given: image channels and mask all zero),
image-to-video (frame 0 given) and video-to-video continuation (the first half of the latent
frames given), drawn per micro-batch at `data.task_ratio`. token_replace always treats frame 0 as
given (its timestep-0 modulation), so it trains image-to-video alone.
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


TASKS = ("t2v", "i2v", "v2v")


def check_task_ratio(ratio: dict, transformer) -> dict[str, float]:
    """The task shares, normalised to sum 1; one clear error for unknown tasks, bad numbers or a
    model that cannot take them."""
    import math

    unknown = [t for t in ratio if t not in TASKS]
    if unknown:
        raise HvctlError(f"data.task_ratio: unknown task {', '.join(map(str, unknown))} (choose from {', '.join(TASKS)})")
    bad = [t for t, v in ratio.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
    if bad or not sum(ratio.values()) > 0:
        raise HvctlError(f"data.task_ratio: shares must be finite numbers >= 0 with a positive sum, got {ratio}")
    kind = condition_type(transformer)
    if kind is None:
        raise HvctlError("data.task_ratio mixes image- and video-conditioned tasks: it needs an image-to-video model "
                         "(i2v: latent_concat in the recipe, or a model composed with --i2v latent_concat)")
    if kind == "token_replace" and any(v > 0 for t, v in ratio.items() if t != "i2v"):
        raise HvctlError("data.task_ratio: a token_replace model always takes frame 0 as given, so it trains i2v alone; "
                         "use a latent_concat model (i2v: latent_concat) to mix t2v and v2v in")
    total = float(sum(ratio.values()))
    return {t: ratio.get(t, 0) / total for t in TASKS}


def draw_task(shares: dict[str, float], generator) -> str:
    """One task for a micro-batch, from its own generator: the same micro-batch draws the same task,
    resumed or not."""
    import torch

    u, edge = float(torch.rand((), generator=generator)), 0.0
    present = [t for t in TASKS if shares.get(t, 0) > 0]
    for task in present:
        edge += shares[task]
        if u < edge:
            return task
    return present[-1]  # rounding at the top edge


@dataclass
class ImageCondition:
    """The given frames' clean latents (B, C, k, H', W'), scaled like the video latents, and the
    design: k = 1 for image-to-video, more for video continuation, 0 for text-to-video."""

    kind: str
    image_latent: torch.Tensor

    def initial(self, noise: torch.Tensor, stability: bool) -> torch.Tensor:
        latents = noise
        if stability and self.image_latent.shape[2] > 0:  # t2v (no frame given) starts from pure noise
            from hvctl.flow import add_noise

            latents = add_noise(self.image_latent.to(noise), noise, STABILITY_NOISE)
        return self.after_step(latents)

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        if self.kind == "token_replace":
            return self.after_step(latents)
        given = self.image_latent.shape[2]
        image = torch.zeros_like(latents)
        image[:, :, :given] = self.image_latent.to(latents)
        mask = torch.zeros_like(latents[:, :1])
        mask[:, :, :given] = 1.0
        return torch.cat([latents, image, mask], dim=1)

    def after_step(self, latents: torch.Tensor) -> torch.Tensor:
        """token_replace keeps frame 0 the image's at every step; latent_concat leaves it to the model."""
        if self.kind != "token_replace":
            return latents
        import torch

        return torch.cat([self.image_latent.to(latents), latents[:, :, self.image_latent.shape[2]:]], dim=2)

    def loss_mask(self, latents: torch.Tensor) -> torch.Tensor:
        """1 where the loss counts: every frame, or (token_replace) all but the given frame 0."""
        mask = latents.new_ones(latents[:, :1].shape)
        if self.kind == "token_replace":
            mask[:, :, :self.image_latent.shape[2]] = 0.0
        return mask


def training_condition(transformer, x0: torch.Tensor, task: str = "i2v") -> ImageCondition | None:
    """For an i2v model, the condition of a training clip: its own first latent frame (the causal
    VAE encodes frame 0 alone, so it is exactly the image's latent); for v2v its first half of
    latent frames, for t2v none (latent_concat's zero image and mask)."""
    kind = condition_type(transformer)
    if kind is None:
        return None
    if task == "t2v":
        return ImageCondition(kind, x0[:, :, :0])
    if x0.shape[2] < 2:
        raise HvctlError("image-to-video training needs videos: an image sample has no frame after the condition")
    return ImageCondition(kind, x0[:, :, :max(1, x0.shape[2] // 2) if task == "v2v" else 1])
