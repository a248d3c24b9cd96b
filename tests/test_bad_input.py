"""Bad input, as a hostile but ordinary user gives it: one `error:` line naming the culprit, a
non-zero exit, no traceback, no change to any file that existed before. And full (ENOSPC) and
read-only (EROFS) disks, on a small tmpfs, for every command that writes much."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hvctl.cli import main


def hvctl(*args) -> tuple[int, str, str]:
    """Run the CLI in this process, as `hvctl ARGS` does; an uncaught exception (a traceback) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["hvctl", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def assert_one_error(code, out, err, culprit):
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code != 0, (out, err)
    assert len(errors) == 1, err
    assert "Traceback" not in err and "Traceback" not in out, err
    assert culprit in errors[0], f"{culprit!r} not named in {errors[0]!r}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files the bad invocations aim at: a file, folders, a toy manifest, a LoRA, a truncated model."""
    import torch
    from safetensors.torch import save_file

    from hvctl.models.default import default_model_dir
    from hvctl.toy.render import render_dataset

    root = tmp_path_factory.mktemp("bad-input")
    (root / "afile").write_text("not a folder\n")
    (root / "adir").mkdir()
    (root / "adir" / "inside.txt").write_text("keep\n")
    (root / "dir.mp4").mkdir()
    render_dataset(root / "data", videos=0, images=2, seed=0, split="train", sizes=[(32, 32)], loss_masks=False)
    (root / "data" / "empty.jsonl").write_text("")
    missing = {"id": "gone", "media": "media/gone.png", "kind": "image", "width": 32, "height": 32, "frames": 1,
               "caption": "a cat"}
    (root / "data" / "missing.jsonl").write_text(json.dumps(missing) + "\n")
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(2, 8),
               "transformer.proj_out.lora_B.weight": torch.zeros(8, 2)}, str(root / "lora.safetensors"))
    shutil.copytree(default_model_dir(), root / "truncated")
    weights = root / "truncated" / "transformer" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    train = ("kind: train\nmodel: {model}\nout: {out}\nsteps: {steps}\noptim:\n  lr: {lr}\ndata:\n  batch_size: {batch}\n"
             "checkpoint:\n  every: {every}\n")
    good = dict(model=default_model_dir(), out=root / "run", steps=2, lr=0.001, batch=1, every=1)
    for name, bad in (("steps0", {"steps": 0}), ("every0", {"every": 0}), ("lr-1", {"lr": -1}), ("lrnan", {"lr": ".nan"}),
                      ("batch0", {"batch": 0}), ("outfile", {"out": root / "afile"})):
        (root / f"{name}.yaml").write_text(train.format(**{**good, **bad}))
    (root / "gen.yaml").write_text("kind: generate\nflow_shift: .inf\n")
    return root


