"""Inference accelerators (hvctl/accelerate.py) on tiny models: each gives the plain result (or
stays within its stated bound), and each does what it says (weights moved, steps skipped, bytes halved)."""

import json

import pytest
import torch

from conftest import run_cli
from hvctl.generate import GenerateRecipe, TextToVideo, prepare
from hvctl.models.loading import resolve_device_dtype

PROMPT = "a red circle moves left on a black background"
SIZE = dict(height=32, width=48, frames=9, steps=4, seed=3, text_len=32)


def t2v_for(model, **settings) -> TextToVideo:
    r, model_dir = prepare(GenerateRecipe(model=model, prompt=PROMPT, dtype="float32", device="cpu", **{**SIZE, **settings}))
    return TextToVideo(model_dir, r, *resolve_device_dtype(r.device, r.dtype))


def sample(t2v: TextToVideo):
    conditions = t2v.conditions([PROMPT])
    t2v.release_text_encoders()
    latents = t2v.latents([3], conditions)
    return latents, t2v.frames(latents)


@pytest.fixture(scope="module")
def plain(tiny_model):
    return sample(t2v_for(tiny_model))


def relative_rms(a, b) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


# -- attention --------------------------------------------------------------------------------------


def test_native_attention_equals_sdpa(tiny_model, plain):
    t2v = t2v_for(tiny_model, attention="native")
    assert t2v.accelerators.applied == {**t2v.accelerators.applied, "attention": "native", "attention_backend": "_native_math"}
    latents, _ = sample(t2v)
    # Torch's math kernel against its fused CPU kernel: equal up to float32 rounding.
    assert torch.allclose(latents, plain[0], atol=1e-5, rtol=0), (latents - plain[0]).abs().max()
    auto = t2v_for(tiny_model).accelerators.applied
    assert auto["attention"] == "sdpa" and auto["attention_backend"] == "native"  # auto on a CPU


def test_every_attention_goes_through_the_chosen_backend(tiny_model, monkeypatch):
    from diffusers.models import attention_dispatch

    seen = []
    original = attention_dispatch.dispatch_attention_fn

    def spy(*args, backend=None, **kwargs):
        seen.append(str(getattr(backend, "value", backend)))
        return original(*args, backend=backend, **kwargs)

    monkeypatch.setattr("diffusers.models.transformers.transformer_hunyuan_video.dispatch_attention_fn", spy)
    t2v = t2v_for(tiny_model, attention="native", steps=1)
    t2v.latents([3])
    blocks = len(t2v.parts.transformer.transformer_blocks) + len(t2v.parts.transformer.single_transformer_blocks)
    assert seen.count("_native_math") >= blocks and set(seen) == {"_native_math"}


@pytest.mark.slow
@pytest.mark.parametrize("name, package", [("flash", "flash-attn"), ("flash3", "flash-attn 3"), ("sage", "sageattention")])
def test_a_missing_attention_package_is_one_line_naming_it(tiny_model, tmp_path, name, package):
    from hvctl.accelerate import _installed

    if _installed(name):
        pytest.skip(f"{package} is installed here")
    result = run_cli("generate", "x", "-m", tiny_model, "--attention", name, "--steps", "1", "-o", tmp_path / "a.mp4")
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --attention {name}: ") and package in line
    assert not (tmp_path / "a.mp4").exists()


# -- offload ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_every_offload_mode_gives_exactly_the_plain_result(tiny_model, plain, mode):
    latents, frames = sample(t2v_for(tiny_model, offload=mode))
    assert torch.equal(latents, plain[0])
    assert (frames == plain[1]).all()


