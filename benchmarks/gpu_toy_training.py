"""Issue 20, step 5: train toy DiTs on a GPU at GPU batch sizes and measure what they learn, in one
command that fits one device lease (docs/toy-models.md, "Step 5").

For each patch size asked for (1x1 and 2x2 by default), on the toy world's 64x64 images (or its
17-frame videos with --kind video), from the default's VAE and text encoders and a fresh DiT of the
default's shape:
1. render the training set, the 64 held-out samples of the held-out loss and the 96 eval prompts
   (`hvctl toy render`, the seeds of recipes/toy/img-p2.yaml), and encode both caches with
   `hvctl encode` in --shards processes at once; with --latent-channels K, first reduce the
   default's latent to K whitened components (`hvctl model reduce-latent`, fitted on the training
   set; docs/toy-models.md, step 2 continued) and encode with that folder;
2. train (`hvctl train`, recipes/toy/img-p2.yaml with the whole cache on the device, --batch,
   --lr, --precision): a first --probe-steps steps give the step rate, then the same run resumes to
   as many steps as fit in --minutes;
3. measure the exported model: samples/s (median of the run's logged steps), the held-out loss
   on the object at each noise level (`hvctl eval loss`), and accuracy on the eval prompts from
   noise (`hvctl eval toy`), seen / held-out.

Prints one table; OUT gets results.json and each run's DiT (transformer config and weights), which
`hvctl model compose` puts beside the default's other components (with --latent-channels, beside
those of the reduced folder under --work/models). Every step is the hvctl command a user would
type; nothing here trains or scores by itself.

    python benchmarks/gpu_toy_training.py --out $OUT                 # about 8 minutes on an H200
    python benchmarks/gpu_toy_training.py --patches 1 --minutes 5 --out $OUT
    python benchmarks/gpu_toy_training.py --latent-channels 4 --out $OUT   # the whitened 4-channel latent
    python benchmarks/gpu_toy_training.py --smoke                    # any device: every path, tiny

On the device machine, diffusers, av and importlib_metadata are not installed: carry them as wheels
(/work/.library/device/README.md) and put them on PYTHONPATH before running this.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "hvctl" / "assets" / "default-model"
SIGMAS = (0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97)


def hvctl(*args, json_out: bool = False) -> dict | None:
    """Run one hvctl command; its --json result when asked for. A failure stops the script."""
    cmd = [sys.executable, "-m", "hvctl", *map(str, args)] + (["--json"] if json_out else [])
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(f"  {time.perf_counter() - t0:6.1f} s  hvctl {' '.join(map(str, args[:2]))}", flush=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout) if json_out else None


def encode(manifest: Path, cache: Path, base: Path, shards: int, device: str) -> None:
    """`hvctl encode` in `shards` processes at once (each its own part of the manifest)."""
    cmd = [sys.executable, "-m", "hvctl", "encode", str(manifest), "--model", str(base), "--out", str(cache),
           "--recipe", str(ROOT / "recipes" / "encode" / "toy.yaml"), "--device", device]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/{shards}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(shards)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    print(f"  {time.perf_counter() - t0:6.1f} s  hvctl encode {manifest.parent.name} ({shards} shards)", flush=True)


def make_data(work: Path, kind: str, count: int, shards: int, device: str, latent_channels: int | None) -> dict[str, Path]:
    """The rendered sets, their caches, and "base": the folder whose VAE and text encoders encoded them."""
    what = ["--images", count] if kind == "image" else ["--videos", count, "--frames", 17]
    sets = {"train": (what, 41, "train"), "val": ([what[0], 64, *what[2:]], 31, "eval"),
            "eval": ([what[0], 96, *what[2:]], 0, "eval")}
    paths = {}
    for name, (amount, seed, split) in sets.items():
        folder = work / f"toy-{kind}-{name}"
        if not (folder / "manifest.jsonl").is_file():
            hvctl("toy", "render", folder, *amount, "--seed", seed, "--split", split, "--size", "64x64")
        paths[name] = folder
        if name == "train":
            paths["base"] = reduced_base(work, folder, latent_channels)
        if name != "eval":  # encode skips what an earlier run of this script finished
            encode(folder / "manifest.jsonl", work / f"{folder.name}-{paths['base'].name}-cache", paths["base"],
                   shards if name == "train" else 1, device)
        paths[f"{name}-cache"] = work / f"{folder.name}-{paths['base'].name}-cache"
    return paths


def reduced_base(work: Path, train_set: Path, channels: int | None) -> Path:
    """The default, or (channels) the default with its latent reduced to that many whitened components."""
    if channels is None:
        return DEFAULT_MODEL
    folder = work / f"models/default-l{channels}"
    if not folder.exists():
        hvctl("model", "reduce-latent", DEFAULT_MODEL, folder, "--manifest", train_set / "manifest.jsonl",
              "--channels", channels)
    return folder


def fresh_dit_folder(work: Path, base: Path, patch: int) -> Path:
    """The base's folder with a DiT config of this patch size and no DiT weights (reinit draws them)."""
    folder = work / f"models/{base.name}-dit-p{patch}"
    if not folder.exists():
        shutil.copytree(base, folder)
        config_path = folder / "transformer" / "config.json"
        config = json.loads(config_path.read_text())
        config["patch_size"] = patch
        config_path.write_text(json.dumps(config, indent=2))
        for weights in (folder / "transformer").glob("*.safetensors"):
            weights.unlink()
    return folder


