"""Training objectives: flow matching for the DiT, reconstruction (+KL, LPIPS, adversarial) for the VAE.

An objective is a callable (model, batch, generator) -> (loss, logs). Noise, timesteps and targets
come from hvctl.flow; nothing here knows about optimizers, checkpoints or devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hvctl.i2v import draw_task, training_condition
from hvctl.errors import HvctlError
from hvctl.flow import add_noise, loss_weights, sample_training_sigmas, transformer_velocity, velocity_target


class FlowMatchingObjective:
    """Velocity regression on noised latents sampled from the cached VAE posterior."""

    def __init__(self, flow, empty_text: dict | None, empty_prompt_rate: float, condition_drop: dict | None = None,
                 tasks: dict[str, float] | None = None):
        """tasks: an i2v model's task shares (hvctl/i2v.py: check_task_ratio); None: i2v alone."""
        if empty_prompt_rate > 0 and empty_text is None:
            raise HvctlError("empty_prompt_rate > 0 needs the empty prompt's text states in the cache (re-run hvctl encode)")
        if not 0 <= flow.unmasked_weight <= 1:
            raise HvctlError(f"flow.unmasked_weight must be in [0, 1], got {flow.unmasked_weight}")
        self.flow, self.empty_text, self.empty_prompt_rate = flow, empty_text, empty_prompt_rate
        self.condition_drop = condition_drop or {}
        self.tasks = tasks

    def avatar_inputs(self, batch: dict, generator: torch.Generator) -> dict | None:
        """The batch's avatar conditions (hvctl/avatar.py), each dropped for a share of the samples."""
        inputs = batch.get("conditions")
        if not inputs:
            return None
        inputs = dict(inputs)
        for name, rate in sorted(self.condition_drop.items()):
            present = inputs.get(f"present.{name}")
            if present is not None and rate > 0:
                inputs[f"present.{name}"] = present * (torch.rand(present.shape, generator=generator) >= rate).float()
        return inputs

    def empty_text_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The empty prompt's (states, mask, pooled), expanded to n samples (no copy)."""
        e = self.empty_text
        return e["text_states"].float().expand(n, -1, -1), e["text_mask"].expand(n, -1), e["pooled"].float().expand(n, -1)

    def noised(self, batch: dict, generator: torch.Generator, stratum=None) -> dict:
        """A batch's clean latents, noise and sigmas, and its text (empty where dropped)."""
        mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
        n = mean.shape[0]
        x0 = mean + std * torch.randn(mean.shape, generator=generator)
        noise = torch.randn(mean.shape, generator=generator)
        f = self.flow
        sigma = sample_training_sigmas(n, f.timestep_sampling, generator=generator, shift=f.shift,
                                       logit_mean=f.logit_mean, logit_std=f.logit_std,
                                       stratum=stratum if f.stratified else None)
        text, mask, pooled = batch["text_states"].float(), batch["text_mask"], batch["pooled"].float()
        drop = torch.rand(n, generator=generator) < self.empty_prompt_rate
        if drop.any():
            e = self.empty_text
            text, mask, pooled = text.clone(), mask.clone(), pooled.clone()
            text[drop], mask[drop], pooled[drop] = e["text_states"].float(), e["text_mask"], e["pooled"].float()
        return {"x0": x0, "noise": noise, "sigma": sigma, "text": (text, mask, pooled)}

    @staticmethod
    def predict(model, x0, noise, sigma, text, guidance=None, image=None, avatar=None):
        """The model's velocity for x0 noised to sigma; guidance: per-sample scales for an embedding;
        image: an image-to-video model's condition (hvctl/i2v.py); avatar: the
        conditioners' inputs (hvctl/avatar.py)."""
        from hvctl.avatar import conditions_context

        device = next(model.parameters()).device
        states, mask, pooled = text
        # Padding is masked out of attention, so only the batch's longest text need be computed:
        # toy captions fill a third of text_len, and the text tokens outnumber an image's.
        longest = max(int(mask.sum(dim=1).max()), 1)
        noisy = add_noise(x0, noise, sigma)
        avatar = None if avatar is None else {k: v.to(device) for k, v in avatar.items()}
        with conditions_context(model, avatar):
            return transformer_velocity(model, (noisy if image is None else image.model_input(noisy)).to(device), sigma,
                                        states[:, :longest].to(device), mask[:, :longest].to(device), pooled.to(device),
                                        guidance).float()

    def __call__(self, model, batch: dict, generator: torch.Generator, *, step: int = 0, stratum=None):
        """stratum (j, n): this is micro-batch j of the n that make one optimizer step."""
        b = self.noised(batch, generator, stratum)
        n = b["x0"].shape[0]
        guidance = torch.full((n,), self.flow.guidance) if model.config.guidance_embeds else None
        # Task mixing: the micro-batch's own generator draws its task, so a resumed run draws the same.
        task = draw_task(self.tasks, generator) if self.tasks else "i2v"
        image = training_condition(model, b["x0"], task)
        avatar = self.avatar_inputs(batch, generator)
        prediction = self.predict(model, b["x0"], b["noise"], b["sigma"], b["text"], guidance, image, avatar)
        target = velocity_target(b["x0"], b["noise"]).to(prediction.device)
        squared = F.mse_loss(prediction, target, reduction="none")
        # token_replace: frame 0 is given, not predicted
        per_sample = self.per_sample_loss(batch, squared, None if image is None else image.loss_mask(squared))
        loss = (loss_weights(b["sigma"], self.flow.loss_weighting).to(prediction.device) * per_sample).mean()
        logs = {"loss": loss.item(), "sigma_mean": b["sigma"].mean().item()}
        if self.tasks:  # per step: the share of its micro-batches on each task
            logs.update({f"task_{t}": float(t == task) for t, share in self.tasks.items() if share > 0})
        return loss, logs

    def per_sample_loss(self, batch: dict, squared: torch.Tensor, predicted: torch.Tensor | None = None) -> torch.Tensor:
        """Each sample's weighted mean of `squared` (B, C, T, H, W). The weights come from the
        batch's cached loss masks: 1 inside a mask, flow.unmasked_weight outside, times `predicted`
        (0 where the model is given the answer). A sample whose weights come to all zero (say, an
        empty mask with unmasked_weight 0) keeps `predicted` alone rather than dividing by zero."""
        weight = torch.ones_like(squared) if predicted is None else predicted.expand_as(squared).to(squared.dtype)
        if self.flow.unmasked_weight != 1 and "loss_mask" in batch:
            mask = batch["loss_mask"].to(squared.device, squared.dtype)
            masked = (self.flow.unmasked_weight + (1 - self.flow.unmasked_weight) * mask) * weight
            empty = masked.sum(dim=(1, 2, 3, 4)) == 0
            weight = torch.where(empty.view(-1, 1, 1, 1, 1), weight, masked)
        return (squared * weight).sum(dim=(1, 2, 3, 4)) / weight.sum(dim=(1, 2, 3, 4))


