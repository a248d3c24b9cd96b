"""Peak memory and time of VAE-encoding a 33-frame video, spatially tiled vs untiled.

For each frame size (default 64, 256 and 512 px square) the VAE encodes one 33-frame toy video
three times: untiled; tiled, each tile normalised with the frame's GroupNorm statistics (hvctl's
default, hvctl/models/vae.py); and tiled with each tile's own statistics (diffusers' tiling,
`vae_tile_stats: tile`). Each case runs in a fresh subprocess (this script re-invoked with a hidden
`--case`), because peak RSS is a high-water mark per process: the child loads the VAE, renders the
frames and warms up on a 5-frame 32x32 input, reads ru_maxrss as its baseline, encodes, and reads
ru_maxrss again. "encode peak MB" is peak minus baseline (what the encode itself added); the
absolute peak of the process is shown too. Time is the wall time of the encode call, the median of
`--repeats` runs (default 3 below 256 px, 1 from 256 px). Ratios are tiled / untiled, both
measured in the same run. "rel L2" is ||tiled - untiled|| / ||untiled|| over the latent means, for
frame statistics and (in the last column) for per-tile statistics.

Tile size: the official tile is 256 px (stride 192) for 720p frames, but at toy scale a 256 px tile
would leave 64 and 256 px frames untiled, so the tiled runs default to `--tile 64`: every size
above 64 px is split into tiles. Diffusers tiles only frames larger than the tile, so with the
default tile the 64 px row is a control: tiled and untiled are the same computation (1 tile).

Run:
    python benchmarks/encode_tiling.py                       # tiny random model in a temp dir
    python benchmarks/encode_tiling.py --sizes 64,256 --repeats 5
    python benchmarks/encode_tiling.py --model path/to/model --tile 256 --json results.json

What to expect: untiled encode peak memory grows with the frame area (at 512 px mostly the mid-block
attention over all latent pixels of a temporal chunk and its causal mask), while the tiled peak stays
nearly flat: bounded by one tile, plus the float copies of the input video (12 bytes per pixel
per frame each, ~100 MB at 512 px). Diffusers always encodes a video of more than 16 frames in
temporal chunks (framewise), tiled or not, so memory does not grow with the frame count either way. On a
randomly initialised VAE the tiled latents differ a lot from the untiled ones (the blended tile seams
of a random network mean nothing); the rel L2 column is meaningful only on a trained VAE (--model).
With the tiny model on CPU, tiling costs time (many small tiles and their overlap: ~3x at 512 px).
Frame statistics cost one extra pass over the frame shrunk to a tile's area: about a tenth more
time than per-tile statistics and no more memory. The embedded toy VAE compresses 4x in space, so
its untiled 512 px encode needs a 27 GB attention mask: run it with --sizes 64,128,256. There
(--model hvctl/assets/default-model) frame statistics give rel L2 0.007 / 0.009 at 128 / 256 px
against 0.036 / 0.067 with per-tile statistics.
The default run takes about 2.5 minutes on an idle 2-core box; other load on the box slows the
small per-tile ops far more than the untiled encode, so compare times only from a quiet run.
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

FRAMES = 33
CASES = ("untiled", "tiled", "tile-stats")  # tiled with frame statistics; tiled with each tile's own


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def run_case(args) -> None:
    """Child process: encode one video once warm, print one JSON line, save the latent mean."""
    import numpy as np
    import torch

    from hvctl.models.loading import load_components
    from hvctl.models.vae import configure_tiling, encode_posterior
    from hvctl.toy.world import render, sample_spec

    vae = load_components(args.model, parts=("vae",)).vae
    configure_tiling(vae, args.case != "untiled", tile_size=args.tile,
                     tile_stats="tile" if args.case == "tile-stats" else "frame")
    frames = render(sample_spec(0, 0, "train", size=(args.size, args.size), frames=FRAMES))
    encode_posterior(vae, render(sample_spec(0, 1, "train", size=(32, 32), frames=5)))  # warm-up

    baseline = peak_rss_mb()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        mean, _std = encode_posterior(vae, frames)
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    np.save(args.latents, mean.numpy())
    print(json.dumps({
        "seconds": statistics.median(times), "encode_peak_mb": peak - baseline,
        "abs_peak_mb": peak, "latent_shape": list(mean.shape), "threads": torch.get_num_threads(),
    }))


def measure(model: Path, size: int, case: str, tile: int, repeats: int, latents: Path) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--model", str(model),
           "--size", str(size), "--tile", str(tile), "--repeats", str(repeats), "--latents", str(latents)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"case {size}px {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model folder whose VAE to benchmark "
                        "(default: a tiny random model created in a temp dir)")
    parser.add_argument("--sizes", default="64,256,512", help="comma-separated square frame sizes in px")
    parser.add_argument("--tile", type=int, default=64, help="tile size in px for the tiled runs (multiple of 32)")
    parser.add_argument("--repeats", type=int, help="timed encodes per case (default 3 below 256 px, 1 from 256 px)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--latents", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return run_case(args)

    # The parent imports neither torch nor hvctl: a child's ru_maxrss starts at its parent's RSS.
    import numpy as np

    sizes = [int(s) for s in args.sizes.split(",")]
    load = os.getloadavg()[0]  # other work on the box skews the times (not the memory)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hvctl-bench-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = tmp / "tiny"
            subprocess.run([sys.executable, "-c", "import sys; from hvctl.models.presets import init_model; "
                            "init_model('tiny', sys.argv[1], seed=0)", str(model)], check=True)
        results = []
        for size in sizes:
            repeats = args.repeats or (1 if size >= 256 else 3)
            stride = args.tile * 3 // 4
            tiles = len(range(0, size, stride)) ** 2 if size > args.tile else 1  # per temporal chunk
            row = {"size": size, "frames": FRAMES, "repeats": repeats, "tile": args.tile, "tiles": tiles}
            for case in CASES:
                row[case] = measure(model, size, case, args.tile, repeats, tmp / f"{case}.npy")
            untiled = np.load(tmp / "untiled.npy")
            rel_l2 = lambda case: float(np.linalg.norm(np.load(tmp / f"{case}.npy") - untiled) / np.linalg.norm(untiled))  # noqa: E731
            row["time_ratio"] = row["tiled"]["seconds"] / row["untiled"]["seconds"]
            row["peak_ratio"] = row["tiled"]["encode_peak_mb"] / max(row["untiled"]["encode_peak_mb"], 1e-9)
            row["rel_l2"], row["rel_l2_tile_stats"] = rel_l2("tiled"), rel_l2("tile-stats")
            results.append(row)
            print(f"  {size}px done", file=sys.stderr, flush=True)
    total = time.perf_counter() - started

    print(f"VAE encode of {FRAMES} frames, tile {args.tile} px (stride {args.tile * 3 // 4}), "
          f"model: {args.model or 'tiny (random init)'}")
    print(f"{os.cpu_count()} CPUs, {results[0]['untiled']['threads']} torch threads, "
          f"load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print("peak = encode peak RSS over the pre-encode baseline (absolute process peak in brackets)")
    header = (f"{'size':>5} {'n':>2} {'tiles':>5} {'untiled s':>9} {'untiled peak MB':>16} "
              f"{'tiled s':>8} {'tiled peak MB':>16} {'time x':>7} {'peak x':>7} {'rel L2':>7} "
              f"{'tile-stats s':>12} {'rel L2':>7}")
    print(header)
    print("-" * len(header))
    for r in results:
        u, t = r["untiled"], r["tiled"]
        print(f"{r['size']:>5} {r['repeats']:>2} {r['tiles']:>5} "
              f"{u['seconds']:>9.2f} {u['encode_peak_mb']:>7.0f} ({u['abs_peak_mb']:>6.0f}) "
              f"{t['seconds']:>8.2f} {t['encode_peak_mb']:>7.0f} ({t['abs_peak_mb']:>6.0f}) "
              f"{r['time_ratio']:>7.2f} {r['peak_ratio']:>7.2f} {r['rel_l2']:>7.3f} "
              f"{r['tile-stats']['seconds']:>12.2f} {r['rel_l2_tile_stats']:>7.3f}")
    print("tiles: spatial tiles per temporal chunk (1: frame not larger than the tile, not split)."
          " n: timed runs (median)."
          " time x, peak x: tiled / untiled. rel L2 = ||tiled - untiled|| / ||untiled|| of the latent means;"
          " large and meaningless on a randomly initialised VAE, meaningful on a trained one (--model)."
          " tile-stats: tiled, each tile normalised with its own GroupNorm statistics (diffusers).")
    print(f"total {total:.0f} s")
    if args.json:
        text = json.dumps({"model": str(args.model or "tiny"), "total_seconds": total, "results": results}, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