M = "data/manifest.jsonl"
BAD = [
    # generate: outputs checked before any model loads, numbers checked when the recipe loads
    (["generate", "a cat", "-o", "afile/x.mp4"], "afile"),
    (["generate", "a cat", "-o", "dir.mp4/"], "dir.mp4"),
    (["generate", "a cat", "-o", "adir"], "adir"),
    (["generate", "a cat", "-o", "x.avi"], "x.avi"),
    (["generate", "a cat", "--seed", str(2**64)], "--seed"),
    (["generate", "a cat", "--seed", "-1"], "--seed"),
    (["generate", "a cat", "--flow-shift", "0"], "--flow-shift"),
    (["generate", "a cat", "--flow-shift", "-1"], "--flow-shift"),
    (["generate", "a cat", "--flow-shift", "nan"], "--flow-shift"),
    (["generate", "a cat", "--guidance-scale", "inf"], "--guidance-scale"),
    (["generate", "a cat", "--guidance-scale", "0.5"], "--guidance-scale"),
    (["generate", "a cat", "--set", "embedded_guidance=-2"], "embedded_guidance"),
    (["generate", "a cat", "--steps", "0"], "--steps"),
    (["generate", "a cat", "--frames", "6"], "frames"),
    (["generate", "a cat", "--height", "40"], "height"),
    (["generate", "a cat", "--num-videos", "0"], "--num-videos"),
    (["generate", "a cat", "--text-len", "0"], "--text-len"),
    (["generate", "   "], "prompt"),
    (["generate", "a cat", "--lora", "lora.safetensors:abc"], "abc"),
    (["generate", "a cat", "--lora", "lora.safetensors:nan"], "scale"),
    (["generate", "a cat", "--lora", "nolora.safetensors"], "nolora.safetensors"),
    (["generate", "a cat", "-r", "gen.yaml"], "gen.yaml"),
    # encode
    (["encode", M, "--out", "afile"], "afile"),
    (["encode", M, "--out", "afile/cache"], "afile"),
    (["encode", "data/empty.jsonl", "--out", "cache"], "empty.jsonl"),
    (["encode", "data/missing.jsonl", "--out", "cache-missing"], "1 of 1 samples failed"),
    (["encode", M, "--out", "cache", "--set", "samples_per_shard=0"], "samples_per_shard"),
    (["encode", M, "--out", "cache", "--shard", "3/2"], "--shard"),
    # toy render
    (["toy", "render", "afile", "--images", "1"], "afile"),
    (["toy", "render", "afile/sub", "--images", "1"], "afile"),
    (["toy", "render", "toy", "--images", "1", "--seed", str(2**64)], "--seed"),
    (["toy", "render", "toy", "--images", "1", "--size", "10x10"], "10x10"),
    # model
    (["model", "init", "afile", "--preset", "tiny"], "afile"),
    (["model", "init", "afile/m", "--preset", "tiny"], "afile"),
    (["model", "init", "adir", "--preset", "tiny"], "adir"),
    (["model", "init", "m", "--preset", "tiny", "--seed", str(2**64)], "--seed"),
    (["model", "info", "truncated"], "diffusion_pytorch_model.safetensors"),
    (["model", "compose", "truncated", "afile"], "afile"),
    # eval
    (["eval", "toy", "--out", "afile", "--prompts", "1"], "afile"),
    (["eval", "toy", "--prompts", "1", "--flow-shift", "nan"], "--flow-shift"),
    # lora
    (["lora", "convert", "lora.safetensors", "lora.safetensors", "--to", "kohya"], "lora.safetensors"),
    (["lora", "convert", "lora.safetensors", "adir", "--to", "kohya"], "adir"),
    (["lora", "convert", "nolora.safetensors", "k.safetensors", "--to", "kohya"], "nolora.safetensors"),
    # curate, caption
    (["curate", M, "--out", M], "manifest.jsonl"),
    (["curate", M, "--out", "afile/kept.jsonl"], "afile"),
    (["caption", M, "--out", "data/media"], "media"),
    (["caption", M, "--set", "save_every=0"], "save_every"),
    # prefer
    (["prefer", "data/missing.txt", "--out", "pref"], "missing.txt"),
    (["prefer", M, "--out", "afile"], "afile"),
    (["prefer", M, "--out", "pref", "--videos", "1"], "videos"),
    (["prefer", M, "--out", "pref", "--scorer", "oracle"], "oracle"),
    # train: each bad number refused when the recipe loads, with its file and key
    (["train", "steps0.yaml"], "steps0.yaml: 'steps'"),
    (["train", "every0.yaml"], "every0.yaml: 'checkpoint.every'"),
    (["train", "lr-1.yaml"], "lr-1.yaml: 'optim.lr'"),
    (["train", "lrnan.yaml"], "lrnan.yaml: 'optim.lr'"),
    (["train", "batch0.yaml"], "batch0.yaml: 'data.batch_size'"),
    (["train", "outfile.yaml"], "afile"),
    (["distill", "steps0.yaml"], "kind"),
]


@pytest.mark.parametrize("argv, culprit", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_error_line(world, monkeypatch, argv, culprit):
    monkeypatch.chdir(world)
    before = snapshot(world)
    assert_one_error(*hvctl(*argv), culprit)
    after = snapshot(world)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"changed or removed: {changed}"


def test_the_table_covers_every_writing_subcommand():
    commands = {argv[0] if argv[0] not in ("model", "toy", "eval", "lora") else " ".join(argv[:2]) for argv, _ in BAD}
    assert len(BAD) >= 40
    assert {"generate", "encode", "toy render", "model init", "model info", "model compose", "eval toy", "lora convert",
            "curate", "caption", "prefer", "train"} <= commands


def test_the_sampler_stops_on_non_finite_latents():
    import torch

    from hvctl.errors import HvctlError
    from hvctl.models.text import TextConditions
    from hvctl.sampling import Conditions, FlowMatchEulerSampler

    class Exploding(torch.nn.Module):
        """A denoiser whose velocity overflows at the second step."""
        dtype = torch.float32
        config = type("Config", (), {"guidance_embeds": False})()

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, hidden_states, **_):
            self.calls += 1
            return (torch.full_like(hidden_states, 1.0 if self.calls < 2 else float("inf")),)

    text = TextConditions(torch.zeros(1, 4, 8), torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 8))
    with pytest.raises(HvctlError, match=r"sampling step 2/4: the latents are not finite"):
        FlowMatchEulerSampler(steps=4, shift=7.0)(Exploding(), torch.zeros(1, 4, 1, 2, 2), Conditions(text))


def test_a_prompt_longer_than_the_text_length_warns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = hvctl("generate", " ".join(["red"] * 40), "--text-len", "8", "--steps", "1", "-o", "v.mp4")
    assert code == 0, err
    assert "warning: the prompt is" in err and "only the first 8 are used" in err


def test_metrics_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    from hvctl.train.trainer import MetricsLog

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"st')
    log = MetricsLog(tmp_path, tensorboard=False, resume_step=2)
    log.write(3, {"loss": 0.5})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 0.5)]


