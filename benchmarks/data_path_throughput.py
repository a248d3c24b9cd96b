"""The DiT trainer's data path, per-sample loader (data.preload: none) against the preloaded cache
(data.preload: device), in samples/s: the data path alone and the whole training step.

The cache is synthetic (written with hvctl.cache.ShardWriter, no VAE or text encoder run): random
latents of a 17-frame 64x64 clip for the tiny model, (16, 5, 8, 8), and 4 caption variants of
10-128 text tokens each (text_len 128, the tiny preset's), in shards of 64 samples, all one bucket
so that a batch of 256 can be drawn. Each case builds an `hvctl.train.trainer.Trainer` on it and:
- data path: `trainer.micro_batch` for the step's micro-batches (the same call training makes), its
  tensors moved to the device (what the objective does with a per-sample batch), synchronised;
- step: `trainer.train_step()` (data path, flow-matching forward and backward, AdamW).
samples/s = batch x timed repetitions / their total time, after one untimed warm-up.

Run:
    python benchmarks/data_path_throughput.py --device cpu              # batches 8 and 256
    python benchmarks/data_path_throughput.py --device cuda --json out.json
    python benchmarks/data_path_throughput.py --smoke                   # seconds: batches 8, 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SHAPE = (16, 5, 8, 8)  # latent of a 17-frame 64x64 clip (tiny model: 16 channels)
BUCKET = (64, 64, 17)
TEXT_LEN, TEXT_DIM, POOLED_DIM, VARIANTS = 128, 64, 32, 4
LOADERS = ("none", "device")


def write_cache(root: Path, samples: int) -> None:
    import torch

    from hvctl.cache import ShardWriter, write_empty_text, write_index

    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(root, "bench", samples_per_shard=64)
    for i in range(samples):
        tensors = {"latent_mean": torch.randn(SHAPE, generator=g), "latent_std": torch.rand(SHAPE, generator=g)}
        for v in range(VARIANTS):
            tokens = int(torch.randint(10, TEXT_LEN + 1, (1,), generator=g))
            tensors[f"text.{v}"] = torch.randn(tokens, TEXT_DIM, generator=g)
            tensors[f"pooled.{v}"] = torch.randn(POOLED_DIM, generator=g)
        writer.add({"key": f"k{i:06d}", "id": f"clip{i:06d}", "kind": "video", "bucket": BUCKET,
                    "text_variants": VARIANTS, "split": "train"}, tensors)
    writer.flush()
    write_index(root)
    # the empty prompt, for the default empty_prompt_rate
    write_empty_text(root, "bench", {"text": torch.randn(2, TEXT_DIM, generator=g), "pooled": torch.randn(POOLED_DIM, generator=g)})


def trainer_for(work: Path, loader: str, batch: int, device: str):
    from hvctl.train.config import CheckpointConfig, DataConfig, TrainRecipe
    from hvctl.train.trainer import Trainer

    data = DataConfig(cache=work / "cache", batch_size=batch, text_len=TEXT_LEN, preload=loader,
                      aspect_buckets=[BUCKET[:2]], frame_buckets=[BUCKET[2]], media=["video"])
    recipe = TrainRecipe(target="dit", model=work / "model", out=work / f"run-{loader}-{batch}", steps=10**6,
                         device=device, tensorboard=False, data=data, checkpoint=CheckpointConfig(every=10**9))
    return Trainer(recipe, progress=False)


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def measure(work: Path, loader: str, batch: int, args) -> dict:
    import torch

    trainer = trainer_for(work, loader, batch, args.device)
    device = trainer.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def data_path():
        for indices, j in trainer.step_micro_batches():
            batch_dict = trainer.micro_batch(indices, j)[0]
            for value in batch_dict.values():
                if isinstance(value, torch.Tensor):
                    value.to(device, non_blocking=True)

    data_s = timed(data_path, args.data_repeats, sync)
    step_s = timed(trainer.train_step, args.step_repeats, sync)
    return {"loader": loader, "batch": batch, "data_samples_per_s": batch / data_s, "step_samples_per_s": batch / step_s,
            "data_ms": data_s * 1e3, "step_ms": step_s * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-sizes", default="8,256", help="comma-separated")
    parser.add_argument("--samples", type=int, default=512, help="samples in the synthetic cache (>= the largest batch)")
    parser.add_argument("--data-repeats", type=int, default=20, help="timed data-path repetitions")
    parser.add_argument("--step-repeats", type=int, default=3, help="timed training steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="a quick run: batches 8 and 16, 32 samples, 2 repetitions")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if args.smoke:
        args.batch_sizes, args.samples, args.data_repeats, args.step_repeats = "8,16", 32, 2, 1
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes: integers, got {args.batch_sizes!r}")
    if min(batches) < 1 or args.samples < max(batches) or min(args.data_repeats, args.step_repeats, args.threads) < 1:
        parser.error("--batch-sizes >= 1 and <= --samples; --data-repeats, --step-repeats, --threads >= 1")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    from hvctl.models.presets import init_model

    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="hvctl-data-path-") as tmp:
        work = Path(tmp)
        init_model("tiny", work / "model", seed=0)
        write_cache(work / "cache", args.samples)
        for batch in batches:
            for loader in LOADERS:
                results.append(measure(work, loader, batch, args))
                print(f"  batch {batch}, preload {loader} done", file=sys.stderr, flush=True)

    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores, {args.threads} threads)"
    print(f"DiT data path on {name}, tiny model, torch {torch.__version__}; synthetic cache of {args.samples} "
          f"samples, latents {'x'.join(map(str, SHAPE))}, {VARIANTS} caption variants, text_len {TEXT_LEN}; "
          f"load average {os.getloadavg()[0]:.1f}")
    header = f"{'batch':>5} {'preload':>8} {'data ms':>9} {'data samples/s':>15} {'step ms':>9} {'step samples/s':>15}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['batch']:>5} {r['loader']:>8} {r['data_ms']:>9.2f} {r['data_samples_per_s']:>15.0f} "
              f"{r['step_ms']:>9.1f} {r['step_samples_per_s']:>15.1f}")
    ratios = {}
    for batch in batches:
        none, device = (next(r for r in results if r["batch"] == batch and r["loader"] == k) for k in LOADERS)
        ratios[batch] = {"data": device["data_samples_per_s"] / none["data_samples_per_s"],
                         "step": device["step_samples_per_s"] / none["step_samples_per_s"]}
        print(f"batch {batch}: preload device / none: data path x{ratios[batch]['data']:.1f}, "
              f"step x{ratios[batch]['step']:.2f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "results": results,
                                               "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
