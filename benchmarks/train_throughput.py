"""Training throughput and peak memory of the toy DiT and VAE: the hvctl trainer vs a plain loop.

Four cases, each in a fresh subprocess (this script re-invoked with a hidden `--case`), because
peak RSS is a high-water mark per process:
- hvctl-dit: `hvctl.train.trainer.Trainer` (target dit) on a latent cache of 17-frame 64x64 toy
  videos, timing `trainer.train_step()`: cache reads, caption variants, empty-prompt dropout,
  logit-normal timesteps, flow-matching loss, backward, clip, AdamW.
- plain-dit: the same diffusers HunyuanVideoTransformer3DModel (loaded with from_pretrained from the
  same folder), random tensors of the hvctl batch's shapes (latents (B,16,5,8,8), text states
  (B,128,64) with a mask, pooled (B,32)), loss mse(model(x_t, t), noise - x0), backward, clip, AdamW.
- hvctl-vae: the Trainer (target vae) on 9-frame 64x64 toy videos read from the manifest.
- plain-vae: diffusers AutoencoderKLHunyuanVideo on random pixels (B,3,9,64,64), L1 + 1e-6 KL.
Both sides: AdamW lr 1e-4, gradient clipping at 1.0, float32, the same batch size.

A first subprocess makes a tiny random model, renders the toy videos and encodes the DiT cache, untimed.
The parent itself never imports torch: on Linux a child's ru_maxrss starts at its parent's RSS (the
high-water mark survives fork and exec), so a parent holding torch would raise every case's peak.
Each child loads its model and data, runs `--warmup` steps, then times `--steps` steps one by one:
samples/s = batch * steps / their total time; DiT tokens/s counts video tokens only (latent frames x
(H/16) x (W/16) with patch size 2: 80 per sample; each sample also has 128 text tokens); VAE Mpx/s
counts input pixels (frames x H x W). "peak MB" is the process's peak RSS (ru_maxrss); "train MB" is
that peak minus the RSS after loading (what the training steps added: activations, gradients, AdamW
state). Ratios are hvctl / plain, both measured in the same run.

Run:
    python benchmarks/train_throughput.py                       # 10 timed steps, batch 8, 2 threads
    python benchmarks/train_throughput.py --steps 3 --warmup 1 --batch-size 4
    python benchmarks/train_throughput.py --cases hvctl-dit,plain-dit --json results.json

Other load on the box slows every case; compare times only from a quiet run (the load average is
printed). On a busy box, more torch threads than free cores can make steps ~100x slower (OpenMP
threads waiting on each other): seen here with 2 threads at load 6 (DiT 12 s/step vs 0.15 s/step with
--threads 1). The VAE steps dominate the run time (seconds per step at batch 4 on a 2-core box).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("hvctl-dit", "plain-dit", "hvctl-vae", "plain-vae")
SIZE = 64  # px, square
FRAMES = {"dit": 17, "vae": 9}
TEXT_LEN = 128  # the tiny preset's text_len


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """The current resident set size (Linux); elsewhere the peak so far."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, ValueError):
        return peak_rss_mb()


def hvctl_step(target: str, work: Path, batch: int, steps: int):
    from hvctl.train.config import CheckpointConfig, DataConfig, TrainRecipe
    from hvctl.train.trainer import Trainer

    if target == "dit":
        data = DataConfig(cache=work / "cache", batch_size=batch, empty_prompt_rate=0.1,
                          aspect_buckets=[(SIZE, SIZE)], frame_buckets=[FRAMES["dit"]])
    else:
        data = DataConfig(manifest=work / "data" / "manifest.jsonl", batch_size=batch, image_ratio=0.0,
                          aspect_buckets=[(SIZE, SIZE)], frame_buckets=[FRAMES["vae"]])
    recipe = TrainRecipe(target=target, model=work / "model", out=work / f"run-{target}", steps=steps, device="cpu",
                         tensorboard=False, data=data, checkpoint=CheckpointConfig(every=10**9))
    return Trainer(recipe, progress=False).train_step