def test_sequential_offload_keeps_weights_off_the_device_between_uses(tiny_model, monkeypatch):
    """accelerate's sequential offload keeps each weight on the meta device (its values in a CPU
    map) and onloads it for its own module's forward only."""
    devices = []
    forward = torch.nn.Linear.forward

    def recording(self, x):
        devices.append(self.weight.device.type)
        return forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)  # before the hooks capture forward
    t2v = t2v_for(tiny_model, offload="sequential", steps=1)
    sample(t2v)
    assert devices and set(devices) == {"cpu"}  # in use: on the execution device
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        linear = [m for m in getattr(t2v.parts, name).modules() if isinstance(m, torch.nn.Linear)]
        assert linear and all(m.weight.device.type == "meta" for m in linear), name  # between uses: off it


def test_model_offload_onloads_one_component_at_a_time(tiny_model, monkeypatch):
    """Component offload (accelerate's hooks): a component moves to the device just before it
    runs, every other one has gone back to the CPU by then, and the text encoders leave as soon
    as the prompt is encoded."""
    t2v = t2v_for(tiny_model, offload="model", steps=1)
    names = {id(getattr(t2v.parts, n)): n for n in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    events, move = [], torch.nn.Module.to

    def recording(self, *args, **kwargs):
        if id(self) in names:
            events.append((names[id(self)], "cpu" if str(args[0]) == "cpu" else "on"))
        return move(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording)
    # The device is the CPU here, so record the hooks' moves: the execution device is another object.
    for hook in t2v.offload.hooks.values():
        hook.hook.execution_device = "cpu:0"
    conditions = t2v.conditions([PROMPT])
    t2v.release_text_encoders()
    released = list(events)
    t2v.frames(t2v.latents([3], conditions))
    onloaded = set()
    for name, where in events:
        if where == "on":
            assert not onloaded - {name}, f"{name} onloaded while {onloaded} still on the device"
            onloaded.add(name)
        else:
            onloaded.discard(name)
    assert [n for n, w in events if w == "on"] == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    assert ("text_encoder", "cpu") in released and released[-1] == ("text_encoder_2", "cpu")


def test_group_offload_streams_the_transformer_block_by_block(tiny_model, monkeypatch):
    """diffusers' group offloading: at most one block group (beside the model's own small modules)
    is onloaded at any time, and nothing is left onloaded after a step."""
    from diffusers.hooks.group_offloading import ModuleGroup

    on, peak, onload, offload = set(), [0], ModuleGroup.onload_, ModuleGroup.offload_

    def onload_(self):
        on.add(id(self))
        peak[0] = max(peak[0], len(on))
        return onload(self)

    def offload_(self):
        on.discard(id(self))
        return offload(self)

    monkeypatch.setattr(ModuleGroup, "onload_", onload_)
    monkeypatch.setattr(ModuleGroup, "offload_", offload_)
    t2v = t2v_for(tiny_model, offload="group", steps=2)
    t2v.latents([3])
    assert peak[0] == 2 and not on


# -- FP8 weights ------------------------------------------------------------------------------------


def test_fp8_weights_halve_the_bytes_of_bf16(tiny_model):
    """Every weight that layerwise casting stores in FP8 takes half its bf16 bytes; on the 13B
    configuration those are 97% of the bytes (the text refiner and embedders keep theirs), so the
    whole DiT takes 51.4% of its bf16 bytes: 13.2 GB instead of 25.6 GB."""
    from diffusers import HunyuanVideoTransformer3DModel

    from hvctl.accelerate import apply_weights_dtype, weight_bytes
    from hvctl.models.presets import PRESETS

    with torch.device("meta"):
        bf16 = HunyuanVideoTransformer3DModel(**PRESETS["hunyuan-t2v-720p"].transformer).to(torch.bfloat16)
        fp8 = HunyuanVideoTransformer3DModel(**PRESETS["hunyuan-t2v-720p"].transformer).to(torch.bfloat16)
    apply_weights_dtype(fp8, torch.float8_e4m3fn, torch.bfloat16)
    halved = kept = 0
    for (name, a), b in zip(bf16.named_parameters(), fp8.parameters()):
        if b.dtype == torch.float8_e4m3fn:
            halved += a.numel() * a.element_size()
            assert b.numel() * b.element_size() * 2 == a.numel() * a.element_size()
        else:
            kept += a.numel() * a.element_size()
            in_block_linear = name.startswith(("transformer_blocks", "single_transformer_blocks")) and \
                isinstance(fp8.get_submodule(name.rpartition(".")[0]), torch.nn.Linear)
            assert not in_block_linear, name  # only embedders, the output layer and norms keep their dtype
    assert halved / (halved + kept) > 0.97
    assert 0.5 < weight_bytes(fp8) / weight_bytes(bf16) < 0.515


@pytest.mark.slow
def test_fp8_weights_stay_within_their_bound_of_full_precision(tiny_model, plain):
    """Stated bound: FP8 (e4m3) storage moves the latents by under 5% (relative RMS) on the tiny
    model, within 20x of what bf16 storage moves them (bf16 has 3 more mantissa bits: ~8x finer)."""
    fp8 = t2v_for(tiny_model, weights_dtype="float8_e4m3fn")
    bf16 = t2v_for(tiny_model, weights_dtype="bfloat16")
    assert fp8.accelerators.applied["transformer_weight_bytes"] < bf16.accelerators.applied["transformer_weight_bytes"]
    fp8_error = relative_rms(sample(fp8)[0], plain[0])
    bf16_error = relative_rms(sample(bf16)[0], plain[0])
    assert 0 < bf16_error < fp8_error < 0.05
    assert fp8_error < 20 * bf16_error


@pytest.mark.slow
def test_bad_weights_dtype_is_one_line(tiny_model, tmp_path):
    result = run_cli("generate", "x", "-m", tiny_model, "--weights-dtype", "int8", "--steps", "1", "-o", tmp_path / "a.mp4")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: --weights-dtype int8: not a floating-point torch dtype (float8_e4m3fn, float8_e5m2, bfloat16, float16, float32)"]


# -- step caches ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["teacache", "fbc"])
def test_a_zero_threshold_equals_the_uncached_run(tiny_model, plain, kind):
    t2v = t2v_for(tiny_model, step_cache=f"{kind}:0")
    assert torch.equal(sample(t2v)[0], plain[0])
    assert t2v.step_cache.summary() == {"kind": kind, "threshold": 0.0, "computed": SIZE["steps"], "skipped": 0}


@pytest.mark.slow
@pytest.mark.parametrize("kind, threshold", [("teacache", 0.3), ("fbc", 2.0)])
def test_a_positive_threshold_skips_steps_and_counts_them(tiny_model, plain, kind, threshold):
    t2v = t2v_for(tiny_model, step_cache=f"{kind}:{threshold}", steps=8)
    latents, _ = sample(t2v)
    summary = t2v.step_cache.summary()
    assert summary["skipped"] > 0 and summary["skipped"] + summary["computed"] == 8
    if kind == "teacache":  # the first and last steps always run
        assert summary["computed"] >= 2
    uncached = sample(t2v_for(tiny_model, steps=8))[0]
    assert not torch.equal(latents, uncached) and relative_rms(latents, uncached) < 0.5
    # A second video starts afresh: same seed, same skips, same result.
    again, _ = sample(t2v)
    assert torch.equal(again, latents) and t2v.step_cache.summary() == summary


@pytest.mark.slow
def test_step_cache_counts_reach_the_sidecar_and_json(tiny_model, tmp_path):
    out = tmp_path / "v.mp4"
    result = run_cli("generate", PROMPT, "-m", tiny_model, "--steps", "6", "--seed", "1", "--height", "32", "--width", "32",
                     "--frames", "5", "--step-cache", "teacache:0.3", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    video = json.loads(result.stdout)["videos"][0]
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["settings"]["step_cache"] == "teacache:0.3"
    assert sidecar["step_cache"] == video["step_cache"]
    assert video["step_cache"]["skipped"] > 0 and video["step_cache"]["computed"] + video["step_cache"]["skipped"] == 6
    assert video["accelerators"]["attention"] == "sdpa"


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [
    ("teacache", "give a threshold, e.g. teacache:0.1"),
    ("teacache:-1", "the threshold must be a finite number >= 0"),
    ("teacache:nan", "the threshold must be a finite number >= 0"),
    ("magic:1", "choose none, teacache:T or fbc:T (T a threshold >= 0)"),
])
def test_bad_step_cache_is_one_line(tiny_model, tmp_path, spec, message):
    result = run_cli("generate", "x", "-m", tiny_model, "--step-cache", spec, "--steps", "1", "-o", tmp_path / "a.mp4")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: --step-cache {spec}: {message}"]


# -- compile ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_equals_eager(tiny_model, plain):
    """Regional torch.compile (inductor) of the blocks. Compiling takes a minute or more on this CPU."""
    import shutil

    if not shutil.which("cc") and not shutil.which("gcc"):
        pytest.skip("torch.compile's inductor needs a C compiler on the CPU; none here")
    t2v = t2v_for(tiny_model, compile=True, steps=1)
    eager = t2v_for(tiny_model, steps=1)
    compiled, reference = t2v.latents([3]), eager.latents([3])
    assert torch.allclose(compiled, reference, atol=1e-4, rtol=0), (compiled - reference).abs().max()
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in t2v.parts.transformer.transformer_blocks)