def test_a_cache_from_other_encoders_is_refused(tmp_path):
    from hvctl.cache import CacheEntry, check_cache_encoders, encoder_identities
    from hvctl.errors import HvctlError
    from hvctl.models.default import default_model_dir

    mine = encoder_identities(default_model_dir())
    entry = lambda **ids: CacheEntry(key="k", id="s1", kind="image", bucket=(32, 32, 1), text_variants=1, shard="x", **ids)  # noqa: E731
    check_cache_encoders(tmp_path, [entry(**mine), entry()], default_model_dir())  # its own, and an older cache's
    with pytest.raises(HvctlError, match=r"encoded by another VAE .*accept_foreign_cache"):
        check_cache_encoders(tmp_path, [entry(**{**mine, "vae": "sha256:other"})], default_model_dir())
    with pytest.raises(HvctlError, match=r"encoded by another text encoders"):
        check_cache_encoders(tmp_path, [entry(**{**mine, "text_encoders": "sha256:other"})], default_model_dir())


# --- full and read-only disks -------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at tmp_path/disk (root only); yields (mount point, fill, make_read_only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def fill(room: int = 0) -> None:
        """Leave `room` bytes free."""
        stat = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - room))

    def read_only() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

    try:
        yield disk, fill, read_only
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def disk_case(disk, fill, read_only, mode, argv, culprit, room=16 << 10):
    (disk / "committed.txt").write_text("written before\n")
    if mode == "full":
        fill(room)
    else:
        read_only()
    before = snapshot(disk)
    code, out, err = hvctl(*argv)
    assert_one_error(code, out, err, culprit)
    assert ("no space left on device" if mode == "full" else "read-only file system") in err, err
    after = snapshot(disk)
    assert all(after.get(name) == digest for name, digest in before.items()), "a committed file changed"
    leftovers = [p for p in disk.rglob("*") if ".tmp" in p.name]
    assert not leftovers, f"temporary files left: {leftovers}"


@pytest.mark.parametrize("mode", ["full", "read-only"])
def test_generate_on_a_bad_disk(small_disk, mode):
    disk, fill, read_only = small_disk
    # A fixed seed and 2 KiB of room: a random seed's one-step video was sometimes small enough to fit in 16 KiB.
    disk_case(disk, fill, read_only, mode, ["generate", "a cat", "--steps", "1", "--seed", "0", "-o", disk / "out" / "v.mp4"],
              str(disk), room=2 << 10)


@pytest.mark.parametrize("mode", ["full", "read-only"])
def test_toy_render_on_a_bad_disk(small_disk, mode):
    disk, fill, read_only = small_disk
    disk_case(disk, fill, read_only, mode, ["toy", "render", disk / "toy", "--images", "4", "--videos", "2"], str(disk))


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from hvctl.toy.render import render_dataset

    root = tmp_path_factory.mktemp("disk-data")
    render_dataset(root / "data", videos=0, images=2, seed=0, split="train", sizes=[(32, 32)], loss_masks=False)
    return root / "data"


@pytest.mark.parametrize("mode", ["full", "read-only"])
def test_encode_on_a_bad_disk(small_disk, toy_data, mode):
    disk, fill, read_only = small_disk
    disk_case(disk, fill, read_only, mode, ["encode", toy_data / "manifest.jsonl", "--out", disk / "cache",
                                            "--set", "aspect_buckets=[[32,32]]"], str(disk), room=4 << 10)


@pytest.mark.parametrize("mode", ["full", "read-only"])
def test_caption_on_a_bad_disk(small_disk, toy_data, mode):
    disk, fill, read_only = small_disk
    shutil.copytree(toy_data, disk / "data")  # captioned in place: the manifest must survive whole
    manifest = disk / "data" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**r, "caption": None}) + "\n" for r in records) * 1)
    disk_case(disk, fill, read_only, mode, ["caption", manifest], str(manifest), room=0)


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory, toy_data):
    from hvctl.encode import EncodeRecipe, encode
    from hvctl.models.default import default_model_dir

    cache = tmp_path_factory.mktemp("disk-cache") / "cache"
    encode(EncodeRecipe(manifest=toy_data / "manifest.jsonl", out=cache, model=default_model_dir(),
                        aspect_buckets=[(32, 32)], caption_variants=1), progress=False)
    return cache


@pytest.mark.parametrize("mode", ["full", "read-only"])
def test_train_on_a_bad_disk(small_disk, toy_cache, tmp_path, mode):
    from hvctl.models.default import default_model_dir

    disk, fill, read_only = small_disk
    recipe = tmp_path / "train.yaml"
    recipe.write_text(f"kind: train\nmodel: {default_model_dir()}\nout: {disk / 'run'}\nsteps: 1\ntensorboard: false\n"
                      f"data:\n  cache: {toy_cache}\n  batch_size: 1\ncheckpoint:\n  every: 1\n")
    disk_case(disk, fill, read_only, mode, ["train", recipe], str(disk))
