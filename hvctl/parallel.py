"""Parallelism in one place: launching torchrun, the process group, and data parallelism
applied to a plain model from outside.

The training loop stays free of parallel code: it asks this module which rank it is, wraps the
model once with `apply_data_parallel`, and reduces its logged metrics with `mean_across_ranks`.
Data-parallel training of W processes with gradient accumulation A equals one process with
accumulation A*W: rank r takes the micro-batches r, r+W, r+2W, ... of the one global stream.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass

from hvctl.errors import HvctlError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(argv: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
           rdzv_id: str | None = None) -> None:
    """Run `python -m hvctl *argv` under torchrun's elastic agent, `nproc` processes per node.

    One node: a private rendezvous on localhost. Several: the c10d rendezvous at rdzv_endpoint
    (host:port of node 0), which every node joins with the same rdzv_id. A failed rank stops the
    others; the failure is one line here, the rank's own message is above it.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nnodes > 1 and not rdzv_endpoint:
        raise HvctlError(f"--nnodes {nnodes}: multi-node runs need --rdzv-endpoint HOST:PORT (node 0's address)")
    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, run_id=rdzv_id or f"hvctl-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=rdzv_endpoint or "localhost:0", max_restarts=0, monitor_interval=0.5,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "hvctl", *argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise HvctlError(f"rank {rank} of {nproc * nnodes} failed (exit code {failure.exitcode}); "
                         "its message is above") from None


def init_distributed(device_type: str) -> Ranks:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); one process: nothing."""
    if not under_torchrun():
        return Ranks()
    import torch
    import torch.distributed as dist

    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if ranks.distributed and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return ranks


def apply_data_parallel(model, ranks: Ranks):
    """Replicate the model over the ranks: identical start, gradients averaged after backward.
    The module keeps its class, config and state_dict keys."""
    if not ranks.distributed:
        return model
    from torch.distributed._composable.replicate import replicate

    return replicate(model)


def mean_across_ranks(values: dict[str, float], ranks: Ranks) -> dict[str, float]:
    if not ranks.distributed or not values:
        return values
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return {k: float(v) / ranks.world_size for k, v in zip(keys, tensor)}


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
