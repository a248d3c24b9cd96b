"""`hvctl model convert`: official HunyuanVideo checkpoints <-> diffusers model folders.

The official-layout model below is written for this test from the official module structure
(names and shapes of hyvideo/modules: fused q/k/v, a single block's linear1 = q, k, v and the MLP
input, (shift, scale) final adaLN, the token refiner), with its own forward; its state dict is
what an official checkpoint holds."""

import argparse
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import run_cli
from hvctl.models import official

# Sized to fit the tiny preset's text encoders (64-wide Llama states, 32-wide CLIP) and VAE (16 channels).
SIZES = dict(hidden=64, heads=2, double=2, single=2, refiner=2, out_channels=16, patch=(1, 2, 2), text_dim=64,
             pooled_dim=32, rope=(8, 12, 12), theta=256.0, mlp_ratio=4.0)


def timestep_features(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[:, None].float() * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_features(t))


class MLPEmbedder(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class TextProjection(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class MLP(nn.Module):
    def __init__(self, hidden, width, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(hidden, width), nn.Linear(width, hidden), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Modulation(nn.Module):
    def __init__(self, hidden, factor):
        super().__init__()
        self.linear = nn.Linear(hidden, factor * hidden)

    def forward(self, vec):
        return self.linear(F.silu(vec))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def heads(x, n):  # (B, L, 3*H*D) -> three (B, H, L, D): the fused rows are q, k, v, each head-major
    q, k, v = x.unflatten(-1, (3, n, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def rotate(x, cos, sin):  # x (B, H, L, D); pairs (x0, x1) turn as complex numbers
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + turned * sin


def attend(q, k, v, key_mask):  # key_mask (B, L) of keys that count
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask.bool()[:, None, None, :])
    return out.transpose(1, 2).flatten(2)


class DoubleBlock(nn.Module):
    def __init__(self, hidden, n_heads, mlp_ratio):
        super().__init__()
        self.n_heads, head_dim, width = n_heads, hidden // n_heads, int(hidden * mlp_ratio)
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(hidden, 6))
            setattr(self, f"{side}_attn_qkv", nn.Linear(hidden, 3 * hidden))
            setattr(self, f"{side}_attn_q_norm", RMSNorm(head_dim))
            setattr(self, f"{side}_attn_k_norm", RMSNorm(head_dim))
            setattr(self, f"{side}_attn_proj", nn.Linear(hidden, hidden))
            setattr(self, f"{side}_mlp", MLP(hidden, width, nn.GELU(approximate="tanh")))

    def forward(self, img, txt, vec, cos, sin, key_mask):
        mods = {side: getattr(self, f"{side}_mod")(vec).chunk(6, dim=-1) for side in ("img", "txt")}
        qkv = {}
        for side, x in (("img", img), ("txt", txt)):
            shift, scale = mods[side][0], mods[side][1]
            q, k, v = heads(getattr(self, f"{side}_attn_qkv")(modulate(layer_norm(x), shift, scale)), self.n_heads)
            q, k = getattr(self, f"{side}_attn_q_norm")(q), getattr(self, f"{side}_attn_k_norm")(k)
            if side == "img":
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            qkv[side] = q, k, v
        attn = attend(*(torch.cat([qkv["img"][i], qkv["txt"][i]], dim=2) for i in range(3)), key_mask)
        outs = []
        for side, x, a in (("img", img, attn[:, :img.shape[1]]), ("txt", txt, attn[:, img.shape[1]:])):
            _, _, gate1, shift2, scale2, gate2 = mods[side]
            x = x + getattr(self, f"{side}_attn_proj")(a) * gate1[:, None]
            x = x + getattr(self, f"{side}_mlp")(modulate(layer_norm(x), shift2, scale2)) * gate2[:, None]
            outs.append(x)
        return outs


class SingleBlock(nn.Module):
    def __init__(self, hidden, n_heads, mlp_ratio):
        super().__init__()
        self.n_heads, self.hidden, head_dim, self.width = n_heads, hidden, hidden // n_heads, int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.width)
        self.linear2 = nn.Linear(hidden + self.width, hidden)
        self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        self.modulation = Modulation(hidden, 3)

    def forward(self, x, vec, cos, sin, key_mask, img_len):
        shift, scale, gate = self.modulation(vec).chunk(3, dim=-1)
        qkv, mlp = self.linear1(modulate(layer_norm(x), shift, scale)).split([3 * self.hidden, self.width], dim=-1)
        q, k, v = heads(qkv, self.n_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        q = torch.cat([rotate(q[:, :, :img_len], cos, sin), q[:, :, img_len:]], dim=2)
        k = torch.cat([rotate(k[:, :, :img_len], cos, sin), k[:, :, img_len:]], dim=2)
        out = self.linear2(torch.cat([attend(q, k, v, key_mask), F.gelu(mlp, approximate="tanh")], dim=-1))
        return x + out * gate[:, None]


class RefinerBlock(nn.Module):
    def __init__(self, hidden, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden, 3 * hidden)
        self.self_attn_proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = MLP(hidden, 4 * hidden, nn.SiLU())
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c, mask):
        gate_attn, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=-1)
        q, k, v = heads(self.self_attn_qkv(self.norm1(x)), self.n_heads)
        x = x + self.self_attn_proj(attend(q, k, v, mask)) * gate_attn[:, None]
        return x + self.mlp(self.norm2(x)) * gate_mlp[:, None]


class Refiner(nn.Module):
    def __init__(self, dim, hidden, n_heads, depth):
        super().__init__()
        self.input_embedder = nn.Linear(dim, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.c_embedder = TextProjection(dim, hidden)
        self.individual_token_refiner = nn.Module()
        self.individual_token_refiner.blocks = nn.ModuleList(RefinerBlock(hidden, n_heads) for _ in range(depth))

    def forward(self, text, t, mask):
        weights = mask.float()[..., None]
        c = self.t_embedder(t) + self.c_embedder((text * weights).sum(1) / weights.sum(1))
        x = self.input_embedder(text)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, mask)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden, out):
        super().__init__()
        self.linear = nn.Linear(hidden, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)  # shift first, in the official order
        return self.linear(modulate(layer_norm(x), shift, scale))


class OfficialDiT(nn.Module):
    def __init__(self, in_channels, guidance, s=SIZES):
        super().__init__()
        h, n = s["hidden"], s["heads"]
        self.s, self.guidance = s, guidance
        self.img_in = nn.Module()
        self.img_in.proj = nn.Conv3d(in_channels, h, kernel_size=s["patch"], stride=s["patch"])
        self.txt_in = Refiner(s["text_dim"], h, n, s["refiner"])
        self.time_in = TimestepEmbedder(h)
        self.vector_in = MLPEmbedder(s["pooled_dim"], h)
        if guidance:
            self.guidance_in = TimestepEmbedder(h)
        self.double_blocks = nn.ModuleList(DoubleBlock(h, n, s["mlp_ratio"]) for _ in range(s["double"]))
        self.single_blocks = nn.ModuleList(SingleBlock(h, n, s["mlp_ratio"]) for _ in range(s["single"]))
        pt, ph, pw = s["patch"]
        self.final_layer = FinalLayer(h, s["out_channels"] * pt * ph * pw)

    def rope(self, t, hh, ww):
        grid = torch.meshgrid(torch.arange(t), torch.arange(hh), torch.arange(ww), indexing="ij")
        cos, sin = [], []
        for axis, dim in zip(grid, self.s["rope"]):
            freqs = 1.0 / self.s["theta"] ** (torch.arange(0, dim, 2).float() / dim)
            angles = torch.outer(axis.reshape(-1).float(), freqs)
            cos.append(angles.cos().repeat_interleave(2, dim=1))
            sin.append(angles.sin().repeat_interleave(2, dim=1))
        return torch.cat(cos, dim=1), torch.cat(sin, dim=1)

    def forward(self, x, t, text, mask, pooled, guidance=None):
        vec = self.time_in(t) + self.vector_in(pooled)
        if self.guidance:
            vec = vec + self.guidance_in(guidance)
        img = self.img_in.proj(x)
        grid = img.shape[2:]
        img = img.flatten(2).transpose(1, 2)
        txt = self.txt_in(text, t, mask)
        cos, sin = self.rope(*grid)
        key_mask = torch.cat([torch.ones(img.shape[:2], dtype=torch.bool), mask.bool()], dim=1)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, cos, sin, key_mask)
        joint = torch.cat([img, txt], dim=1)
        for block in self.single_blocks:
            joint = block(joint, vec, cos, sin, key_mask, img.shape[1])
        out = self.final_layer(joint[:, :img.shape[1]], vec)
        (pt, ph, pw), (t_, h_, w_) = self.s["patch"], grid
        out = out.reshape(x.shape[0], t_, h_, w_, -1, pt, ph, pw)
        return out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(x.shape[0], -1, t_ * pt, h_ * ph, w_ * pw)


