"""A fresh DiT's initialisation (hvctl/models/dit_init.py): adaLN-Zero starts every block as the
identity and the prediction at zero, and still trains every weight."""

import pytest
import torch

from hvctl.errors import HvctlError
from hvctl.models.dit_init import init_dit
from hvctl.models.presets import get_preset


def tiny_dit(scheme, seed=0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**get_preset("tiny").transformer)
    init_dit(model, scheme)
    return model


def dit_inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 16, 1, 8, 8, generator=g), timestep=torch.tensor([700.0, 300.0]),
                encoder_hidden_states=torch.randn(batch, 6, 64, generator=g),
                encoder_attention_mask=torch.ones(batch, 6, dtype=torch.bool),
                pooled_projections=torch.randn(batch, 32, generator=g), return_dict=False)


def test_adaln_zero_starts_every_block_as_the_identity_and_predicts_zero():
    model = tiny_dit("adaln-zero")
    out = model(**dit_inputs())[0]
    assert torch.count_nonzero(out) == 0
    seen = []

    def record(module, args, output):
        seen.append((args[0].clone(), output[0].clone()))  # image tokens in and out of a double-stream block

    model.transformer_blocks[0].register_forward_hook(record)
    model(**dit_inputs())
    assert torch.equal(*seen[0])
    weights = dict(model.named_parameters())
    assert abs(weights["time_text_embed.timestep_embedder.linear_1.weight"].std() - 0.02) < 0.004
    proj_in = weights["context_embedder.proj_in.weight"]  # Xavier, though its name holds "text_embedder"
    assert abs(proj_in.std() - (2 / sum(proj_in.shape)) ** 0.5) < 0.01
    # diffusers' own init is left as it is, and predicts something at once
    assert torch.count_nonzero(tiny_dit("diffusers")(**dit_inputs())[0]) > 0


def test_adaln_zero_trains_every_block_from_the_first_steps():
    model = tiny_dit("adaln-zero")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for _ in range(3):  # the zeroed layers get gradients first, then everything behind them does
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(**dit_inputs())[0], target).backward()
        optimizer.step()
    for name in ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.norm1.linear.weight",
                 "single_transformer_blocks.1.proj_mlp.weight", "context_embedder.proj_in.weight", "proj_out.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_the_same_seed_gives_the_same_init_and_an_unknown_scheme_is_refused():
    a, b = tiny_dit("adaln-zero", seed=4).state_dict(), tiny_dit("adaln-zero", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x_embedder.proj.weight"], tiny_dit("adaln-zero", seed=5).state_dict()["x_embedder.proj.weight"])
    with pytest.raises(ValueError, match="unknown DiT init"):
        init_dit(tiny_dit("diffusers"), "zero")


def test_a_recipe_inits_a_fresh_dit_only(tiny_model, tmp_path):
    from hvctl.recipe import load_recipe
    from hvctl.train.config import TrainRecipe, check_paths

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"kind: train\nmodel: {tiny_model}\nout: {tmp_path / 'run'}\ndit_init: adaln-zero\n"
                      f"data:\n  cache: {tmp_path}\n")
    with pytest.raises(HvctlError, match="dit_init: adaln-zero initialises a fresh DiT"):
        check_paths(load_recipe(TrainRecipe, recipe, []))
    check_paths(load_recipe(TrainRecipe, recipe, ["reinit=true"]))


def test_model_init_writes_an_adaln_zero_dit_and_refuses_an_unknown_scheme(tmp_path):
    from safetensors.torch import load_file

    from conftest import run_cli

    result = run_cli("model", "init", tmp_path / "m", "--preset", "tiny", "--dit-init", "adaln-zero")
    assert result.returncode == 0, result.stderr
    weights = load_file(str(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert torch.count_nonzero(weights["proj_out.weight"]) == 0 and torch.count_nonzero(weights["x_embedder.proj.weight"]) > 0
    result = run_cli("model", "init", tmp_path / "n", "--preset", "tiny", "--dit-init", "zero")
    assert result.returncode != 0 and "--dit-init zero" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "n").exists()