# -- plan -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plan_matches_a_measured_tiny_run(tiny_model):
    """The plan's weights are the loaded bytes exactly; its time per step is within 3x of the
    measured median step (tiny models: the per-op floor dominates). The step is timed in this
    process's CPU seconds on one thread, so that other work on a shared machine (another test
    worker, say) does not stretch it."""
    import time

    from hvctl.accelerate import make_plan

    t2v = t2v_for(tiny_model)
    plan = make_plan(t2v.r, t2v.r.model, torch.device("cpu"), torch.float32)
    for name, expected in plan.weights.items():
        assert expected == sum(p.numel() * p.element_size() for p in getattr(t2v.parts, name).parameters()), name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ticks = [time.process_time()]
        t2v.latents([3], on_step=lambda _: ticks.append(time.process_time()))
    finally:
        torch.set_num_threads(threads)
    steps = sorted(b - a for a, b in zip(ticks[1:], ticks[2:]))  # the first step warms up
    measured = steps[len(steps) // 2]
    assert measured / 3 < plan.step_seconds < measured * 3, (plan.step_seconds, measured)
    assert plan.peaks["sequential"] < plan.peaks["group"] <= plan.peaks["model"] <= plan.peaks["none"]


@pytest.mark.slow
def test_plan_cli_and_offload_auto_follow_the_memory_budget(tiny_model, tmp_path):
    result = run_cli("generate", "x", "-m", tiny_model, "--plan", "--gpu-memory", "0.02", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert set(plan["peak_gib"]) == {"none", "model", "group", "sequential"} and plan["seconds_per_step"] > 0
    assert plan["fits"] == [m for m, peak in plan["peak_gib"].items() if peak <= 0.02]
    assert not list(tmp_path.iterdir())  # --plan samples and writes nothing
    # --offload auto takes the least offload that fits the budget.
    from hvctl.accelerate import GIB, make_plan

    t2v = t2v_for(tiny_model)
    peaks = make_plan(t2v.r, t2v.r.model, torch.device("cpu"), torch.float32).peaks
    budget = (peaks["model"] + peaks["none"]) / 2 / GIB  # none does not fit, model does
    assert t2v_for(tiny_model, offload="auto", gpu_memory=budget).accelerators.applied["offload"] == "model"
    assert t2v_for(tiny_model, offload="auto").accelerators.applied["offload"] == "none"  # a CPU: nothing to save


@pytest.mark.slow
def test_bad_gpu_memory_is_one_line(tiny_model):
    result = run_cli("generate", "x", "-m", tiny_model, "--plan", "--gpu-memory", "-3")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["error: --gpu-memory must be a positive number of GiB, got -3.0"]
