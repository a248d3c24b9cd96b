"""Long avatar videos: overlapping windows of latent frames, denoised one by one and blended."""

from __future__ import annotations

import torch

from hvctl.avatar.conditions import FRAME_ALIGNED, LATENT_ALIGNED


def windows(latent_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) latent-frame windows covering the video, neighbours sharing `overlap` frames
    (the last one is moved back to end at the video's end)."""
    if latent_frames <= window:
        return [(0, latent_frames)]
    stride = max(window - overlap, 1)
    starts = list(range(0, latent_frames - window, stride)) + [latent_frames - window]
    return [(s, s + window) for s in starts]


def blend_weights(spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Each window's weight per latent frame: 1 inside, rising linearly across the frames it
    shares with its neighbours, so the blend moves smoothly from one window to the next."""
    weights = []
    for i, (start, stop) in enumerate(spans):
        w = torch.ones(stop - start)
        if i > 0:
            shared = spans[i - 1][1] - start
            w[:shared] = torch.arange(1, shared + 1) / (shared + 1)
        if i + 1 < len(spans):
            shared = stop - spans[i + 1][0]
            w[stop - start - shared:] = torch.minimum(w[stop - start - shared:], torch.arange(shared, 0, -1) / (shared + 1))
        weights.append(w)
    return weights


def window_inputs(inputs: dict, start: int, stop: int, per_latent: int = 4) -> dict:
    """The conditions of latent frames [start, stop): latents sliced as they are, per-frame
    features from the video frame that the window's first latent frame shows."""
    out = {}
    for name, value in inputs.items():
        if name in LATENT_ALIGNED and value.shape[2] > 1:
            value = value[:, :, start:stop]
        elif name in FRAME_ALIGNED:
            value = value[:, per_latent * start:per_latent * (stop - 1) + 1]
        out[name] = value
    return out


class WindowedDenoiser:
    """The transformer with avatar conditions, called window by window over a long latent video
    and the overlapping predictions blended; a drop-in for the transformer in the sampler.

    guidance {name: scale}: condition guidance, as audio-driven avatar models use it: one more
    pass without the condition, and v = v_all + (scale - 1) (v_all - v_without), per condition.
    """

    def __init__(self, transformer, inputs: dict, window: int, overlap: int, guidance: dict | None = None):
        self.transformer, self.inputs = transformer, inputs
        self.window, self.overlap = window, overlap
        self.guidance = {k: v for k, v in (guidance or {}).items() if v != 1.0 and f"present.{k}" in inputs}
        self.config, self.dtype = transformer.config, transformer.dtype

    def _velocity(self, inputs: dict, latents: torch.Tensor, kwargs: dict) -> torch.Tensor:
        with self.transformer.avatar.given(inputs):
            full = self.transformer(hidden_states=latents, return_dict=False, **kwargs)[0].float()
        from hvctl.flow import guided

        velocity = full
        for name, scale in self.guidance.items():
            without = {**inputs, f"present.{name}": torch.zeros_like(inputs[f"present.{name}"])}
            with self.transformer.avatar.given(without):
                other = self.transformer(hidden_states=latents, return_dict=False, **kwargs)[0].float()
            velocity = guided(full, other, scale - 1.0, base=velocity)
        return velocity

    def __call__(self, hidden_states: torch.Tensor, return_dict: bool = False, **kwargs):
        batch, frames = hidden_states.shape[0], hidden_states.shape[2]
        repeat = batch // next(iter(self.inputs.values())).shape[0]  # classifier-free guidance doubles the batch
        inputs = {k: v.repeat(repeat, *[1] * (v.dim() - 1)) for k, v in self.inputs.items()}
        spans = windows(frames, self.window, self.overlap)
        total = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        weights = torch.zeros(frames, device=hidden_states.device)
        for (start, stop), weight in zip(spans, blend_weights(spans)):
            velocity = self._velocity(window_inputs(inputs, start, stop), hidden_states[:, :, start:stop], kwargs)
            weight = weight.to(total.device)
            total[:, :, start:stop] += velocity * weight.view(1, 1, -1, 1, 1)
            weights[start:stop] += weight
        return ((total / weights.view(1, 1, -1, 1, 1)).to(hidden_states.dtype),)