class PatchDiscriminator3D(nn.Module):
    """A small PatchGAN over space-time: real/fake logits per patch (hinge loss)."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        blocks, c_in = [], 3
        for i in range(layers):
            c_out = channels * 2**i
            blocks += [nn.Conv3d(c_in, c_out, (3, 4, 4), (1, 2, 2), (1, 1, 1)), nn.GroupNorm(min(8, c_out), c_out), nn.LeakyReLU(0.2)]
            c_in = c_out
        blocks.append(nn.Conv3d(c_in, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, video):
        return self.net(video)


class VaeObjective:
    """L1 + KL (+ LPIPS, + adversarial) reconstruction of pixel batches."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.lpips = _load_lpips(cfg) if cfg.lpips_weight > 0 else None
        self.discriminator = self.disc_optimizer = None
        if cfg.adversarial_weight > 0:
            self.discriminator = PatchDiscriminator3D().to(device)
            self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=cfg.discriminator_lr, betas=(0.5, 0.9))

    def __call__(self, vae, batch: dict, generator: torch.Generator, *, step: int = 0, stratum=None):
        from hvctl.models.vae import configure_tiling

        cfg = self.cfg
        x = batch["pixels"].to(self.device)
        # The finetune phase: random tiling, so tiled inference shows no seams.
        use_tiles = cfg.random_tiling > 0 and torch.rand(1, generator=generator).item() < cfg.random_tiling
        tile = cfg.tile_sizes[int(torch.randint(len(cfg.tile_sizes), (1,), generator=generator))]
        configure_tiling(vae, use_tiles, tile)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(self.device)
        recon = vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        loss = l1 + cfg.kl_weight * kl
        logs = {"l1": l1.item(), "kl": kl.item()}
        if cfg.mse_weight > 0:
            # L1's gradient keeps full size on nearly right pixels (a flat background); the squared
            # error's fades there, leaving the small objects' errors to drive the update.
            mse = F.mse_loss(recon, x)
            loss = loss + cfg.mse_weight * mse
            logs["mse"] = mse.item()
        if self.lpips is not None:
            frames = lambda v: v.transpose(1, 2).flatten(0, 1)  # noqa: E731  (B,C,T,H,W) -> (B*T,C,H,W)
            perceptual = self.lpips(frames(recon), frames(x)).mean()
            loss = loss + cfg.lpips_weight * perceptual
            logs["lpips"] = perceptual.item()
        if self.discriminator is not None and step >= cfg.adversarial_start:
            # The discriminator steps first: updating it after the VAE's graph used it would change
            # tensors that graph still needs.
            logs["d_loss"] = self._discriminator_step(x, recon.detach())
            self.discriminator.requires_grad_(False)
            adversarial = -self.discriminator(recon).mean()
            loss = loss + cfg.adversarial_weight * adversarial
            logs["g_adv"] = adversarial.item()
        with torch.no_grad():
            mse = ((recon.clamp(-1, 1) - x) ** 2).mean()
            logs["psnr"] = (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).item()
        configure_tiling(vae, None)
        logs["loss"] = loss.item()
        return loss, logs

    def _discriminator_step(self, real, fake) -> float:
        self.discriminator.requires_grad_(True)
        d_loss = F.relu(1 - self.discriminator(real)).mean() + F.relu(1 + self.discriminator(fake)).mean()
        self.disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_optimizer.step()
        return d_loss.item()

    def state_dict(self) -> dict:
        if self.discriminator is None:
            return {}
        return {"discriminator": self.discriminator.state_dict(), "disc_optimizer": self.disc_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.discriminator is not None and state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])


def _load_lpips(cfg):
    try:
        import lpips
    except ImportError:
        raise HvctlError("vae_loss.lpips_weight > 0 needs the `lpips` package and its VGG weights, which cannot be "
                         "downloaded here; install it where the weights are cached, or set lpips_weight: 0") from None
    if cfg.lpips_weights is None:
        raise HvctlError("vae_loss.lpips_weight > 0 needs vae_loss.lpips_weights: a local LPIPS weights file")
    return lpips.LPIPS(net="vgg", model_path=str(cfg.lpips_weights)).eval().requires_grad_(False)

