"""The VAE's training variant: reconstruction of pixel batches read from the manifest's media."""

from __future__ import annotations

import json

import torch

from hvctl.errors import HvctlError
from hvctl.train.specs import TrainSpec, register


@register("vae")
class VaeSpec(TrainSpec):
    component = "vae"

    def check(self, r) -> None:
        if r.data.preload != "none":
            raise HvctlError(f"data.preload: {r.data.preload} stacks a DiT's latent cache; a VAE run reads media (set none)")

    def data(self, t, buckets):
        from hvctl.data.media import MediaDataset

        d = t.r.data
        if d.manifest is None:
            raise HvctlError("VAE training reads pixels: set data.manifest")
        return MediaDataset(d.manifest, buckets, split=d.split)

    def objective(self, t, dataset):
        from hvctl.train.objectives import VaeObjective

        if t.ranks.distributed and t.r.vae_loss.adversarial_weight > 0:
            raise HvctlError("vae_loss.adversarial_weight > 0 trains on one process for now (run without --nproc)")
        return VaeObjective(t.r.vae_loss, t.device)

    def batch(self, t, indices, generator) -> dict:
        from hvctl.data.batching import collate

        return collate([t.dataset[i] for i in indices])

    def batch_cost(self, t, indices) -> float:
        height, width, frames = t.bucket_of[indices[0]]
        return len(indices) * height * width * frames  # convolutions: linear in the pixels

    def finish_export(self, t, model_dir, checkpoint) -> None:
        if t.r.calibrate_scaling_factor:
            from hvctl.io import write_json_atomic

            config_file = model_dir / "vae" / "config.json"
            config = json.loads(config_file.read_text())
            config["scaling_factor"] = latent_scaling_factor(t, model_dir)
            write_json_atomic(config_file, config)
        super().finish_export(t, model_dir, checkpoint)


@torch.no_grad()
def latent_scaling_factor(t, model_dir, samples: int = 64) -> float:
    """1 / std of the exported VAE's posterior means over (up to) `samples` training samples."""
    from hvctl.models.loading import ModelFolder, load_component

    vae = load_component(ModelFolder.open(model_dir), "vae", dtype=torch.float32, device=t.device)
    step = max(1, len(t.dataset) // samples)
    means = [vae.encode(t.dataset[i]["pixels"][None].to(t.device)).latent_dist.mean.flatten()
             for i in range(0, len(t.dataset), step)][:samples]
    return round(1.0 / float(torch.cat(means).std()), 6)
