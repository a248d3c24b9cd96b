"""The official HunyuanVideo-I2V's folder format (diffusers' HunyuanVideoImageToVideoPipeline): a LLaVA
text encoder that reads the image with the prompt. Tiny folders written by diffusers itself; hvctl's
prompt encoding and sampling equal the pipeline's."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from hvctl.i2v import CONDITION_TYPES
from hvctl.video import read_image, read_video, write_image

PROMPT = "a red circle moves left on a black background"
TEXT_LEN = 32


def build_official_i2v(out, kind: str):
    """What `HunyuanVideoImageToVideoPipeline.save_pretrained` writes, tiny and built without any download:
    a LLaVA (32-px CLIP vision tower, 3-layer Llama) whose tokenizer has `<image>`, an I2V DiT of `kind`."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoImageToVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    from hvctl.models.tokenizers import build_clip_tokenizer, build_llama_tokenizer

    tokenizer, clip_tokenizer = build_llama_tokenizer(), build_clip_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_tokens(["assistant"])  # one token, as in Llama-3's: the assistant header is 4 tokens there too
    pad = tokenizer.pad_token_id
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)  # 16 image tokens
    # 3 layers: the hidden states used (layer -3) come after a real layer, not the embeddings.
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=pad)
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                        pad_token_id=pad, vision_feature_layer=-1, vision_feature_select_strategy="default")
    clip = CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                          bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                          pad_token_id=clip_tokenizer.pad_token_id)
    channels = 4
    torch.manual_seed(0)
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=LlavaForConditionalGeneration(llava), tokenizer=tokenizer,
        transformer=HunyuanVideoTransformer3DModel(
            in_channels=2 * channels + 1 if kind == "latent_concat" else channels, out_channels=channels,
            num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1,
            patch_size=1, patch_size_t=1, text_embed_dim=64, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
            # like the official ones: the token_replace I2V is guidance-distilled, the latent_concat one is not
            guidance_embeds=kind == "token_replace", image_condition_type=kind),
        vae=AutoencoderKLHunyuanVideo(latent_channels=channels, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                      norm_num_groups=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                      up_block_types=("HunyuanVideoUpBlock3D",) * 4),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=CLIPTextModel(clip), tokenizer_2=clip_tokenizer,
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("official-i2v")
    return {kind: build_official_i2v(root / kind, kind) for kind in CONDITION_TYPES}


