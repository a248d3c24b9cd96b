"""Run under torchrun (2 processes, gloo): a parallel mode's forward and backward of the tiny DiT
against the same model in one process. Rank 0 prints one JSON line per rank with its largest errors.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed/equivalence.py MODE
MODE: ulysses, ring, fsdp (2 processes), hybrid (Ulysses 2 x ring 2: 4 processes).
"""

import copy
import json
import sys

import torch
import torch.distributed as dist

from hvctl.models.presets import build_components, get_preset
from hvctl.parallel import apply_fsdp, apply_sequence_parallel, build_mesh, data_rank, init_distributed


def inputs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    text_len = 12
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[:, 7:] = False  # padded text must stay masked
    mask[1:, 4:] = False  # and its length may differ from sample to sample
    return dict(
        hidden_states=torch.randn(batch, 16, 3, 8, 8, generator=g),
        timestep=torch.tensor([300.0, 700.0][:batch]),
        encoder_hidden_states=torch.randn(batch, text_len, 64, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 32, generator=g),
    )


def loss_of(model, batch, weight):
    out = model(**batch, return_dict=False)[0]
    return out, (out * weight).mean()


def main(mode: str) -> None:
    ranks = init_distributed("cpu")
    torch.manual_seed(0)
    reference = build_components(get_preset("tiny"))["transformer"].float()
    model = copy.deepcopy(reference)
    degrees = {"ulysses": dict(ulysses=2), "ring": dict(ring=2), "hybrid": dict(ulysses=2, ring=2), "fsdp": dict(fsdp=2)}[mode]
    mesh = build_mesh(ranks, "cpu", **degrees)
    whole = inputs(2, seed=1)
    if mode == "fsdp":  # each rank its half of the batch; the reference sees all of it
        index, count = data_rank(mesh)
        mine = {k: v.chunk(count)[index] for k, v in whole.items()}
        apply_fsdp(model, mesh)
    else:  # every rank the whole batch; the sequence is what is split
        mine = whole
        apply_sequence_parallel(model, mesh)
        apply_fsdp(model, mesh)  # averages the sequence-parallel ranks' gradients
    weight = torch.randn(whole["hidden_states"].shape, generator=torch.Generator().manual_seed(7))
    ref_out, ref_loss = loss_of(reference, whole, weight)
    ref_loss.backward()
    index, count = data_rank(mesh)
    tokens = []
    model.transformer_blocks[0].register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[1]))
    out, loss = loss_of(model, mine, weight.chunk(count)[index])
    loss.backward()
    ref_part = ref_out.chunk(count)[index]
    errors = {"tokens": tokens[0], "output": float((out - ref_part).abs().max().detach()), "grad": 0.0, "grad_scale": 0.0}
    ref_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor()
        errors["grad"] = max(errors["grad"], float((grad - ref_grads[name].grad).abs().max()))
        errors["grad_scale"] = max(errors["grad_scale"], float(ref_grads[name].grad.abs().max()))
    reports = [None] * ranks.world_size
    dist.all_gather_object(reports, {"rank": ranks.rank, "mode": mode, **errors})
    if ranks.is_main:  # one writer: lines printed by several processes can interleave
        print("\n".join(json.dumps(r) for r in reports), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