def official_model(in_channels=16, guidance=True, seed=0):
    torch.manual_seed(seed)
    model = OfficialDiT(in_channels, guidance)
    with torch.no_grad():  # every weight random, the zero-initialised modulations too
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model.eval()


def inputs(in_channels, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0  # padding in one prompt: masked in the refiner and the joint attention
    return dict(x=torch.randn(2, in_channels, 3, 4, 6, generator=g), t=torch.tensor([900.0, 250.0]),
                text=torch.randn(2, 6, SIZES["text_dim"], generator=g), mask=mask,
                pooled=torch.randn(2, SIZES["pooled_dim"], generator=g), guidance=torch.tensor([6000.0, 3500.0]))


def diffusers_output(transformer, a):
    return transformer(hidden_states=a["x"], timestep=a["t"], encoder_hidden_states=a["text"],
                       encoder_attention_mask=a["mask"], pooled_projections=a["pooled"], guidance=a["guidance"],
                       return_dict=False)[0]


@pytest.fixture(scope="module")
def official_vae(tiny_model, tmp_path_factory):
    """The tiny model's VAE as the official loader reads it: vae/pytorch_model.pt ({"state_dict": {"vae.*"}}) and config.json."""
    folder = tmp_path_factory.mktemp("official-vae") / "vae"
    folder.mkdir()
    state = load_file(str(tiny_model / "vae/diffusion_pytorch_model.safetensors"))
    torch.save({"state_dict": {f"vae.{k}": v for k, v in state.items()}}, folder / "pytorch_model.pt")
    config = json.loads((tiny_model / "vae/config.json").read_text())
    # A scaling factor of its own: the converted VAE must take it from this file, not from the base.
    (folder / "config.json").write_text(json.dumps(dict(official.official_vae_config(config), scaling_factor=0.5)))
    return folder / "pytorch_model.pt"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["t2v", "latent_concat"])
