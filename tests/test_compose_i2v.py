"""`hvctl model compose --i2v` with a LLaVA text encoder writes a folder that diffusers'
HunyuanVideoImageToVideoPipeline loads and runs, to the same latents as hvctl."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from hvctl.i2v import CONDITION_TYPES
from hvctl.video import read_image, write_image
from test_i2v_official import PROMPT, TEXT_LEN, build_official_i2v, diffusers_pipeline, diffusers_template, hvctl_t2v


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """The official I2V folder format, tiny: its LLaVA (64-wide text states) fits the tiny preset's DiT."""
    return build_official_i2v(tmp_path_factory.mktemp("official-i2v") / "token_replace", "token_replace")


@pytest.mark.slow
@pytest.mark.parametrize("kind", CONDITION_TYPES)
def test_composed_i2v_folder_runs_in_diffusers(kind, tiny_model, llava_folder, tmp_path):
    from PIL import Image

    out = tmp_path / "i2v"
    done = run_cli("model", "compose", tiny_model, out, "--i2v", kind, "--take", f"text_encoder={llava_folder}", "--json")
    assert done.returncode == 0, done.stderr
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideoImageToVideoPipeline"
    assert index["text_encoder"] == ["transformers", "LlavaForConditionalGeneration"]
    assert index["image_processor"][1].startswith("CLIPImageProcessor")
    # The tokenizer came with the LLaVA (it holds <image>); the DiT, VAE and CLIP are the base's.
    assert (out / "tokenizer/tokenizer.json").read_bytes() == (llava_folder / "tokenizer/tokenizer.json").read_bytes()
    assert (out / "text_encoder_2/config.json").read_text() == (tiny_model / "text_encoder_2/config.json").read_text()

    image = tmp_path / "frame.png"
    write_image(image, np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    t2v = hvctl_t2v(out, image, seed=3)
    ours = t2v.latents([3])
    pipe = diffusers_pipeline(out)
    theirs = pipe(image=Image.fromarray(read_image(image)), prompt=PROMPT, height=32, width=32, num_frames=5,
                  num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(3), output_type="latent",
                  prompt_template=diffusers_template(t2v.encode), max_sequence_length=TEXT_LEN).frames
    # diffusers' latent output drops latent_concat's frame 0 (the image's)
    torch.testing.assert_close(ours[:, :, 1:] if kind == "latent_concat" else ours, theirs, atol=1e-5, rtol=1e-4)
    assert (t2v.latents([4]) - ours).abs().max() > 1e-2


@pytest.mark.slow
def test_a_llava_text_encoder_needs_an_i2v_model(tiny_model, llava_folder, tmp_path):
    done = run_cli("model", "compose", tiny_model, tmp_path / "x", "--take", f"text_encoder={llava_folder}")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "only for an image-to-video model" in done.stderr and not (tmp_path / "x").exists()


def test_convert_refuses_a_text_to_video_checkpoint_on_a_llava_base(llava_folder, tmp_path):
    from hvctl.errors import HvctlError
    from hvctl.models.convert import to_diffusers
    from test_model_convert import SIZES, OfficialDiT

    model = OfficialDiT(16, guidance=True, s=dict(SIZES, heads=4, rope=(4, 6, 6)))  # the LLaVA folder's DiT's head size
    torch.save({"module": model.state_dict()}, tmp_path / "t2v.pt")
    with pytest.raises(HvctlError, match="LLaVA text encoder is an image-to-video one"):
        to_diffusers(tmp_path / "t2v.pt", tmp_path / "out", base=llava_folder)
