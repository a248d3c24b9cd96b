"""Parallel modes of the tiny DiT on this CPU, and a memory/communication model of the 13B DiT.

Part 1, measured: one training step (forward, backward, AdamW) of the `tiny` preset's DiT on a
global batch of 2 latent videos of 576 video tokens each (latents 16 x 9 x 16 x 16: 33 frames of
128 x 128 at the tiny VAE's 4x/8x compression) plus 16 text tokens, in one process and in two
(gloo, `torchrun`), in each mode: data parallel (replicate; 1 video per rank), FSDP2 (1 video per
rank), Ulysses and ring sequence parallelism (2 videos per rank, half the tokens each). Each case
runs in fresh processes (peak RSS is a per-process high-water mark; the parent never imports
torch). Per process: seconds per step, peak RSS, and the bytes of parameters + gradients + AdamW
state it holds (measured from its local shards), beside what the model below predicts.

Part 2, modelled: per-GPU memory and bytes sent per step of the 13B configuration
(`hunyuan-t2v-720p`: 20 dual- and 40 single-stream blocks, width 3072) at 720p x 129 frames
(118,800 video tokens + 256 text tokens), bf16 weights with fp32 master weights, gradients and
AdamW state (16 bytes per parameter), full activation checkpointing (each block keeps its input;
one block's activations live at a time, ~34 bytes x tokens x width with fused attention, after
Korthikanti et al.). Communication per step and per GPU (ring all-reduce/all-gather send (W-1)/W
of the tensor): data parallel all-reduces bf16 gradients (2 x 2P bytes); FSDP all-gathers bf16
parameters twice (forward and the recompute in backward) and reduce-scatters gradients (3 x 2P);
Ulysses does 4 all-to-alls per block (q, k, v, output) of the local activations forward and again
backward, and 4 more in the recompute; ring attention passes k and v blocks S-1 times per block
forward, twice that backward (with their gradients), and again in the recompute.

Run:
    python benchmarks/parallel_modes.py               # both parts
    python benchmarks/parallel_modes.py --model-only  # part 2 only, instant
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODES = ["single", "data", "fsdp", "ulysses", "ring"]
LATENT = (16, 9, 16, 16)  # channels, latent frames, height, width
TEXT_TOKENS = 16
BF16, FP32 = 2, 4


# -- the model --------------------------------------------------------------------------------

def comm_bytes(mode: str, world: int, params: int, tokens: int, width: int, blocks: int, *, ulysses: int = 1,
               ring: int = 1, dtype_bytes: int = BF16, checkpointing: bool = True) -> float:
    """Bytes one GPU sends per training step (see the module docstring). mode "data": replicated
    weights; anything else is sharded over all `world` GPUs (hvctl shards over fsdp x ring x
    ulysses), with ulysses x ring of them splitting the sequence."""
    if world == 1:
        return 0.0
    share = (world - 1) / world
    if mode == "data":
        return 2 * params * dtype_bytes * share
    passes = 3 if checkpointing else 2  # forward, backward (and the recompute)
    sent = passes * params * dtype_bytes * share  # all-gathers of the weights and reduce-scatter of gradients
    local_activation = tokens / (ulysses * ring) * width * dtype_bytes
    if ulysses > 1:  # q, k, v and the output, each an all-to-all of this rank's activations
        sent += 4 * blocks * local_activation * (ulysses - 1) / ulysses * passes
    if ring > 1:  # k and v blocks of the ring slot (all Ulysses shards' tokens, 1/U of the heads), R-1 hops
        block = tokens / ring * width / ulysses * dtype_bytes
        sent += 2 * blocks * block * (ring - 1) * (passes + 1)  # + the gradients of k and v, backward
    return sent


def memory_bytes(mode: str, world: int, params: int, tokens: int, width: int, blocks: int, *,
                 sequence: int = 1) -> dict:
    """Per-GPU bytes: model state (16 B/param, sharded unless mode is "data") and activations (the
    tokens split `sequence` ways) with full activation checkpointing."""
    state = 16 * params / (1 if mode == "data" else world)
    local_tokens = tokens / sequence
    checkpoints = blocks * local_tokens * width * BF16
    live_block = 34 * local_tokens * width
    return {"state": state, "activations": checkpoints + live_block, "total": state + checkpoints + live_block}


def hunyuan_13b() -> dict:
    """Parameter count and shape of the official configuration, from the preset on the meta device."""
    from hvctl.models.presets import build_components, get_preset

    dit = build_components(get_preset("hunyuan-t2v-720p"), meta=True)["transformer"]
    c = dit.config
    return {"params": sum(p.numel() for p in dit.parameters()), "width": c.num_attention_heads * c.attention_head_dim,
            "blocks": c.num_layers + c.num_single_layers, "tokens": 33 * (720 // 16) * (1280 // 16) + 256}


# -- part 1: one case, in each of its processes -----------------------------------------------

def run_case(mode: str, steps: int) -> None:
    import resource
    import time

    import torch

    from hvctl.models.presets import build_components, get_preset
    from hvctl.parallel import Ranks, apply_fsdp, apply_sequence_parallel, build_mesh, init_distributed

    ranks = init_distributed("cpu") if mode != "single" else Ranks()
    torch.manual_seed(0)
    model = build_components(get_preset("tiny"))["transformer"].float().train()
    batch = 2
    if mode == "single":
        pass
    else:
        mesh = build_mesh(ranks, "cpu", **{"data": {}, "fsdp": {"fsdp": 2}, "ulysses": {"ulysses": 2},
                                            "ring": {"ring": 2}}[mode])
        if mode in ("ulysses", "ring"):
            apply_sequence_parallel(model, mesh)
            apply_fsdp(model, mesh)  # gradients averaged over the sequence-parallel pair
        elif mode == "fsdp":
            apply_fsdp(model, mesh)
            batch = 1
        else:
            from torch.distributed._composable.replicate import replicate

            replicate(model)
            batch = 1
    g = torch.Generator().manual_seed(ranks.rank)
    inputs = dict(hidden_states=torch.randn(batch, *LATENT, generator=g), timestep=torch.full((batch,), 500.0),
                  encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 64, generator=g),
                  encoder_attention_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.bool),
                  pooled_projections=torch.randn(batch, 32, generator=g))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = model(**inputs, return_dict=False)[0]
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: also creates the AdamW state
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    held = sum(local(p).numel() * 4 * 4 for p in model.parameters())  # fp32 weights, grads, 2 AdamW moments
    print(json.dumps({"mode": mode, "rank": ranks.rank, "step_s": seconds, "state_bytes": held,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def measure(steps: int, threads: int) -> list[dict]:
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    for mode in MODES:
        cmd = [sys.executable, __file__, "--case", mode, "--steps", str(steps)]
        if mode != "single":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *cmd[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        rows.append({"mode": mode, "processes": len(reports), "step_s": max(r["step_s"] for r in reports),
                     "peak_mb": max(r["peak_mb"] for r in reports), "state_bytes": max(r["state_bytes"] for r in reports)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (2 processes share the cores)")
    parser.add_argument("--model-only", action="store_true")
    args = parser.parse_args()
    if args.case:
        return run_case(args.case, args.steps)

    if not args.model_only:
        print(f"load average {os.getloadavg()[0]:.2f}; {args.steps} timed steps; global batch 2 x "
              f"{LATENT[1] * LATENT[2] * LATENT[3] // 4} video tokens; {args.threads} thread(s) per process")
        rows = measure(args.steps, args.threads)
        base = rows[0]
        tiny_params = base["state_bytes"] // 16
        print(f"{'mode':8} {'procs':>5} {'s/step':>8} {'vs 1':>6} {'peak MB':>8} {'state MB':>9} {'model MB':>9} {'sent MB/step':>13}")
        for r in rows:
            mode, world = r["mode"], r["processes"]
            modelled = 16 * tiny_params / (1 if mode in ("single", "data") else world)
            sp = {"ulysses": dict(ulysses=2), "ring": dict(ring=2)}.get(mode, {})
            sent = comm_bytes(mode, world, tiny_params, 2 * (576 + TEXT_TOKENS), 128, 4, dtype_bytes=FP32,
                              checkpointing=False, **sp) if mode != "single" else 0
            print(f"{mode:8} {world:5d} {r['step_s']:8.3f} {r['step_s'] / base['step_s']:6.2f} {r['peak_mb']:8.0f} "
                  f"{r['state_bytes'] / 2**20:9.2f} {modelled / 2**20:9.2f} {sent / 2**20:13.2f}")
        print("state MB: fp32 weights, gradients and AdamW moments held per process, from its local shards;"
              " model MB: the model's prediction.\n")

    m = hunyuan_13b()
    print(f"13B DiT at 720p x 129 frames: {m['params'] / 1e9:.2f}B parameters, {m['tokens']:,} tokens, "
          f"width {m['width']}, {m['blocks']} blocks")
    print(f"{'mode':22} {'GPUs':>5} {'state GB':>9} {'activ GB':>9} {'total GB':>9} {'sent GB/step':>13}")
    heads = 24  # Ulysses splits heads: its degree divides 24
    cases = [(1, "data", 1, 1), (8, "data", 1, 1), (8, "fsdp", 1, 1), (8, "fsdp+ulysses", 8, 1), (8, "fsdp+ring", 1, 8),
             (16, "fsdp+ulysses+ring", 8, 2), (32, "fsdp+ulysses+ring", 8, 4), (32, "fsdp+ulysses", 8, 1)]
    for world, mode, ulysses, ring in cases:
        assert heads % ulysses == 0
        mem = memory_bytes(mode, world, m["params"], m["tokens"], m["width"], m["blocks"], sequence=ulysses * ring)
        sent = comm_bytes(mode, world, m["params"], m["tokens"], m["width"], m["blocks"], ulysses=ulysses, ring=ring)
        print(f"{mode + f' u{ulysses} r{ring}':22} {world:5d} {mem['state'] / 1e9:9.1f} {mem['activations'] / 1e9:9.1f} "
              f"{mem['total'] / 1e9:9.1f} {sent / 1e9:13.1f}")
    print("An 80 GB GPU fits the rows under ~70 GB total (leaving room for buffers and fragmentation).")


if __name__ == "__main__":
    main()