@pytest.fixture(scope="module")
def first_frame(tmp_path_factory):
    """A 32x32 noise image: the video's size, so hvctl's fit (cover, crop) and diffusers' resize agree."""
    path = tmp_path_factory.mktemp("image") / "frame.png"
    write_image(path, np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return path


def diffusers_pipeline(model):
    from diffusers import HunyuanVideoImageToVideoPipeline

    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_template(encoder) -> dict:
    """diffusers' DEFAULT_PROMPT_TEMPLATE hard-codes the positions for Llama-3's tokenizer and a 336-px CLIP
    (crop_start 103, image tokens 5 to 581); hvctl measures them, so diffusers gets the tiny model's."""
    return {"template": encoder.template.template, "crop_start": encoder.crop_start,
            "image_emb_start": encoder.image_start, "image_emb_end": encoder.image_start + encoder.image_len,
            "image_emb_len": encoder.image_len}


def hvctl_t2v(model, image, **settings):
    from hvctl.generate import GenerateRecipe, TextToVideo, prepare
    from hvctl.models.loading import resolve_device_dtype

    r, model_dir = prepare(GenerateRecipe(prompt=PROMPT, image=image, model=model, steps=2, frames=5, height=32, width=32,
                                          text_len=TEXT_LEN, dtype="float32", device="cpu", **settings))
    return TextToVideo(model_dir, r, *resolve_device_dtype(r.device, r.dtype))


def test_the_folder_loads_with_its_image_processor(official):
    from hvctl.models.loading import ModelFolder, load_components

    folder = ModelFolder.open(official["token_replace"])
    assert folder.index["_class_name"] == "HunyuanVideoImageToVideoPipeline" and folder.reads_images
    parts = load_components(folder.path, parts=("text",))
    assert type(parts.text_encoder).__name__ == "LlavaForConditionalGeneration"
    assert parts.image_processor is not None
    assert load_components(folder.path, parts=("transformer",)).image_processor is None


@pytest.mark.parametrize("kind", CONDITION_TYPES)
def test_prompt_embeddings_equal_diffusers_encode_prompt(official, kind):
    from PIL import Image

    from hvctl.models.loading import load_components
    from hvctl.models.text import IMAGE_TOKEN_STRIDE, ImagePromptEncoder

    p = load_components(official[kind], parts=("text",), dtype=torch.float32)
    encode = ImagePromptEncoder(p.tokenizer, p.text_encoder, p.tokenizer_2, p.text_encoder_2, p.image_processor,
                                condition=kind, text_len=TEXT_LEN)
    prefix = p.tokenizer(encode.template.prefix)["input_ids"]
    assert p.tokenizer.convert_ids_to_tokens(prefix[encode.image_start]) == "<image>" and len(prefix) == encode.crop_start
    assert encode.image_len == 16 and encode.assistant_header == 4 and encode.stride == IMAGE_TOKEN_STRIDE[kind]

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)]
    long_prompt = " ".join(["a cyan square moves slowly up"] * 8)  # truncated: its assistant header is cut off
    assert len(p.tokenizer(long_prompt)["input_ids"]) > TEXT_LEN
    prompts = [PROMPT, long_prompt]
    ours = encode(prompts, images)  # one batch; diffusers goes one prompt at a time (its crop breaks on mixed truncation)
    assert ours.llm_states.shape == (2, 16 // encode.stride + TEXT_LEN - 4, 64)

    pipe = diffusers_pipeline(official[kind])
    for i, prompt in enumerate(prompts):
        states, pooled, mask = pipe.encode_prompt(image=Image.fromarray(images[i]), prompt=prompt, device="cpu",
                                                  prompt_template=diffusers_template(encode), max_sequence_length=TEXT_LEN,
                                                  image_embed_interleave=encode.stride)
        torch.testing.assert_close(ours.llm_states[i:i + 1], states)
        torch.testing.assert_close(ours.llm_mask[i:i + 1], mask)
        torch.testing.assert_close(ours.pooled[i:i + 1], pooled)
    # The image matters: the image tokens' states, and through attention the prompt's.
    other = encode(prompts[:1], [images[1]])
    prompt_states = slice(16 // encode.stride, None)
    assert (other.llm_states[0, prompt_states] - ours.llm_states[0, prompt_states]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", CONDITION_TYPES)
def test_sampled_latents_equal_diffusers(official, first_frame, kind):
    """token_replace with its embedded guidance; latent_concat with true classifier-free guidance, whose
    negative prompt the LLaVA reads with a black image, as diffusers does. diffusers' output_type="latent"
    drops latent_concat's first latent frame (the image's), so that frame is left out of the comparison."""
    from PIL import Image

    from hvctl.models.vae import encode_posterior

    cfg = kind == "latent_concat"
    settings = dict(guidance_scale=3.0, negative_prompt="a blurry video") if cfg else dict(embedded_guidance=6.0)
    t2v = hvctl_t2v(official[kind], first_frame, seed=3, **settings)
    assert t2v.r.flow_shift == 7.0  # the official i2v shift, the folder's scheduler's too
    ours = t2v.latents([3])

    image = read_image(first_frame)
    theirs = diffusers_pipeline(official[kind])(
        image=Image.fromarray(image), prompt=PROMPT, height=32, width=32, num_frames=5, num_inference_steps=2,
        negative_prompt=settings.get("negative_prompt"), true_cfg_scale=settings.get("guidance_scale", 1.0),
        guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(3), output_type="latent",
        prompt_template=diffusers_template(t2v.encode), max_sequence_length=TEXT_LEN,
    ).frames
    assert ours.shape == (1, 4, 2, 4, 4)
    torch.testing.assert_close(ours[:, :, 1:] if cfg else ours, theirs, atol=1e-5, rtol=1e-4)
    if not cfg:  # frame 0 is the image's latent, scaled once (like the training latents)
        torch.testing.assert_close(ours[0, :, :1], encode_posterior(t2v.parts.vae, image[None])[0])
    # The comparison means something: another seed moves the latents far beyond the tolerance.
    assert (t2v.latents([4]) - ours).abs().max() > 1e-2


@pytest.mark.slow
def test_hvctl_i2v_cli_runs_an_official_folder(official, first_frame, tmp_path):
    out = tmp_path / "v.mp4"
    done = run_cli("i2v", first_frame, PROMPT, "--model", official["token_replace"], "--frames", 5, "--steps", 2,
                   "--height", 32, "--width", 32, "--text-len", TEXT_LEN, "--seed", 1, "-o", out, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["videos"][0]["path"] == str(out)
    assert read_video(out)[0].shape == (5, 32, 32, 3)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["settings"]["embedded_guidance"] == 6.0 and sidecar["video"]["frames"] == 5


def test_what_hvctl_cannot_do_with_it_is_one_line(official, tmp_path):
    import shutil

    from hvctl.encode import EncodeRecipe, Encoder
    from hvctl.errors import HvctlError
    from hvctl.models.loading import load_components

    # The latent cache holds text features per caption; this LLaVA's depend on the image too.
    with pytest.raises(HvctlError, match="reads each prompt with an image"):
        Encoder(EncodeRecipe(), official["token_replace"], TEXT_LEN)

    broken = shutil.copytree(official["token_replace"], tmp_path / "broken")
    index = json.loads((broken / "model_index.json").read_text())
    del index["image_processor"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(HvctlError, match="no 'image_processor' component"):
        load_components(broken, parts=("text",))
