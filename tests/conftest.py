import os
import subprocess
import sys

import pytest

# Tests never touch the user's cache and never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Under pytest-xdist (pyproject's addopts) the workers share the cores: one torch thread each, in
# the worker and in the processes it starts, instead of every worker's threads on every core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def hvctl_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hvctl-home")
    os.environ["HVCTL_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny model without guidance embedding (true classifier-free guidance)."""
    from hvctl.models.presets import init_model

    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_guided_model(tmp_path_factory):
    """A tiny guidance-distilled model (embedded guidance)."""
    from hvctl.models.presets import init_model

    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny-guided", guidance_embeds=True, seed=1)


def run_cli(*args, cwd=None, timeout=300):
    """Run `hvctl` as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "hvctl", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
        env={**os.environ, "CI": "1"},
    )


CHAT_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n{% endif %}"
)


def _tiny_llama(vocab_size):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """A randomly initialised LLaVA folder (CLIP vision tower, Llama text) with its processor: what
    `AutoModelForImageTextToText` and `AutoProcessor` load, built without any download."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from hvctl.models.tokenizers import build_llama_tokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-vlm"
    tokenizer = build_llama_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, chat_template=CHAT_TEMPLATE,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_tiny_llama(len(tokenizer)), vision_feature_layer=-1,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """A randomly initialised Llama causal LM folder with a chat template, built without any download."""
    import torch
    from transformers import LlamaForCausalLM

    from hvctl.models.tokenizers import build_llama_tokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-llm"
    tokenizer = build_llama_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    LlamaForCausalLM(_tiny_llama(len(tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def small_cache(root, model, *, videos, images, seed, frames=5):
    """Toy samples at 32x32, rendered into root/data and encoded by `model` into root/cache."""
    from hvctl.encode import EncodeRecipe, encode
    from hvctl.toy.render import render_dataset

    render_dataset(root / "data", videos=videos, images=images, seed=seed, split="train", sizes=[(32, 32)])
    encode(EncodeRecipe(manifest=root / "data" / "manifest.jsonl", out=root / "cache", model=model,
                        aspect_buckets=[(32, 32)], frame_buckets=[frames], caption_variants=2))
    return root / "cache"
