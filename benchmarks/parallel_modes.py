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
(118,800 video tokens + 256 text tokens) on 8 GPUs, for FSDP x Ulysses x ring, with and without
activation checkpointing. Model state: bf16 compute weights over fp32 master weights, gradients and
AdamW state (16 bytes per parameter, sharded over all 8), plus the unsharded bf16 weights of the
running and the prefetched block and the running block's gradients. Activations, per rank's tokens
(its video shard plus the whole text) in units of width x 2 bytes ("widths"): what one block keeps
for backward and its peak during forward+backward are measured here, on the CPU, from a narrow
block (4 heads of 128, bf16) through the fused attention: `kept` (what a forward leaves allocated for its
backward) and `peak` (forward+backward), by torch's CPU profiler; both are linear in tokens x
width. With checkpointing every block keeps its input and one block at a time is live (`peak_ac`);
without, every block keeps `kept`.
Ulysses adds the head-layout copies of q, k, v and the output (4 widths); ring adds the key/value
blocks in flight and the fp32 accumulators of the output, dq and the travelling dk/dv (10 widths).
Communication per step and per GPU (ring all-reduce/all-gather send (W-1)/W of the tensor): data
parallel all-reduces bf16 gradients (2 x 2P bytes); FSDP all-gathers bf16 parameters twice (forward
and the recompute in backward) and reduce-scatters gradients (3 x 2P); Ulysses does 4 all-to-alls
per block (q, k, v, output) of the local activations forward and again backward, and 4 more in the
recompute; ring attention passes k and v blocks S-1 times per block forward, twice that backward
(with their gradients), and again in the recompute.

Part 3, the model checked on one GPU (--gpu): one dual-stream block of the 13B DiT (bf16) at
118,800 video + 256 text tokens (64 of them unpadded), forward+backward with and without activation
checkpointing, through each attention backend installed (sage: forward only, it has no backward):
peak memory above the inputs (torch.cuda.max_memory_allocated) and seconds, beside the model's
prediction for that block. It writes its table (markdown) to --out.

Run:
    python benchmarks/parallel_modes.py               # parts 1 and 2
    python benchmarks/parallel_modes.py --model-only  # part 2 only (seconds)
    python benchmarks/parallel_modes.py --gpu --out benchmarks/parallel_modes_gpu.md   # part 3, one GPU
    python benchmarks/parallel_modes.py --smoke       # parts 2 and 3 at toy sizes, on any device (a test)
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


# -- the block: measured on the CPU (calibration) and on a GPU (the check) ---------------------