def write_recipe(path: Path, *, model: Path, out: Path, data: dict, a, steps: int, every: int) -> None:
    """img-p2.yaml's settings (the object 3x, shift 7, EMA 0.999), at this run's scale and paths."""
    lines = [f"extends: {ROOT / 'recipes' / 'toy' / 'img-p2.yaml'}", f"model: {model}", f"out: {out}", f"steps: {steps}",
             f"device: {a.device}", f"precision: {a.precision}", "log_every: 10",
             "data:", f"  cache: {data['train-cache']}", f"  batch_size: {a.batch}", "  preload: device",
             "optim:", f"  lr: {a.lr}", f"  warmup_steps: {a.warmup}",
             "checkpoint:", f"  every: {every}", "  keep_last: 1",
             "validation:", "  every: 0", "  loss_cache: null"]
    path.write_text("\n".join(lines) + "\n")


def train(work: Path, patch: int, data: dict, a) -> dict:
    run = work / f"runs/{data['base'].name}-{a.kind}-p{patch}"
    recipe = work / f"{data['base'].name}-{a.kind}-p{patch}.yaml"
    model = fresh_dit_folder(work, data["base"], patch)
    t0 = time.perf_counter()
    write_recipe(recipe, model=model, out=run, data=data, a=a, steps=a.probe_steps, every=a.probe_steps)
    hvctl("train", recipe)
    probe = time.perf_counter() - t0
    rates = [m["samples_per_s"] for m in read_metrics(run) if "samples_per_s" in m]  # each a single step's
    rate = statistics.median(rates) if rates else a.batch / (probe / a.probe_steps)
    budget_s = max(0.0, a.minutes * 60 - probe - 20)  # 20 s: loading and the export
    steps = a.probe_steps + max(0, int(budget_s * rate / a.batch))
    write_recipe(recipe, model=model, out=run, data=data, a=a, steps=steps, every=steps)
    hvctl("train", recipe)
    rates = [m["samples_per_s"] for m in read_metrics(run) if "samples_per_s" in m]
    return {"base": data["base"].name, "patch": patch, "steps": steps, "samples": steps * a.batch, "train_s": round(time.perf_counter() - t0, 1),
            "samples_per_s": round(statistics.median(rates), 1), "model": str(run / "model")}


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def measure(row: dict, data: dict, a) -> dict:
    model = row["model"]
    loss = hvctl("eval", "loss", data["val-cache"], "--model", model, "--device", a.device,
                 *[x for s in SIGMAS for x in ("--sigma", s)], json_out=True)
    row["object_loss"] = loss["masked_loss"]
    toy = hvctl("eval", "toy", "--model", model, "--manifest", data["eval"] / "manifest.jsonl", "--vae-videos", 0,
                "--batch-size", a.eval_batch, "--device", a.device, json_out=True)
    row["accuracy"] = toy["runs"][0]["accuracy"]  # {seen: {strict, color, ...}, held_out: {...}}
    return row


def table(rows: list[dict]) -> str:
    def pct(row, key):
        acc = row["accuracy"]
        return " / ".join(f"{100 * acc[g][key]:.1f}" for g in ("seen", "held_out") if g in acc)

    lines = ["| base | patch | samples | train s | samples/s | strict | colour | shape | motion | object loss @ " + " / ".join(map(str, SIGMAS)) + " |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['base']} | {row['patch']}x{row['patch']} | {row['samples']:,} | {row['train_s']} | {row['samples_per_s']:,} | "
                     f"{pct(row, 'strict')} | {pct(row, 'color')} | {pct(row, 'shape')} | {pct(row, 'motion')} | "
                     + " / ".join(f"{v:.3f}" for v in (row["object_loss"] or [])) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="Data, models and runs (default: a temporary folder).")
    p.add_argument("--out", type=Path, default=None, help="results.json and the trained DiTs go here.")
    p.add_argument("--kind", choices=("image", "video"), default="image")
    p.add_argument("--count", type=int, default=10000, help="Training images (or videos).")
    p.add_argument("--patches", default="1,2", help="Patch sizes to train, one run each.")
    p.add_argument("--minutes", type=float, default=2.5, help="Training wall time per run, the probe included.")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--precision", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--shards", type=int, default=8, help="hvctl encode processes at once.")
    p.add_argument("--eval-batch", type=int, default=48)
    p.add_argument("--device", default="cuda")
    p.add_argument("--latent-channels", type=int, default=None,
                   help="Reduce the default's latent to this many whitened components first (hvctl model reduce-latent).")
    p.add_argument("--smoke", action="store_true", help="Tiny counts on any device, to check the script.")
    a = p.parse_args()
    if a.smoke:
        a.count, a.batch, a.minutes, a.probe_steps, a.warmup, a.shards, a.eval_batch = 32, 4, 0.1, 2, 0, 2, 8
        a.device = "cuda" if a.device == "cuda" and _cuda() else "cpu"
        a.precision = "float32" if a.device == "cpu" else a.precision
    work = a.work or Path(tempfile.mkdtemp(prefix="hvctl-gpu-toy-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work: {work}  device: {a.device}  batch {a.batch}  lr {a.lr}  {a.precision}", flush=True)
    data = make_data(work, a.kind, a.count, a.shards, a.device, a.latent_channels)
    rows = []
    for patch in [int(x) for x in a.patches.split(",")]:
        row = measure(train(work, patch, data, a), data, a)
        rows.append(row)
        print(table(rows), flush=True)
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "results.json").write_text(json.dumps(rows, indent=2))
            dit = Path(row["model"]) / "transformer"
            name = f"{data['base'].name}-{a.kind}-p{patch}"
            shutil.copy(dit / "config.json", a.out / f"{name}-config.json")
            for weights in dit.glob("*.safetensors"):
                shutil.copy(weights, a.out / f"{name}-{weights.name}")
    print(f"\n{table(rows)}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
