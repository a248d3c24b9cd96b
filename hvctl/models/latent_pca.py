"""`hvctl model reduce-latent`: a VAE whose latent is the principal components of another's,
whitened, with fewer channels; folded into the VAE's own layers, so the result is still a plain
`AutoencoderKLHunyuanVideo` (diffusers loads it; nothing in hvctl special-cases it).

Why (docs/toy-models.md, step 2): a VAE's latent channels can be far from equally used. The toy
default's 16 channels hold 96% of their variance in one direction and 99.86% in four, so the
DiT's unit noise drowns every direction but the first until the last steps. Whitened components
give each kept direction unit variance, and the leading four kept the toy VAE's ceiling at a
quarter of the channels.

The fold is exact, not a fit: with z the old latent in DiT units (posterior mean times the
scaling factor), mu its mean, U its covariance's eigenvectors and ev their eigenvalues, the new
latent is z' = P (z - mu) with P = diag(ev_k)^-1/2 U_kᵀ. The encoder's last convolution and
`quant_conv` are both linear, so P is composed into the last convolution's mean rows (and
`quant_conv` becomes the identity); on the way back z = mu + B z', B = U_k diag(ev_k)^1/2, and
`post_quant_conv` then `decoder.conv_in` are composed the same way. The constant mu passes
through a 3x3x3 convolution as the kernel's sum times mu, exactly, because these convolutions pad
by replicating the border (a constant field stays constant). The posterior's variance is kept as
a constant per channel: its mean over the fitting data, projected.

The DiT is carried over, its input embedding folded exactly (it sees mu + B z') and its output
projected (v' = P (v + mu)); it was trained on other noise, so it is a starting point for
training, not a finished model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hvctl.errors import HvctlError


@dataclass
class LatentPCA:
    mean: torch.Tensor  # (C,) the latent's mean, DiT units
    components: torch.Tensor  # (C, C) eigenvectors as columns, by eigenvalue descending
    variances: torch.Tensor  # (C,) eigenvalues, descending
    posterior_var: torch.Tensor  # (C,) mean posterior variance per old channel, DiT units
    samples: int  # media encoded

    def explained(self, k: int) -> float:
        return float(self.variances[:k].sum() / self.variances.sum())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components, "variances": self.variances,
                "posterior_var": self.posterior_var}

    def projection(self, k: int) -> torch.Tensor:
        """P (k, C): old latent (minus the mean) to whitened components."""
        return self.components[:, :k].T / self.variances[:k, None].sqrt()

    def lift(self, k: int) -> torch.Tensor:
        """B (C, k): whitened components back to the old latent (plus the mean)."""
        return self.components[:, :k] * self.variances[:k].sqrt()


@torch.no_grad()
def fit_latent_pca(vae, manifest: Path, max_samples: int) -> LatentPCA:
    """The latent statistics of up to max_samples of the manifest's media (spread evenly over it),
    encoded by `vae` as the encode cache would (posterior mean and std in DiT units)."""
    from hvctl.data.manifest import read_manifest
    from hvctl.models.vae import encode_posterior

    records = read_manifest(manifest)
    if not records:
        raise HvctlError(f"{manifest}: no samples to fit the latent's components on")
    stride = max(1, len(records) // max_samples)
    chosen = records[::stride][:max_samples]
    c = vae.config.latent_channels
    total, post_var = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    outer, positions = torch.zeros(c, c, dtype=torch.float64), 0
    for rec in chosen:
        frames = whole_frames(rec, manifest.parent, vae)
        mean, std = encode_posterior(vae, frames)
        flat = mean.reshape(c, -1).double()
        total += flat.sum(1)
        outer += flat @ flat.T
        post_var += std.reshape(c, -1).double().pow(2).sum(1)
        positions += flat.shape[1]
    mu = total / positions
    covariance = outer / positions - torch.outer(mu, mu)
    variances, components = torch.linalg.eigh(covariance)  # ascending
    order = variances.argsort(descending=True)
    return LatentPCA(mean=mu.float(), components=components[:, order].float(),
                     variances=variances[order].clamp_min(1e-12).float(), posterior_var=(post_var / positions).float(),
                     samples=len(chosen))


def whole_frames(rec, manifest_dir: Path, vae):
    """A record's frames at its own size, cropped to what the VAE encodes whole (4k+1 frames,
    sides a multiple of its compression)."""
    from hvctl.data.buckets import BucketConfig
    from hvctl.data.media import fitted_frames

    space, time = vae.config.spatial_compression_ratio, vae.config.temporal_compression_ratio
    own = BucketConfig(aspect_buckets=[(rec.height // space * space, rec.width // space * space)],
                       frame_buckets=[(rec.frames - 1) // time * time + 1])
    return fitted_frames(rec, manifest_dir, own)[0]


@torch.no_grad()
def fold_into_vae(vae, pca: LatentPCA, k: int):
    """A new AutoencoderKLHunyuanVideo whose (unscaled, scaling_factor 1) latent is the k whitened
    components of `vae`'s; the rest of its weights are `vae`'s."""
    from diffusers import AutoencoderKLHunyuanVideo

    vae = vae.float()
    c, s = vae.config.latent_channels, vae.config.scaling_factor
    new = AutoencoderKLHunyuanVideo.from_config({**vae.config, "latent_channels": k, "scaling_factor": 1.0})
    folded = {"encoder.conv_out.conv", "quant_conv", "post_quant_conv", "decoder.conv_in.conv"}
    new.load_state_dict({n: t for n, t in vae.state_dict().items() if n.rsplit(".", 1)[0] not in folded}, strict=False)
    p, b = pca.projection(k), pca.lift(k)

    # Encoder: mean = s * (Wq[:c] (Wc * x + bc) + bq[:c]); new mean = P (mean - mu).
    conv, quant = vae.encoder.conv_out.conv, vae.quant_conv
    wq, bq = quant.weight[:c, :, 0, 0, 0], quant.bias[:c]
    mean_weight = torch.einsum("kc,cd,d...->k...", p * s, wq, conv.weight)
    mean_bias = p @ (s * (wq @ conv.bias + bq) - pca.mean)
    projected_var = (p ** 2) @ pca.posterior_var  # each new channel's posterior variance, on average
    out = new.encoder.conv_out.conv
    out.weight.copy_(torch.cat([mean_weight, torch.zeros_like(mean_weight)]))
    out.bias.copy_(torch.cat([mean_bias, projected_var.clamp_min(1e-12).log()]))
    _identity(new.quant_conv)

    # Decoder: conv_in(Wpq (mu + B z') / s + bpq); the constant goes through conv_in as its kernel's sum.
    wpq, bpq = vae.post_quant_conv.weight[:, :, 0, 0, 0], vae.post_quant_conv.bias
    conv_in = vae.decoder.conv_in.conv
    constant = wpq @ pca.mean / s + bpq
    new.decoder.conv_in.conv.weight.copy_(torch.einsum("oc...,cj->oj...", conv_in.weight, wpq @ b / s))
    new.decoder.conv_in.conv.bias.copy_(conv_in.bias + conv_in.weight.sum((2, 3, 4)) @ constant)
    _identity(new.post_quant_conv)
    return new


@torch.no_grad()
def fold_into_transformer(dit, pca: LatentPCA, k: int):
    """The DiT with k latent channels: its patch embedding reads z = mu + B z' exactly; its
    output is projected as a velocity (v' = P (v + mu)). A starting point for training."""
    from diffusers import HunyuanVideoTransformer3DModel

    config = dit.config
    if config.get("image_condition_type") is not None:
        raise HvctlError("reduce-latent: this DiT takes an image condition; reduce the text-to-video model, "
                         "then make it image-to-video (hvctl model compose --i2v)")
    dit = dit.float()
    new = HunyuanVideoTransformer3DModel.from_config({**config, "in_channels": k, "out_channels": k})
    new.load_state_dict({n: t for n, t in dit.state_dict().items()
                         if not n.startswith(("x_embedder.proj.", "proj_out."))}, strict=False)
    p, b = pca.projection(k), pca.lift(k)
    embed = dit.x_embedder.proj
    new.x_embedder.proj.weight.copy_(torch.einsum("oc...,cj->oj...", embed.weight, b))
    new.x_embedder.proj.bias.copy_(embed.bias + embed.weight.sum((2, 3, 4)) @ pca.mean)
    c = dit.config.out_channels
    weight = dit.proj_out.weight.reshape(c, -1, dit.proj_out.in_features)  # rows ordered (channel, patch cell)
    bias = dit.proj_out.bias.reshape(c, -1) + pca.mean[:, None]
    new.proj_out.weight.copy_(torch.einsum("kc,cpi->kpi", p, weight).reshape(-1, weight.shape[-1]))
    new.proj_out.bias.copy_((p @ bias).reshape(-1))
    return new


def _identity(conv) -> None:
    torch.nn.init.zeros_(conv.bias)
    conv.weight.zero_()
    conv.weight[:, :, 0, 0, 0].copy_(torch.eye(conv.weight.shape[0]))


def reduce_latent(base: Path, out: Path, manifest: Path, channels: int, samples: int) -> tuple[Path, LatentPCA]:
    """Write `out`: `base` with its VAE reduced to `channels` whitened components (fitted on
    `manifest`'s media) and its DiT folded to match; the statistics go beside the VAE."""
    from safetensors.torch import save_file

    from hvctl.models.loading import ModelFolder, load_component, quiet_libraries
    from hvctl.models.presets import check_new_model_folder, write_model_folder

    check_new_model_folder(out)
    manifest = Path(manifest)
    if not manifest.is_file():
        raise HvctlError(f"--manifest {manifest}: no such file")
    if samples < 1:
        raise HvctlError(f"--samples {samples}: must be at least 1")
    quiet_libraries()
    folder = ModelFolder.open(base)
    latent = folder.component_config("vae").get("latent_channels")
    if not 1 <= channels <= latent:
        raise HvctlError(f"--channels {channels}: {base}'s VAE has {latent} latent channels; choose 1 to {latent}")
    vae = load_component(folder, "vae", dtype=torch.float32)
    pca = fit_latent_pca(vae, manifest, samples)
    components = {name: folder.path / name for name in folder.component_names}
    components["vae"] = fold_into_vae(vae, pca, channels)
    components["transformer"] = fold_into_transformer(load_component(folder, "transformer", dtype=torch.float32),
                                                      pca, channels)
    generation = {k: v for k, v in folder.generation_defaults.items() if k != "guidance_embeds"}
    extra = {k: v for k, v in folder.hvctl_info.items() if k not in ("generation", "weights", "hvctl_version")}
    extra["latent_reduced_from"] = {"base": str(base), "manifest": str(manifest), "samples": pca.samples,
                                    "channels": channels, "explained_variance": round(pca.explained(channels), 6),
                                    "transformer": "folded: a starting point for training, not a trained model"}

    def write_statistics(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in pca.state_dict().items()}, str(tmp / "vae" / "latent_pca.safetensors"))

    # float32, whatever the base's dtype: the fold is exact only at full precision (recast with compose --dtype)
    return write_model_folder(out, components, generation, meta=False, index=folder.index, extra=extra,
                              write_more=write_statistics), pca