def block_case(device, heads: int, head_dim: int, video_tokens: int, text_tokens: int, *, backend: str | None = None,
               checkpointing: bool = False, train: bool = True, param_grads: bool = True, dtype=None,
               repeats: int = 1) -> dict:
    """One HunyuanVideo dual-stream block, forward (+ backward): bytes allocated at the peak above
    the block and its inputs, bytes a forward keeps for backward (without checkpointing), seconds per call."""
    import time

    import torch
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTransformerBlock
    from torch.utils.checkpoint import checkpoint

    dtype = dtype or torch.bfloat16
    torch.manual_seed(0)
    block = HunyuanVideoTransformerBlock(heads, head_dim, 4.0).to(device, dtype).requires_grad_(train and param_grads)
    block.attn.processor._attention_backend = backend
    width = heads * head_dim
    video = torch.randn(1, video_tokens, width, device=device, dtype=dtype, requires_grad=train)
    text = torch.randn(1, text_tokens, width, device=device, dtype=dtype, requires_grad=train)
    temb = torch.randn(1, width, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 1, video_tokens + text_tokens, dtype=torch.bool, device=device)
    mask[..., video_tokens + min(64, text_tokens):] = False  # a prompt's padding, as the model masks it
    rope = tuple(torch.randn(video_tokens, head_dim, device=device) for _ in range(2))
    params = sum(p.numel() * p.element_size() for p in block.parameters())

    def step():
        args = (video, text, temb, mask, rope)
        out = checkpoint(block, *args, use_reentrant=False) if checkpointing else block(*args)
        if train:
            (out[0].float().square().mean() + out[1].float().square().mean()).backward()
            block.zero_grad(set_to_none=True)
            video.grad = text.grad = None

    with torch.set_grad_enabled(train):
        step()  # warm-up (kernels' one-time buffers)
        kept = 0
        if train and not checkpointing:  # the bytes a forward leaves for its backward (its outputs included)
            held = []
            if device.type == "cuda":
                before = torch.cuda.memory_allocated()
                held.append(block(video, text, temb, mask, rope))
                kept = torch.cuda.memory_allocated() - before
            else:
                kept = _cpu_peak(lambda: held.append(block(video, text, temb, mask, rope)))[1]
            del held
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / repeats
            peak = torch.cuda.max_memory_allocated() - before
        else:
            start = time.perf_counter()
            peak = _cpu_peak(step)[0]
            seconds = time.perf_counter() - start
    return {"peak": peak, "kept": kept, "seconds": seconds, "params": params,
            "unit": (video_tokens + text_tokens) * width * torch.finfo(dtype).bits // 8}


def _cpu_peak(fn) -> tuple[int, int]:
    """The most bytes fn had allocated at once beyond what was allocated before it, and what it left
    allocated (torch's CPU profiler)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before, events[-1]["Total Allocated"] - before


def calibrate(video_tokens: int = 1024, text_tokens: int = 64, heads: int = 4, head_dim: int = 128) -> dict:
    """The block's activations in widths (bytes / (tokens x width x 2)), measured on the CPU through
    the fused attention on a narrow block, without weight gradients: at this size the weights weigh
    as much as the activations, at 119k tokens 3% (the prediction adds their gradients back)."""
    import torch

    cpu = torch.device("cpu")
    plain = block_case(cpu, heads, head_dim, video_tokens, text_tokens, param_grads=False)
    recomputed = block_case(cpu, heads, head_dim, video_tokens, text_tokens, checkpointing=True, param_grads=False)
    forward = block_case(cpu, heads, head_dim, video_tokens, text_tokens, train=False)
    return {"kept": plain["kept"] / plain["unit"], "peak": plain["peak"] / plain["unit"],
            "peak_ac": recomputed["peak"] / recomputed["unit"], "forward": forward["peak"] / forward["unit"]}


def predict_block(widths: dict, params: int, tokens: int, width: int, *, checkpointing: bool, train: bool = True) -> float:
    """Peak bytes of one block's forward(+backward) above its inputs, as block_case measures it."""
    if not train:
        return widths["forward"] * tokens * width * BF16
    return params + widths["peak_ac" if checkpointing else "peak"] * tokens * width * BF16


def memory_bytes(mode: str, world: int, params: int, tokens: int, width: int, blocks: int, widths: dict, *,
                 block_params: int, ulysses: int = 1, ring: int = 1, text_tokens: int = 256,
                 checkpointing: bool = True) -> dict:
    """Per-GPU bytes of a training step (see the module docstring): model state, sharded unless mode
    is "data", and activations of this rank's tokens (its video shard and the whole text)."""
    state = 16 * params / (1 if mode == "data" else world)
    if mode != "data":  # the running and prefetched block's bf16 weights, the running block's fp32 gradients
        state += 2 * block_params * BF16 + block_params * FP32
    local = (tokens - text_tokens) / (ulysses * ring) + text_tokens
    unit = local * width * BF16
    extra = (4 if ulysses > 1 else 0) + (10 if ring > 1 else 0)
    if checkpointing:
        activations = blocks * unit + (widths["peak_ac"] + extra) * unit
    else:
        activations = blocks * (widths["kept"] + (4 if ulysses > 1 else 0)) * unit \
            + (widths["peak"] - widths["kept"] + extra) * unit
    return {"state": state, "activations": activations, "total": state + activations}


def hunyuan_13b() -> dict:
    """Parameter count and shape of the official configuration, from the preset on the meta device."""
    from hvctl.models.presets import build_components, get_preset

    dit = build_components(get_preset("hunyuan-t2v-720p"), meta=True)["transformer"]
    c = dit.config
    return {"params": sum(p.numel() for p in dit.parameters()), "width": c.num_attention_heads * c.attention_head_dim,
            "heads": c.num_attention_heads, "head_dim": c.attention_head_dim, "blocks": c.num_layers + c.num_single_layers,
            "block_params": max(sum(p.numel() for p in b.parameters()) for b in dit.transformer_blocks),
            "tokens": 33 * (720 // 16) * (1280 // 16) + 256}


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


def model_table(m: dict, widths: dict) -> None:
    print(f"13B DiT at 720p x 129 frames: {m['params'] / 1e9:.2f}B parameters, {m['tokens']:,} tokens, "
          f"width {m['width']}, {m['blocks']} blocks")
    print("block activations, measured on the CPU in widths (tokens x width x 2 bytes): " +
          ", ".join(f"{k} {v:.1f}" for k, v in widths.items()))
    print(f"{'mode':22} {'GPUs':>5} {'ckpt':>5} {'state GB':>9} {'activ GB':>9} {'total GB':>9} {'sent GB/step':>13}")
    cases = [(1, "data", 1, 1), (8, "fsdp", 1, 1), (8, "fsdp+ulysses", 8, 1), (8, "fsdp+ring", 1, 8),
             (8, "fsdp+ulysses+ring", 4, 2), (8, "fsdp+ulysses+ring", 2, 4)]
    for world, mode, ulysses, ring in cases:
        assert m["heads"] % ulysses == 0
        for checkpointing in (True, False):
            mem = memory_bytes(mode, world, m["params"], m["tokens"], m["width"], m["blocks"], widths,
                               block_params=m["block_params"], ulysses=ulysses, ring=ring, checkpointing=checkpointing)
            sent = comm_bytes(mode, world, m["params"], m["tokens"], m["width"], m["blocks"], ulysses=ulysses, ring=ring,
                              checkpointing=checkpointing)
            print(f"{mode + f' u{ulysses} r{ring}':22} {world:5d} {'on' if checkpointing else 'off':>5} "
                  f"{mem['state'] / 1e9:9.1f} {mem['activations'] / 1e9:9.1f} {mem['total'] / 1e9:9.1f} {sent / 1e9:13.1f}")
    print("An 80 GB GPU fits the rows under ~70 GB total, a 141 GB H200 those under ~125 GB "
          "(room for buffers and fragmentation).")
    block = {name: predict_block(widths, m["block_params"] * BF16, m["tokens"], m["width"], checkpointing=ckpt, train=train) / 1e9
             for name, ckpt, train in (("fwd+bwd", False, True), ("fwd+bwd, checkpointing", True, True), ("fwd", False, False))}
    print("one dual-stream block at these tokens, as --gpu measures it (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in block.items()))


def attention_backends(device, train: bool) -> list[str]:
    """hvctl's --attention names that run here (sage only without a backward pass)."""
    from hvctl.accelerate import attention_choice
    from hvctl.errors import HvctlError

    names = []
    for name in ("sdpa", "flash", "flash3", "sage"):
        try:
            attention_choice(name, device)
        except HvctlError:
            continue
        names.append(name)
    return names


def check_table(device, heads: int, head_dim: int, video_tokens: int, text_tokens: int, widths: dict, repeats: int) -> list[dict]:
    """Part 3: the block measured with each backend, with and without checkpointing, beside the prediction."""
    import torch

    from hvctl.accelerate import _BACKENDS

    width = heads * head_dim
    rows = []
    for name in attention_backends(device, train=True):
        for checkpointing, train in ((False, name != "sage"), (True, name != "sage")):
            if not train and checkpointing:
                continue  # inference has nothing to checkpoint
            got = block_case(device, heads, head_dim, video_tokens, text_tokens, backend=_BACKENDS[name],
                             checkpointing=checkpointing, train=train, repeats=repeats)
            predicted = predict_block(widths, got["params"], video_tokens + text_tokens, width, checkpointing=checkpointing,
                                      train=train)
            rows.append({"attention": name, "pass": "fwd+bwd" if train else "fwd", "checkpointing": checkpointing,
                         "measured_gb": got["peak"] / 1e9, "predicted_gb": predicted / 1e9,
                         "error": predicted / got["peak"] - 1, "seconds": got["seconds"]})
            torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def write_check(rows: list[dict], path: str | None, title: str) -> None:
    lines = [title, "", "| attention | pass | checkpointing | measured GB | predicted GB | error | s/call |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['attention']} | {r['pass']} | {'on' if r['checkpointing'] else 'off'} | {r['measured_gb']:.3g} | "
              f"{r['predicted_gb']:.3g} | {r['error']:+.0%} | {r['seconds']:.3f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (2 processes share the cores)")
    parser.add_argument("--model-only", action="store_true", help="part 2 only")
    parser.add_argument("--gpu", action="store_true", help="part 3: the 13B block at 720p x 129 frames on this CUDA GPU")
    parser.add_argument("--smoke", action="store_true", help="parts 2 and 3 at toy sizes, on any device")
    parser.add_argument("--out", help="part 3: write its table (markdown) here")
    args = parser.parse_args()
    if args.case:
        return run_case(args.case, args.steps)

    import torch

    if args.smoke:
        widths = calibrate(video_tokens=128, text_tokens=16, heads=2, head_dim=32)
        model_table(hunyuan_13b(), widths)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = check_table(device, 2, 32, 256, 16, widths, repeats=1)
        write_check(rows, args.out, f"One toy block (2 heads x 32, 256 + 16 tokens) on {device.type}")
        return
    widths = calibrate()
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device here (use --smoke to run part 3 at toy sizes)")
        m = hunyuan_13b()
        rows = check_table(torch.device("cuda"), m["heads"], m["head_dim"], m["tokens"] - 256, 256, widths, repeats=3)
        write_check(rows, args.out, f"One dual-stream block of the 13B DiT at 118,800 + 256 tokens on "
                                    f"{torch.cuda.get_device_name()} (bf16), beside the model's prediction")
        return
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
    model_table(hunyuan_13b(), widths)


if __name__ == "__main__":
    main()
