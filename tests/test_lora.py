"""LoRA: trained through peft, saved in diffusers' format, loaded by generate, converted to musubi-tuner's."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli, small_cache
from hvctl.video import read_video


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("lora")
    small_cache(root, tiny_model, videos=4, images=4, seed=8)
    recipe = root / "lora.yaml"
    recipe.write_text("\n".join([
        "kind: train", "target: dit", f"model: {tiny_model}", f"out: {root / 'run'}", "steps: 6", "seed: 2",
        "log_every: 1", "optim:", "  lr: 0.01", "data:", f"  cache: {root / 'cache'}", "  batch_size: 2",
        "checkpoint:", "  every: 3", "  keep_last: 1", "lora:", "  rank: 4", "  alpha: 8",
    ]) + "\n")
    done = run_cli("train", recipe, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), root


@pytest.mark.slow
def test_a_lora_run_resumes_to_the_uninterrupted_adapter(lora_run, tmp_path):
    report, root = lora_run
    recipe = tmp_path / "lora.yaml"
    recipe.write_text((root / "lora.yaml").read_text().replace(f"out: {root / 'run'}", f"out: {tmp_path / 'run'}"))
    first = run_cli("train", recipe, "--steps", 3)  # stops at the step-3 checkpoint, as a killed run would
    assert first.returncode == 0, first.stderr
    second = run_cli("train", recipe, "--json")
    assert second.returncode == 0, second.stderr
    resumed = json.loads(second.stdout)
    assert resumed["resumed_from"] == 3
    a, b = load_file(report["lora"]), load_file(resumed["lora"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_training_changes_only_the_adapter_and_saves_it_in_diffusers_format(lora_run, tiny_model):
    report, root = lora_run
    lora = load_file(report["lora"])
    assert lora and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    assert any(".attn.to_q.lora_A." in k for k in lora) and any(".attn.add_q_proj.lora_B." in k for k in lora)
    assert all(v.shape[0] == 4 for k, v in lora.items() if ".lora_A." in k)  # rank 4
    # The exported model folder has the adapter merged in: it differs from the base exactly
    # where LoRA went, and nowhere else.
    base = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    merged = load_file(str(root / "run" / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(any(t in k for t in (".to_q.", ".to_k.", ".to_v.", ".to_out.0.", ".add_", ".to_add_out."))
                           for k in changed)
    assert "transformer_blocks.0.ff.net.0.proj.weight" not in changed


@pytest.mark.slow
def test_generate_with_the_lora_file_matches_the_merged_model(lora_run, tiny_model, tmp_path):
    report, root = lora_run
    musubi = tmp_path / "musubi.safetensors"  # the same adapter in musubi-tuner's format: fused q/k/v, official names
    done = run_cli("lora", "convert", report["lora"], musubi, "--to", "musubi", "--model", tiny_model)
    assert done.returncode == 0, done.stderr
    common = ["a red circle moves left on a black background", "--steps", "2", "--frames", "5", "--height", "32",
              "--width", "32", "--seed", "5", "--dtype", "float32", "--json"]
    outputs = {}
    for name, extra in {"base": ["--model", tiny_model], "lora": ["--model", tiny_model, "--lora", report["lora"]],
                        "merged": ["--model", root / "run" / "model"],
                        "off": ["--model", tiny_model, "--lora", f"{report['lora']}:0.0"],
                        "musubi": ["--model", tiny_model, "--lora", musubi]}.items():
        out = tmp_path / f"{name}.mp4"
        done = run_cli("generate", *common, *extra, "-o", out)
        assert done.returncode == 0, done.stderr
        if name == "musubi":  # the format is detected from the keys and reported
            loaded = json.loads(done.stdout)["loras"]
            assert [(x["format"], x["modules"]) for x in loaded] == [("musubi-tuner/kohya", 26)]
        outputs[name] = read_video(out)[0].astype(np.int16)
    # Mean differences: float rounding (W + BA against W + B(A x)) can tip a few H.264 blocks by a
    # few levels, which a max over pixels would read as a mismatch.
    differ = lambda a, b: float(np.abs(outputs[a] - outputs[b]).mean())  # noqa: E731
    effect = differ("lora", "base")
    assert effect > 1.0  # the adapter changes the video
    assert differ("lora", "merged") < 0.1 * effect  # applied as a file or merged: the same video
    assert differ("off", "base") < 0.1 * effect  # scale 0: no change
    assert np.array_equal(outputs["musubi"], outputs["lora"])  # split back into the very same adapters


@pytest.mark.slow
def test_kohya_conversion_writes_musubi_names_and_round_trips(lora_run, tiny_model, tmp_path):
    report, _ = lora_run
    kohya = tmp_path / "kohya.safetensors"
    done = run_cli("lora", "convert", report["lora"], kohya, "--to", "kohya", "--model", tiny_model)
    assert done.returncode == 0, done.stderr
    converted = load_file(str(kohya))
    # what musubi-tuner names the official modules (and ComfyUI maps): not diffusers' names
    assert "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight" in converted
    assert "lora_unet_double_blocks_0_img_attn_qkv.alpha" in converted
    assert not any(k.startswith("lora_unet_transformer_blocks") for k in converted)
    back = tmp_path / "back.safetensors"
    assert run_cli("lora", "convert", kohya, back, "--to", "diffusers", "--model", tiny_model).returncode == 0
    original, restored = load_file(report["lora"]), load_file(str(back))
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    # A file in kohya's naming over diffusers' module names (what hvctl wrote before) still loads.
    old = tmp_path / "old-kohya.safetensors"
    save_file({f"lora_unet_{k.removeprefix('transformer.').rsplit('.lora_', 1)[0].replace('.', '_')}."
               f"{'lora_down' if '.lora_A.' in k else 'lora_up'}.weight": v for k, v in original.items()}, str(old))
    assert run_cli("lora", "convert", old, back, "--to", "diffusers", "--model", tiny_model).returncode == 0
    restored = load_file(str(back))
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)


@pytest.mark.slow
def test_bad_lora_files_are_one_line(tiny_model, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    done = run_cli("generate", "x", "--model", tiny_model, "--lora", junk, "--steps", "1")
    assert done.returncode == 1 and "junk.safetensors: not a safetensors LoRA file" in done.stderr
    foreign = tmp_path / "foreign.safetensors"
    save_file({"transformer.no_such_block.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.no_such_block.to_q.lora_B.weight": torch.zeros(8, 4)}, str(foreign))
    done = run_cli("generate", "x", "--model", tiny_model, "--lora", foreign, "--steps", "1")
    assert done.returncode == 1 and "foreign.safetensors" in done.stderr and "Traceback" not in done.stderr