def plain_step(target: str, work: Path, batch: int):
    import torch
    import torch.nn.functional as F

    if target == "dit":
        from diffusers import HunyuanVideoTransformer3DModel

        model = HunyuanVideoTransformer3DModel.from_pretrained(work / "model" / "transformer")
        c = model.config
        latents = (batch, c.in_channels, (FRAMES["dit"] - 1) // 4 + 1, SIZE // 8, SIZE // 8)
        x0, text = torch.randn(latents), torch.randn(batch, TEXT_LEN, c.text_embed_dim)
        mask = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
        mask[:, :32] = 1
        pooled = torch.randn(batch, c.pooled_projection_dim)

        def loss_fn():
            noise = torch.randn_like(x0)
            sigma = torch.sigmoid(torch.randn(batch))  # logit-normal, as hvctl's default
            s = sigma.view(-1, 1, 1, 1, 1)
            pred = model(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000, encoder_hidden_states=text,
                         encoder_attention_mask=mask, pooled_projections=pooled, return_dict=False)[0]
            return F.mse_loss(pred, noise - x0)
    else:
        from diffusers import AutoencoderKLHunyuanVideo

        model = AutoencoderKLHunyuanVideo.from_pretrained(work / "model" / "vae")
        x = torch.rand(batch, 3, FRAMES["vae"], SIZE, SIZE) * 2 - 1

        def loss_fn():
            posterior = model.encode(x).latent_dist
            recon = model.decode(posterior.sample()).sample
            kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
            return (recon - x).abs().mean() + 1e-6 * kl

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def run_case(args) -> None:
    """Child process: load one case, warm up, time the steps, print one JSON line."""
    if args.case == "prepare":
        return prepare(Path(args.work), args.batch_size)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kind, target = args.case.split("-")
    work = Path(args.work)
    if kind == "hvctl":
        step = hvctl_step(target, work, args.batch_size, args.warmup + args.steps)
    else:
        step = plain_step(target, work, args.batch_size)
    loaded = rss_mb()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": sum(times),
                      "median_step_s": statistics.median(times), "samples_per_s": args.batch_size * args.steps / sum(times),
                      "loaded_mb": loaded, "peak_mb": peak, "train_mb": peak - loaded}))


def prepare(work: Path, batch: int) -> None:
    """The tiny model, the toy videos and the DiT's latent cache (untimed)."""
    from hvctl.encode import EncodeRecipe, encode
    from hvctl.models.presets import init_model
    from hvctl.toy.render import render_dataset

    init_model("tiny", work / "model", seed=0)
    # Toy videos are 9, 17 or 33 frames long: about 3/4 reach the DiT's 17, all the VAE's 9.
    manifest = render_dataset(work / "data", videos=max(16, 2 * batch), images=0, seed=0, split="train",
                              sizes=[(SIZE, SIZE)])
    encode(EncodeRecipe(manifest=manifest, out=work / "cache", model=work / "model", aspect_buckets=[(SIZE, SIZE)],
                        frame_buckets=[FRAMES["dit"]], caption_variants=1, device="cpu"), progress=False)


def measure(case: str, work: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--work", str(work), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"case {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1]) if case != "prepare" else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each case")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    parser.add_argument("--case", choices=CASES + ("prepare",), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return run_case(args)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases or args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error(f"--cases: choose among {', '.join(CASES)}; --steps, --batch-size >= 1, --warmup >= 0")

    load = os.getloadavg()[0]  # other work on the box skews the times (not the memory)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="hvctl-bench-") as tmp:
        work = Path(tmp)
        measure("prepare", work, args)
        print(f"  data ready ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        for case in cases:
            results[case] = measure(case, work, args)
            print(f"  {case} done", file=sys.stderr, flush=True)
    total = time.perf_counter() - started

    video_tokens = ((FRAMES["dit"] - 1) // 4 + 1) * (SIZE // 16) ** 2
    print(f"training throughput on CPU, tiny model (random init), batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up; {SIZE}x{SIZE} px, "
          f"DiT {FRAMES['dit']} frames ({video_tokens} video + {TEXT_LEN} text tokens), VAE {FRAMES['vae']} frames")
    first = next(iter(results.values()))
    print(f"torch {first['torch']}, {first['threads']} torch threads, {os.cpu_count()} CPUs, "
          f"load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    header = f"{'case':<10} {'s/step':>7} {'samples/s':>10} {'tokens/s':>9} {'Mpx/s':>7} {'load MB':>8} {'peak MB':>8} {'train MB':>9}"
    print(header)
    print("-" * len(header))
    for case, r in results.items():
        per_sample = video_tokens if case.endswith("dit") else FRAMES["vae"] * SIZE * SIZE
        rate = r["samples_per_s"] * per_sample
        tokens, mpx = (f"{rate:.0f}", "-") if case.endswith("dit") else ("-", f"{rate / 1e6:.3f}")
        print(f"{case:<10} {r['median_step_s']:>7.3f} {r['samples_per_s']:>10.2f} {tokens:>9} {mpx:>7} "
              f"{r['loaded_mb']:>8.0f} {r['peak_mb']:>8.0f} {r['train_mb']:>9.0f}")
    ratios = {}
    for target in ("dit", "vae"):
        h, p = results.get(f"hvctl-{target}"), results.get(f"plain-{target}")
        if h and p:
            ratios[target] = {"throughput": h["samples_per_s"] / p["samples_per_s"],
                              "peak": h["peak_mb"] / p["peak_mb"], "train": h["train_mb"] / max(p["train_mb"], 1e-9)}
            r = ratios[target]
            print(f"hvctl / plain {target.upper()}: throughput x{r['throughput']:.2f}, peak RSS x{r['peak']:.2f}, "
                  f"train MB x{r['train']:.2f}")
    print("s/step: median step time. load MB: RSS after loading. peak MB: the process's peak RSS. train MB: peak - load.")
    print(f"total {total:.0f} s")
    if args.json:
        text = json.dumps({"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                           "threads": first["threads"], "torch": first["torch"], "total_seconds": total,
                           "results": results, "ratios": ratios}, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