def test_an_official_checkpoint_becomes_a_folder_with_the_same_output(kind, tiny_model, official_vae, tmp_path):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    in_channels = 33 if kind == "latent_concat" else 16
    reference = official_model(in_channels, guidance=kind == "t2v")
    ckpt = tmp_path / "ckpts/transformers/mp_rank_00_model_states.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"module": {k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()}}, ckpt)
    reference.to(torch.bfloat16).float()  # what the checkpoint holds

    out = tmp_path / "converted"
    if kind == "t2v":  # the official ckpts layout, the VAE found in it
        shutil.copytree(official_vae.parent, tmp_path / "ckpts/vae")
        done = run_cli("model", "convert", tmp_path / "ckpts", out, "--base", tiny_model, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["components"]["transformer"]["config"]["image_condition_type"] is None
    else:  # in-process: the command's path is the t2v case's
        from hvctl.models.convert import to_diffusers

        to_diffusers(ckpt, out, base=tiny_model, vae=official_vae)
        assert json.loads((out / "transformer/config.json").read_text())["image_condition_type"] == "latent_concat"

    stored = load_file(str(out / "transformer/diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}  # as the checkpoint stores it
    transformer = HunyuanVideoTransformer3DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32).eval()
    assert transformer.config.guidance_embeds == (kind == "t2v") and transformer.config.in_channels == in_channels
    a = inputs(in_channels)
    with torch.no_grad():
        expected = reference(**a)
        got = diffusers_output(transformer, a)
    assert expected.abs().mean() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)

    vae = AutoencoderKLHunyuanVideo.from_pretrained(out / "vae")
    base_vae = AutoencoderKLHunyuanVideo.from_pretrained(tiny_model / "vae")
    assert vae.config.scaling_factor == 0.5 and vae.config.norm_num_groups == base_vae.config.norm_num_groups
    assert all(torch.equal(v, base_vae.state_dict()[k]) for k, v in vae.state_dict().items())
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "scheduler"):  # copied from the base as they are
        for file in (tiny_model / name).iterdir():
            assert (out / name / file.name).read_bytes() == file.read_bytes()
    hvctl_info = json.loads((out / "hvctl.json").read_text())
    assert hvctl_info["generation"]["embedded_guidance"] == (6.0 if kind == "t2v" else None)


