"""Run under torchrun (2 processes, gloo): ring attention (ring 2) on what the equivalence check
does not cover. Rank 0 prints one JSON line per rank.

- buckets: one training step of the tiny DiT whose two micro-batches come from buckets of
  different lengths (48 and 24 video tokens, text lengths differing per sample), gradients
  accumulated, against the same step in one process;
- memory: the peak memory that joint attention's forward and backward allocate on a rank
  (torch's CPU profiler), at a sequence length L and at 4L.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed/ring_check.py
"""

import copy
import json
import os
import tempfile

import torch
import torch.distributed as dist

from hvctl.models.presets import build_components, get_preset
from hvctl.parallel import apply_fsdp, apply_sequence_parallel, build_mesh, init_distributed, joint_attention


def micro_batch(shape, text_lengths, seed):
    g = torch.Generator().manual_seed(seed)
    batch, text_len = shape[0], 12
    mask = torch.arange(text_len)[None] < torch.tensor(text_lengths)[:, None]
    return dict(hidden_states=torch.randn(*shape, generator=g), timestep=torch.linspace(200.0, 800.0, batch),
                encoder_hidden_states=torch.randn(batch, text_len, 64, generator=g), encoder_attention_mask=mask,
                pooled_projections=torch.randn(batch, 32, generator=g))


def mixed_buckets(ranks) -> dict:
    torch.manual_seed(0)
    reference = build_components(get_preset("tiny"))["transformer"].float()
    model = copy.deepcopy(reference)
    mesh = build_mesh(ranks, "cpu", ring=2)
    apply_sequence_parallel(model, mesh)
    apply_fsdp(model, mesh)
    batches = [micro_batch((1, 16, 3, 8, 8), [9], seed=1), micro_batch((2, 16, 1, 8, 12), [12, 5], seed=2)]
    errors = {"output": 0.0, "grad": 0.0, "grad_scale": 0.0, "tokens": []}
    model.transformer_blocks[0].register_forward_pre_hook(lambda m, args: errors["tokens"].append(args[0].shape[1]))
    for batch in batches:  # gradient accumulation over the two buckets, as a training step does
        ref_out = reference(**batch, return_dict=False)[0]
        out = model(**batch, return_dict=False)[0]
        ref_out.square().mean().backward()
        out.square().mean().backward()
        errors["output"] = max(errors["output"], float((out - ref_out).abs().max().detach()))
    ref_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        errors["grad"] = max(errors["grad"], float((param.grad.full_tensor() - ref_grads[name].grad).abs().max()))
        errors["grad_scale"] = max(errors["grad_scale"], float(ref_grads[name].grad.abs().max()))
    return errors


def peak_bytes(fn) -> int:
    """The most bytes fn had allocated at once beyond what was allocated before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def attention_memory(ranks, video_tokens: int) -> int:
    """Forward and backward of joint attention over `video_tokens` (half on each rank) and 16 text tokens."""
    mesh = build_mesh(ranks, "cpu", ring=2)
    g = torch.Generator().manual_seed(ranks.rank)
    heads, dim, local = 2, 32, video_tokens // 2
    video = [torch.randn(1, local, heads, dim, generator=g, requires_grad=True) for _ in range(3)]
    text = [torch.randn(1, 16, heads, dim, generator=g, requires_grad=True) for _ in range(3)]
    mask = torch.arange(16)[None] < 10

    def step():
        video_out, text_out = joint_attention(video, text, mask, ring=mesh["ring"].get_group())
        (video_out.sum() + text_out.sum()).backward()

    step()  # warm-up: the kernels' and the process group's one-time buffers
    return peak_bytes(step)


def main() -> None:
    ranks = init_distributed("cpu")
    report = {"rank": ranks.rank, **mixed_buckets(ranks),
              "memory": {n: attention_memory(ranks, n) for n in (2048, 8192)}}
    reports = [None] * ranks.world_size
    dist.all_gather_object(reports, report)
    if ranks.is_main:
        print("\n".join(json.dumps(r) for r in reports), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
