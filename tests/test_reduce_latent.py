"""`hvctl model reduce-latent`: the whitened principal components folded into the VAE exactly."""

import json

import pytest
import torch

from conftest import run_cli


@pytest.fixture(scope="module")
def toy_media(tmp_path_factory):
    from hvctl.toy.render import render_dataset

    root = tmp_path_factory.mktemp("reduce-media")
    render_dataset(root, videos=3, images=6, seed=4, split="train", sizes=[(32, 32)], frames=5, loss_masks=False)
    return root / "manifest.jsonl"


def _pixels(manifest, vae):
    from hvctl.data.manifest import read_manifest
    from hvctl.models.latent_pca import whole_frames

    return [whole_frames(rec, manifest.parent, vae) for rec in read_manifest(manifest)]


@pytest.mark.parametrize("k", [3, 8])
def test_the_folded_vae_encodes_and_decodes_the_projected_latent(tiny_model, toy_media, k):
    from hvctl.models.latent_pca import fit_latent_pca, fold_into_vae
    from hvctl.models.loading import ModelFolder, load_component
    from hvctl.models.vae import encode_posterior

    vae = load_component(ModelFolder.open(tiny_model), "vae", dtype=torch.float32)
    pca = fit_latent_pca(vae, toy_media, max_samples=100)
    assert pca.samples == 9 and (pca.variances[:-1] >= pca.variances[1:]).all()
    folded = fold_into_vae(vae, pca, k)
    assert folded.config.latent_channels == k and folded.config.scaling_factor == 1.0
    p, b = pca.projection(k), pca.lift(k)
    latents = []
    for frames in _pixels(toy_media, vae):
        old, _ = encode_posterior(vae, frames)
        new, std = encode_posterior(folded, frames)
        expected = torch.einsum("kc,c...->k...", p, old - pca.mean[:, None, None, None])
        torch.testing.assert_close(new, expected, atol=1e-4, rtol=1e-4)
        assert (std > 0).all()
        latents.append(new)
    # whitened: over the fitting data every kept channel has mean 0 and variance 1
    flat = torch.cat([z.reshape(k, -1) for z in latents], 1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(k), atol=1e-3, rtol=0)
    torch.testing.assert_close(flat.var(1, correction=0), torch.ones(k), atol=1e-3, rtol=1e-3)
    z = latents[0][None]
    with torch.no_grad():
        lifted = pca.mean[:, None, None, None] + torch.einsum("ck,bk...->bc...", b, z)
        expected = vae.decode(lifted / vae.config.scaling_factor).sample
        torch.testing.assert_close(folded.decode(z).sample, expected, atol=1e-4, rtol=1e-4)


def test_the_folded_dit_reads_the_lifted_latent_and_projects_its_velocity(tiny_model, toy_media):
    from hvctl.models.latent_pca import fit_latent_pca, fold_into_transformer
    from hvctl.models.loading import ModelFolder, load_component

    folder = ModelFolder.open(tiny_model)
    vae = load_component(folder, "vae", dtype=torch.float32)
    dit = load_component(folder, "transformer", dtype=torch.float32)
    pca = fit_latent_pca(vae, toy_media, max_samples=4)
    k = 5
    folded = fold_into_transformer(dit, pca, k)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(1, k, 2, 4, 4, generator=generator)
    text = torch.randn(1, 6, dit.config.text_embed_dim, generator=generator)
    pooled = torch.randn(1, dit.config.pooled_projection_dim, generator=generator)
    kwargs = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                  encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool), pooled_projections=pooled,
                  return_dict=False)
    with torch.no_grad():
        lifted = pca.mean[:, None, None, None] + torch.einsum("ck,bk...->bc...", pca.lift(k), z)
        velocity = dit(lifted, **kwargs)[0]
        expected = torch.einsum("kc,bc...->bk...", pca.projection(k), velocity + pca.mean[:, None, None, None])
        torch.testing.assert_close(folded(z, **kwargs)[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_reduce_latent_writes_a_model_that_generates(tiny_model, toy_media, tmp_path):
    out = tmp_path / "reduced"
    result = run_cli("model", "reduce-latent", tiny_model, out, "--manifest", toy_media, "--channels", 4, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    explained = info["explained_variance"]
    assert info["channels"] == 4 and info["samples"] == 9 and explained == sorted(explained) and explained[-1] == 1.0
    config = json.loads((out / "vae" / "config.json").read_text())
    assert config["latent_channels"] == 4 and config["scaling_factor"] == 1.0
    assert json.loads((out / "transformer" / "config.json").read_text())["in_channels"] == 4
    assert (out / "vae" / "latent_pca.safetensors").is_file()
    video = tmp_path / "v.mp4"
    gen = run_cli("generate", "a red circle", "--model", out, "--steps", 1, "--frames", 5, "--seed", 0, "-o", video)
    assert gen.returncode == 0, gen.stderr
    assert video.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("flags, culprit", [(["--channels", "0"], "--channels 0"), (["--channels", "99"], "--channels 99"),
                                            (["--channels", "4", "--samples", "0"], "--samples 0")])
def test_reduce_latent_errors_are_one_line(tiny_model, toy_media, tmp_path, flags, culprit):
    out = tmp_path / "reduced"
    result = run_cli("model", "reduce-latent", tiny_model, out, "--manifest", toy_media, *flags)
    assert result.returncode == 1 and culprit in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