def test_the_final_adaln_and_fused_splits_matter():
    """The comparison above would catch a wrong order: (shift, scale) read as (scale, shift) changes the output."""
    reference = official_model()
    state = official.official_to_diffusers(reference.state_dict())
    a = inputs(16)
    from diffusers import HunyuanVideoTransformer3DModel

    transformer = HunyuanVideoTransformer3DModel.from_config(official.transformer_config(reference.state_dict(), {"rope_axes_dim": SIZES["rope"]}))
    transformer.load_state_dict(state)
    with torch.no_grad():
        good = diffusers_output(transformer.eval(), a)
        torch.testing.assert_close(good, reference(**a), atol=2e-5, rtol=1e-4)
        state["norm_out.linear.weight"] = reference.state_dict()["final_layer.adaLN_modulation.1.weight"]
        state["norm_out.linear.bias"] = reference.state_dict()["final_layer.adaLN_modulation.1.bias"]
        transformer.load_state_dict(state)
        assert (diffusers_output(transformer, a) - good).abs().max() > 1e-2


def test_module_name_api():
    assert official.diffusers_module_to_official("transformer_blocks.3.attn.to_k") == ("double_blocks.3.img_attn_qkv", 1)
    assert official.diffusers_module_to_official("transformer_blocks.0.attn.add_v_proj") == ("double_blocks.0.txt_attn_qkv", 2)
    assert official.diffusers_module_to_official("single_transformer_blocks.7.proj_mlp") == ("single_blocks.7.linear1", 3)
    assert official.diffusers_module_to_official("single_transformer_blocks.7.proj_out") == ("single_blocks.7.linear2", None)
    assert official.diffusers_module_to_official("context_embedder.token_refiner.refiner_blocks.1.attn.to_q") == (
        "txt_in.individual_token_refiner.blocks.1.self_attn_qkv", 0)
    assert official.diffusers_module_to_official("proj_out") == ("final_layer.linear", None)
    assert official.official_module_to_diffusers("single_blocks.2.linear1") == [
        f"single_transformer_blocks.2.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    # Every weighted module of a diffusers model maps, and back to itself.
    from diffusers import HunyuanVideoTransformer3DModel

    transformer = HunyuanVideoTransformer3DModel.from_config(official.transformer_config(official_model().state_dict(), {"rope_axes_dim": SIZES["rope"]}))
    modules = {k.rpartition(".")[0] for k in transformer.state_dict()}
    for name in modules:
        theirs, part = official.diffusers_module_to_official(name)
        assert official.official_module_to_diffusers(theirs)[part or 0] == name
    assert {official.diffusers_module_to_official(n)[0] for n in modules} == {k.rpartition(".")[0] for k in official_model().state_dict()}
    with pytest.raises(Exception, match="not a HunyuanVideo transformer module"):
        official.diffusers_module_to_official("transformer_blocks.0.attn.to_qkv")


@pytest.mark.slow
def test_diffusers_official_diffusers_is_bit_exact(tiny_guided_model, tmp_path):
    source = load_file(str(tiny_guided_model / "transformer/diffusion_pytorch_model.safetensors"))
    theirs = official.diffusers_to_official(source)
    hidden = 4 * 32
    assert theirs["single_blocks.0.linear1.weight"].shape == (3 * hidden + 4 * hidden, hidden)
    assert theirs["double_blocks.1.img_attn_qkv.weight"].shape == (3 * hidden, hidden)
    back = official.official_to_diffusers(theirs)
    assert back.keys() == source.keys() and all(torch.equal(back[k], v) for k, v in source.items())

    from hvctl.models.convert import to_official

    half = to_official(tiny_guided_model, tmp_path / "half", dtype="bfloat16")
    assert {v.dtype for v in load_file(str(half / "transformer.safetensors")).values()} == {torch.bfloat16}

    # The same through the command and files: folder -> official safetensors -> folder.
    off, again = tmp_path / "official", tmp_path / "again"
    done = run_cli("model", "convert", tiny_guided_model, off, "--to", "official", "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["files"]) == ["transformer.safetensors", "vae.safetensors", "vae_config.json"]
    written = load_file(str(off / "transformer.safetensors"))
    assert "final_layer.adaLN_modulation.1.weight" in written and "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.bias" in written
    # A base of other sizes gives only the text encoders; the transformer's own config rides in the file.
    done = run_cli("model", "convert", off, again, "--base", tiny_guided_model, "--json")
    assert done.returncode == 0, done.stderr
    for component in ("transformer", "vae"):
        a = load_file(str(tiny_guided_model / component / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(again / component / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert json.loads((again / component / "config.json").read_text()) | {"_diffusers_version": 0} == \
            json.loads((tiny_guided_model / component / "config.json").read_text()) | {"_diffusers_version": 0}


def test_token_replace_is_said_and_prefixes_are_dropped(tmp_path):
    from safetensors.torch import save_file

    from hvctl.models.convert import read_weights

    state = official_model().state_dict()
    assert official.transformer_config(state, {"rope_axes_dim": SIZES["rope"]})["image_condition_type"] is None
    config = official.transformer_config(state, {"rope_axes_dim": SIZES["rope"], "image_condition_type": "token_replace"})
    assert config["image_condition_type"] == "token_replace" and config["in_channels"] == 16
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(tmp_path / "comfy.safetensors"))
    read, _ = read_weights(tmp_path / "comfy.safetensors")
    assert read.keys() == state.keys()


def test_load_key_picks_module_or_ema(tmp_path):
    from hvctl.models.convert import read_weights

    a, b = official_model(seed=0).state_dict(), official_model(seed=1).state_dict()
    torch.save({"module": a, "ema": b}, tmp_path / "mp_rank_00_model_states.pt")
    for key, expected in ((None, a), ("module", a), ("ema", b)):
        state, _ = read_weights(tmp_path / "mp_rank_00_model_states.pt", key)
        assert all(torch.equal(state[k], v) for k, v in expected.items())


def one_line_error(result, *words):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(tiny_model, tmp_path):
    from hvctl.errors import HvctlError
    from hvctl.models.convert import to_diffusers

    out = tmp_path / "out"
    state = official_model().state_dict()
    torch.save({"module": {**state, "double_blocks.0.img_attn_qkvx.weight": torch.zeros(1)}}, tmp_path / "extra.pt")
    torch.save({"module": state}, tmp_path / "plain.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for src, flags, words in ((tmp_path / "nope.pt", {}, ("nope.pt", "no such")),
                              (tmp_path / "extra.pt", {}, ("img_attn_qkvx",)),
                              (tmp_path / "plain.pt", {"load_key": "ema"}, ("--load-key ema", "module")),
                              (tmp_path / "text.pt", {}, ("text.pt", "not a torch checkpoint"))):
        with pytest.raises(HvctlError) as caught:
            to_diffusers(src, out, base=tiny_model, **flags)
        assert "\n" not in str(caught.value) and all(w in str(caught.value) for w in words), str(caught.value)
    # Through the command: a pickle that needs more than weights is refused, in one line.
    torch.save({"module": state, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    one_line_error(run_cli("model", "convert", tmp_path / "pickled.pt", out, "--base", tiny_model), "weights only")
    assert not out.exists()


def test_the_13b_configuration_is_read_from_its_shapes():
    """The official 13B layout, on the meta device: the config found from the shapes is the official one."""
    from diffusers import HunyuanVideoTransformer3DModel

    from hvctl.models.presets import PRESETS

    expected = PRESETS["hunyuan-t2v-720p"].transformer
    with torch.device("meta"):
        state = HunyuanVideoTransformer3DModel(**expected).state_dict()
    theirs = official.diffusers_to_official(state)
    assert theirs["single_blocks.39.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)
    assert theirs["double_blocks.19.img_attn_qkv.weight"].shape == (3 * 3072, 3072)
    config = official.transformer_config(theirs, {})  # no base to lean on: rope from the official head size
    assert config == {**expected, "rope_axes_dim": [16, 56, 56], "rope_theta": 256.0, "image_condition_type": None}
    back = official.official_to_diffusers(theirs)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}
    # diffusers' own single-file conversion (its split sizes are fixed for 3072) reads our official names the same way.
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    assert {k: v.shape for k, v in convert_hunyuan_video_transformer_to_diffusers(dict(theirs)).items()} == \
        {k: v.shape for k, v in state.items()}
