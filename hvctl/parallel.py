"""Parallelism in one place: launching torchrun (or joining srun), the process group, the named
DeviceMesh, and what is applied to a plain model from outside: data parallelism, FSDP2,
Ulysses and ring sequence parallelism, activation checkpointing and offload, and the balancing
of micro-batches over data shards.

The training loop stays free of parallel code: it asks this module which rank it is, hands the
plain model to `parallelize` once, and reduces its logged metrics with `mean_across_ranks`.
Data-parallel training of D data shards with gradient accumulation A equals one process with
accumulation A*D: shard d takes the micro-batches d, d+D, d+2D, ... of the one global stream.
"""

from __future__ import annotations

import os
import sys
import uuid
import warnings
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
    """Started as one of several processes: by torchrun, or by SLURM's srun (one task per process,
    whose variables are mapped to torch's here)."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        if "MASTER_ADDR" not in os.environ:
            raise HvctlError("under srun with several tasks, set MASTER_ADDR to node 0's address (and MASTER_PORT), e.g. "
                             "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -1)")
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_PORT", "29500")
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(argv: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
           rdzv_id: str | None = None, max_restarts: int = 0) -> None:
    """Run `python -m hvctl *argv` under torchrun's elastic agent, `nproc` processes per node.

    One node: a private rendezvous on localhost. Several: the c10d rendezvous at rdzv_endpoint
    (host:port of node 0), which every node joins with the same rdzv_id. A failed rank stops the
    others; with max_restarts, all are started again (and resume from the last checkpoint);
    a final failure is one line here, the rank's own message is above it.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nnodes > 1 and not rdzv_endpoint:
        raise HvctlError(f"--nnodes {nnodes}: multi-node runs need --rdzv-endpoint HOST:PORT (node 0's address)")
    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, run_id=rdzv_id or f"hvctl-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=rdzv_endpoint or "localhost:0", max_restarts=max_restarts, monitor_interval=0.5,
    )
    # Rank 0 of each attempt hosts its own store: the agent's shared one keeps the dead attempt's
    # addresses, and restarted ranks would dial them.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # The processes share the node's cores: more torch threads than cores make every step crawl.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "hvctl", *argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise HvctlError(f"rank {rank} of {nproc * nnodes} failed (exit code {failure.exitcode}); "
                         "its message is above") from None


LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--rdzv-id", "--max-restarts")


def without_launch_options(argv: list[str]) -> list[str]:
    """The command line each torchrun worker runs: this one, less the options that launched it."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in LAUNCH_OPTIONS)):
            kept.append(arg)
    return kept


def relaunch(nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
             max_restarts: int = 0, check=None) -> bool:
    """The one place a command becomes several processes: when more than one is asked for and
    this is not one of them, run check() (so that bad settings are one line here, not one per
    process), then this same command line under torchrun, and return True; else return False
    and let the caller do the work (as one process, or as one of torchrun's)."""
    if (nproc <= 1 and nnodes <= 1) or under_torchrun():
        return False
    if check is not None:
        check()
    launch(without_launch_options(sys.argv[1:]), nproc, nnodes, rdzv_endpoint, rdzv_id, max_restarts)
    return True


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
            dist.barrier()  # a rank leaving while another's collective threads still run can abort it
            dist.destroy_process_group()


# -- sequence parallelism ---------------------------------------------------------------------
#
# HunyuanVideo's attention is joint: video tokens and text tokens attend to each other, with
# the text's padding masked. Video tokens are sharded over the sequence-parallel ranks (ring
# rank-major, Ulysses rank-minor); the short text stream is replicated on every rank. Ulysses
# trades sequence shards for head shards with an all-to-all; ring attention then passes key and
# value blocks around the ring, merging partial results by their log-sum-exp. The model's own
# forward is untouched: hooks shard the patch embedding and the rotary table on the way in and
# gather the output projection on the way out, and an attention processor does the rest.


def _seq_to_heads(x, group):
    """(B, N/U, H, d) sequence shard -> (B, N, H/U, d) head shard, over a Ulysses group of U ranks."""
    import torch.distributed._functional_collectives as funcol

    u = group.size()
    b, n, h, d = x.shape
    x = x.reshape(b, n, u, h // u, d).permute(2, 0, 1, 3, 4).contiguous()  # chunk j goes to rank j
    x = funcol.wait_tensor(funcol.all_to_all_single_autograd(x, None, None, group))  # chunk j came from rank j
    return x.permute(1, 0, 2, 3, 4).reshape(b, u * n, h // u, d)


def _heads_to_seq(x, group):
    """The inverse of _seq_to_heads: (B, N, H/U, d) -> (B, N/U, H, d)."""
    import torch.distributed._functional_collectives as funcol

    u = group.size()
    b, n, h, d = x.shape
    x = x.reshape(b, u, n // u, h, d).transpose(0, 1).contiguous()
    x = funcol.wait_tensor(funcol.all_to_all_single_autograd(x, None, None, group))  # (U, B, N/U, H/U, d), heads of rank j
    return x.permute(1, 2, 0, 3, 4).reshape(b, n // u, u * h, d)


# -- ring attention on fused kernels --------------------------------------------------------------
#
# Every block of keys goes through a fused kernel that returns the block's log-sum-exp, so no score
# matrix is ever materialised and a rank's memory grows linearly with the sequence; blocks merge by
# their log-sum-exp. The backward runs each block's fused backward against the merged output and
# log-sum-exp (as flash attention does across its own tiles), and the key/value gradients travel
# the ring beside the blocks they belong to, reaching their owner after the last step.


class _Kernel:
    """A fused attention that returns its log-sum-exp. q, k, v, out: (B, N, H, d); lse: (B, H, N)
    float32; `state` is whatever the backward needs besides (the CUDA kernels' RNG state)."""

    trains = True

    def forward(self, q, k, v):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, state):
        raise NotImplementedError


def _heads_first(*tensors):
    return [t.transpose(1, 2) for t in tensors]


class _CpuFlash(_Kernel):
    """torch's flash attention for the CPU (what SDPA runs there)."""

    def forward(self, q, k, v):
        import torch

        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*_heads_first(q, k, v))
        return out.transpose(1, 2), lse, None

    def backward(self, dout, q, k, v, out, lse, state):
        import torch

        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*_heads_first(dout, q, k, v, out), lse,
                                                                                      0.0, False)
        return _heads_first(*grads)


class _CudaSdpa(_Kernel):
    """torch's SDPA kernels on CUDA: flash attention for half precision, memory-efficient for fp32."""

    def forward(self, q, k, v):
        import torch

        if q.dtype in (torch.float16, torch.bfloat16):
            out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(*_heads_first(q, k, v))
        else:
            out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(*_heads_first(q, k, v), None, True)
            lse = lse[..., :q.shape[1]]  # padded to a multiple of 32 queries
        return out.transpose(1, 2), lse, (seed, offset)

    def backward(self, dout, q, k, v, out, lse, state):
        import torch

        seed, offset = state
        if q.dtype in (torch.float16, torch.bfloat16):
            grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                *_heads_first(dout, q, k, v, out), lse, None, None, q.shape[1], k.shape[1], 0.0, False, seed, offset)
        else:
            padded = torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32))
            grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                *_heads_first(dout, q, k, v), None, out.transpose(1, 2), padded, seed, offset, 0.0, [True, True, True, False])[:3]
        return _heads_first(*grads)


class _FlashAttn2(_Kernel):
    """flash-attn 2, through the wrappers diffusers' own ring attention calls."""

    def forward(self, q, k, v):
        from diffusers.models.attention_dispatch import _wrapped_flash_attn_forward

        out, lse, _, rng = _wrapped_flash_attn_forward(q, k, v, 0.0, q.shape[-1] ** -0.5, False, -1, -1, 0.0, None, False)
        return out, lse, rng

    def backward(self, dout, q, k, v, out, lse, state):
        import torch
        from diffusers.models.attention_dispatch import _wrapped_flash_attn_backward

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _wrapped_flash_attn_backward(dout.contiguous(), q, k, v, out, lse, dq, dk, dv, 0.0, q.shape[-1] ** -0.5, False,
                                     -1, -1, 0.0, None, False, state)
        return dq, dk, dv


class _FlashAttn3(_Kernel):
    """flash-attn 3 (Hopper): its public function for the forward, its backward as diffusers calls it."""

    def forward(self, q, k, v):
        import flash_attn_interface

        out, lse = flash_attn_interface.flash_attn_func(q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=False,
                                                        return_attn_probs=True)[:2]
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, state):
        import flash_attn_interface
        import torch

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        flash_attn_interface._flash_attn_backward(dout.contiguous(), q, k, v, out, lse, None, None, None, None, None, None,
                                                  dq, dk, dv, q.shape[-1] ** -0.5, False, -1, -1, 0.0, False, 0)
        return dq, dk, dv


class _Sage(_Kernel):
    """SageAttention: quantised, inference only (it has no backward)."""

    trains = False

    def forward(self, q, k, v):
        from sageattention import sageattn

        out, lse = sageattn(q, k, v, tensor_layout="NHD", is_causal=False, return_lse=True)[:2]
        return out, lse.float(), None

    def backward(self, dout, q, k, v, out, lse, state):
        raise HvctlError("--attention sage has no backward pass: train with sdpa, flash or flash3")


# diffusers' backend names (as --attention sets them, hvctl/accelerate.py) -> the fused kernel of a
# ring step; the masked "varlen" forms need no mask here (the text padding is cut off instead).
_RING_KERNELS = {"flash_varlen": _FlashAttn2, "flash": _FlashAttn2, "_flash_varlen_3": _FlashAttn3, "_flash_3": _FlashAttn3,
                 "sage_varlen": _Sage, "sage": _Sage}


def ring_kernel(backend: str | None, device) -> _Kernel:
    """The fused kernel that ring attention runs for diffusers' `backend` (None, native, the math
    kernel: torch's SDPA kernel of the device)."""
    if backend in _RING_KERNELS:
        return _RING_KERNELS[backend]()
    return _CudaSdpa() if device.type == "cuda" else _CpuFlash()


def _merge(out, lse, block_out, block_lse):
    """Two partial attentions over disjoint key blocks -> the attention over both (out in fp32)."""
    import torch

    if out is None:
        return block_out.float(), block_lse
    merged = torch.logaddexp(lse, block_lse)
    weight = lambda l: (l - merged).exp().transpose(1, 2).unsqueeze(-1)  # noqa: E731  (B, H, N) -> (B, N, H, 1)
    return out * weight(lse) + block_out.float() * weight(block_lse), merged


def _text_calls(text_lengths: list[int]):
    """The text block's kernel calls: (batch slice, unpadded length) per run of equal lengths."""
    calls, start = [], 0
    for b in range(1, len(text_lengths) + 1):
        if b == len(text_lengths) or text_lengths[b] != text_lengths[start]:
            calls.append((slice(start, b), text_lengths[start]))
            start = b
    return calls


def _text_forward(kernel, q, text_k, text_v, text_lengths):
    """Attention of q over the text keys with their padding cut off; an empty text weighs nothing."""
    import torch

    outs, lses, states = [], [], []
    for rows, n in _text_calls(text_lengths):
        if n == 0:
            out, lse, state = q[rows].new_zeros(q[rows].shape), q.new_full((q[rows].shape[0], q.shape[2], q.shape[1]),
                                                                          float("-inf"), dtype=torch.float32), None
        else:
            out, lse, state = kernel.forward(q[rows], text_k[rows, :n], text_v[rows, :n])
        outs.append(out)
        lses.append(lse.float())
        states.append(state)
    return torch.cat(outs), torch.cat(lses), states


def _text_backward(kernel, dout, q, text_k, text_v, out, lse, text_lengths, states):
    import torch

    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(text_k), torch.zeros_like(text_v)
    for (rows, n), state in zip(_text_calls(text_lengths), states):
        if n:
            dq[rows], dk[rows, :n], dv[rows, :n] = kernel.backward(dout[rows], q[rows], text_k[rows, :n], text_v[rows, :n],
                                                                   out[rows], lse[rows], state)
    return dq, dk, dv


def _shift_start(x, group, step: int = 1):
    """Start passing x `step` ranks along the ring (and taking the one `step` behind's)."""
    import torch
    import torch.distributed as dist

    size, rank = group.size(), dist.get_rank(group)
    x = x.contiguous()
    received = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, dist.get_global_rank(group, (rank + step) % size), group),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - step) % size), group)]
    return received, dist.batch_isend_irecv(ops)


def _shift_finish(pending):
    received, requests = pending
    for request in requests:
        request.wait()
    return received


class _RingAttention:
    """Autograd of joint attention over a ring: q (B, Nq, H, d) attends to every rank's video key
    block (this rank's: k, v (B, Nv, H, d)) and to the replicated text keys (B, L, H, d), whose
    padding (trailing, text_lengths valid per sample) is cut off rather than masked."""

    @staticmethod
    def apply(q, k, v, text_k, text_v, text_lengths, kernel, ring):
        import torch

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, text_k, text_v):
                out, lse, ctx.text_states = _text_forward(kernel, q, text_k, text_v, text_lengths)
                out = out.float()
                block, ctx.states = torch.stack([k, v]), []
                for i in range(ring.size()):
                    # The next block travels while this one is computed.
                    pending = _shift_start(block, ring) if i < ring.size() - 1 else None
                    block_out, block_lse, state = kernel.forward(q, *block.unbind(0))
                    out, lse = _merge(out, lse, block_out, block_lse.float())
                    ctx.states.append(state)
                    if pending is not None:
                        block = _shift_finish(pending)
                out = out.to(q.dtype)
                ctx.save_for_backward(q, k, v, text_k, text_v, out, lse)
                return out

            @staticmethod
            def backward(ctx, dout):
                q, k, v, text_k, text_v, out, lse = ctx.saved_tensors
                dout = dout.contiguous()
                dq, dtext_k, dtext_v = _text_backward(kernel, dout, q, text_k, text_v, out, lse, text_lengths,
                                                      ctx.text_states)
                dq, block, carried = dq.float(), torch.stack([k, v]), None
                for i in range(ring.size()):
                    pending = _shift_start(block, ring) if i < ring.size() - 1 else None
                    block_dq, block_dk, block_dv = kernel.backward(dout, q, *block.unbind(0), out, lse, ctx.states[i])
                    dq += block_dq
                    # `carried` sums the other ranks' gradients of the block this rank holds now;
                    # passed on, it reaches the block's owner one step after the last.
                    partial = torch.stack([block_dk, block_dv]).float()
                    carried = partial if carried is None else carried + partial
                    carried = _shift_finish(_shift_start(carried, ring))
                    if pending is not None:
                        block = _shift_finish(pending)
                dk, dv = carried.to(k.dtype).unbind(0)
                return dq.to(q.dtype), dk, dv, dtext_k, dtext_v

        return Function.apply(q, k, v, text_k, text_v)


def joint_attention(video_qkv, text_qkv, text_mask, ulysses=None, ring=None, backend=None):
    """Attention of video and text queries over all video and (unpadded) text keys.

    video_qkv: this rank's shard of the video queries, keys, values, each (B, N/S, H, d);
    text_qkv: the whole text's, each (B, L, H, d); text_mask: (B, L) bool. Returns (video
    output shard (B, N/S, H, d), text output (B, L, H, d)); with no groups, plain attention.
    Without ring, the attention is diffusers' dispatcher's `backend` (None: its default), the
    kernel that --attention chose; with ring, that kernel's fused form returning its log-sum-exp
    runs each block (ring_kernel), and _RingAttention merges them.
    """
    import torch
    import torch.distributed._functional_collectives as funcol

    length = text_qkv[0].shape[1]
    if ulysses is not None and ulysses.size() > 1:
        heads = text_qkv[0].shape[2] // ulysses.size()
        rank = ulysses.rank()
        video_qkv = [_seq_to_heads(t, ulysses) for t in video_qkv]
        text_qkv = [t[:, :, rank * heads:(rank + 1) * heads] for t in text_qkv]
    if ring is None or ring.size() == 1:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        q, k, v = (torch.cat([a, b], dim=1) for a, b in zip(video_qkv, text_qkv))  # (B, N + L, H, d)
        video_len = q.shape[1] - length
        mask = torch.cat([text_mask.new_ones(text_mask.shape[0], video_len), text_mask], dim=1)
        out = dispatch_attention_fn(q, k, v, attn_mask=mask[:, None, None, :], backend=backend)
    else:
        q = torch.cat([video_qkv[0], text_qkv[0]], dim=1)  # (B, N + L, H, d): video and text queries alike
        video_len = q.shape[1] - length
        # HunyuanVideo pads its text at the end (the model builds its mask from the lengths).
        text_lengths = text_mask.sum(dim=1)
        if not (text_mask == (torch.arange(length, device=text_mask.device) < text_lengths[:, None])).all():
            raise HvctlError("ring attention: the text padding must come after the text (a mask of leading ones per sample)")
        text_lengths = text_lengths.tolist()
        out = _RingAttention.apply(q, *video_qkv[1:], *text_qkv[1:], text_lengths, ring_kernel(backend, q.device), ring)
    video_out, text_out = out[:, :video_len], out[:, video_len:]
    if ulysses is not None and ulysses.size() > 1:
        video_out = _heads_to_seq(video_out, ulysses)
        text_out = funcol.wait_tensor(funcol.all_gather_tensor_autograd(text_out.contiguous(), 2, ulysses))
    return video_out, text_out


class SequenceParallelAttnProcessor:
    """HunyuanVideoAttnProcessor2_0's computation, with the attention itself over the sharded sequence."""

    _attention_backend = None  # set by --attention (hvctl/accelerate.py), as on diffusers' processors

    def __init__(self, ulysses, ring):
        self.ulysses, self.ring = ulysses, ring

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        import torch
        from diffusers.models.embeddings import apply_rotary_emb

        length = encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None  # single-stream blocks project video and text together
        joint = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single_stream else hidden_states
        q, k, v = (proj(joint).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if single_stream:
            (q, text_q), (k, text_k), (v, text_v) = ((t[:, :-length], t[:, -length:]) for t in (q, k, v))
        else:
            text_q, text_k, text_v = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        text_mask = attention_mask[:, 0, 0, -length:] if attention_mask is not None else \
            torch.ones(q.shape[0], length, dtype=torch.bool, device=q.device)
        video_out, text_out = joint_attention((q, k, v), (text_q, text_k, text_v), text_mask, self.ulysses, self.ring,
                                              self._attention_backend)
        video_out, text_out = video_out.flatten(2, 3).to(q.dtype), text_out.flatten(2, 3).to(q.dtype)
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def _shard_sequence(x, group, dim: int):
    """This rank's contiguous 1/S of x along dim."""
    size = group.size()
    if x.shape[dim] % size:
        raise HvctlError(f"sequence parallelism over {size} ranks: {x.shape[dim]} video tokens do not split evenly; "
                         f"choose frames/height/width so that the token count is a multiple of {size}")
    return x.chunk(size, dim=dim)[group.rank()]


def video_tokens(dit_config: dict, vae_config: dict, frames: int, height: int, width: int) -> int:
    """The DiT's video tokens for a (frames, height, width) video, from the two configs alone."""
    from hvctl.models.vae import latent_shape

    _, t, h, w = latent_shape(vae_config, dit_config.get("in_channels", 16), frames, height, width)
    p, pt = dit_config.get("patch_size", 2), dit_config.get("patch_size_t", 1)
    return t // pt * (h // p) * (w // p)


def check_sequence_split(sizes, dit_config: dict, vae_config: dict, ulysses: int, ring: int, what: str) -> None:
    """Before any rank starts: every (frames, height, width) in `sizes` gives a token count that
    splits evenly over ulysses x ring ranks, and the Ulysses degree divides the heads."""
    heads = dit_config.get("num_attention_heads", 24)
    if heads % ulysses:
        raise HvctlError(f"{what}: Ulysses degree {ulysses} must divide the model's {heads} attention heads")
    ranks = ulysses * ring
    for frames, height, width in sizes:
        tokens = video_tokens(dit_config, vae_config, frames, height, width)
        if tokens % ranks:
            raise HvctlError(f"{what}: {frames} frames of {width}x{height} make {tokens} video tokens, which do not split "
                             f"evenly over ulysses {ulysses} x ring {ring} = {ranks} ranks; choose sizes whose token "
                             f"count is a multiple of {ranks}")


def apply_sequence_parallel(transformer, mesh) -> None:
    """Shard a HunyuanVideo transformer's video tokens over mesh's "ring" x "ulysses" ranks.

    The model keeps its class, parameters and forward; every rank passes the whole input and
    gets the whole output, so callers (the training objective, the sampler) do not change.
    """
    import torch.distributed._functional_collectives as funcol

    ulysses, ring = mesh["ulysses"].get_group(), mesh["ring"].get_group()
    if ulysses.size() * ring.size() == 1:
        return
    heads = transformer.config.num_attention_heads
    if heads % ulysses.size():
        raise HvctlError(f"Ulysses degree {ulysses.size()} must divide the model's {heads} attention heads")
    sequence = mesh["ring", "ulysses"]._flatten("sequence").get_group()  # ring-major, as the shards are laid out
    processor = SequenceParallelAttnProcessor(ulysses, ring)
    # The kernel --attention (or a recipe's `attention`) chose stays the kernel.
    processor._attention_backend = transformer.transformer_blocks[0].attn.processor._attention_backend
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.attn.set_processor(processor)
    transformer.x_embedder.register_forward_hook(lambda m, args, out: _shard_sequence(out, sequence, 1))
    transformer.rope.register_forward_hook(lambda m, args, out: tuple(_shard_sequence(t, sequence, 0) for t in out))
    transformer.proj_out.register_forward_hook(
        lambda m, args, out: funcol.wait_tensor(funcol.all_gather_tensor_autograd(out.contiguous(), 1, sequence)))


# -- the device mesh, FSDP, activation checkpointing and offload ------------------------------

MESH_DIMS = ("data", "fsdp", "ring", "ulysses")


def build_mesh(ranks: Ranks, device_type: str, *, fsdp: int = 1, ring: int = 1, ulysses: int = 1):
    """The named DeviceMesh (data, fsdp, ring, ulysses); data takes the ranks the others leave."""
    inner = fsdp * ring * ulysses
    if min(fsdp, ring, ulysses) < 1 or ranks.world_size % inner:
        raise HvctlError(f"fsdp {fsdp} x ring {ring} x ulysses {ulysses} = {inner} does not divide "
                         f"the {ranks.world_size} processes")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (ranks.world_size // inner, fsdp, ring, ulysses), mesh_dim_names=MESH_DIMS)


def data_rank(mesh) -> tuple[int, int]:
    """(index, count) of this rank's data shard: ranks of one sequence-parallel group share a batch."""
    data, fsdp = mesh["data"], mesh["fsdp"]
    return data.get_local_rank() * fsdp.size() + fsdp.get_local_rank(), data.size() * fsdp.size()


def _blocks(model):
    """The repeated blocks of a DiT or VAE: the units of sharding and checkpointing."""
    if hasattr(model, "transformer_blocks"):
        return [*model.transformer_blocks, *model.single_transformer_blocks]
    return [*model.encoder.down_blocks, model.encoder.mid_block, model.decoder.mid_block, *model.decoder.up_blocks]


def apply_fsdp(model, mesh, *, param_dtype=None, reduce_dtype=None, cpu_offload: bool = False) -> None:
    """FSDP2 per block, then the root. Parameters are sharded over fsdp x ring x ulysses (the
    sequence-parallel ranks hold the same parameters) and replicated over data; gradients are
    averaged over every rank, which is what makes sequence-parallel gradients whole."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh["fsdp", "ring", "ulysses"]._flatten("shard")
    with warnings.catch_warnings():  # torch's notice about slicing flattened dims; torchtitan does the same
        warnings.simplefilter("ignore", UserWarning)
        dp_mesh = mesh["data", "shard"]
    policy = dict(mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for block in _blocks(model):
        fully_shard(block, mesh=dp_mesh, **policy)
    fully_shard(model, mesh=dp_mesh, **policy)


def apply_activation_checkpointing(model, every: int = 1, offload: bool = False) -> None:
    """Recompute every `every`-th block's activations in the backward pass instead of keeping
    them; with offload, keep the other blocks' activations in (pinned) CPU memory instead.

    Each block's forward is wrapped in place, so the module tree and its state_dict keys stay
    the diffusers model's own, and FSDP's hooks (on the block's call) stay outside the recompute.
    """
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint

    def offloaded(forward, *args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return forward(*args, **kwargs)

    for i, block in enumerate(_blocks(model)):
        if every and i % every == 0:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        elif offload:
            block.forward = functools.partial(offloaded, block.forward)


def parallelize(model, ranks: Ranks, device_type: str, cfg, *, param_dtype=None):
    """Apply a recipe's `parallel:` settings (hvctl.train.config.ParallelConfig) to a plain model.

    Returns the mesh (None for one process). Sequence parallelism applies to a DiT; sharded or
    sequence-parallel runs go through FSDP2, plain data parallelism through `replicate`. Every
    way, gradients are averaged over all ranks and the module keeps its class and state_dict keys.
    """
    if cfg.activation_checkpointing or cfg.activation_offload:
        apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.activation_offload)
    sharded = cfg.fsdp * cfg.ring * cfg.ulysses > 1
    if cfg.cpu_offload and device_type == "cpu":
        raise HvctlError("parallel.cpu_offload moves FSDP's parameters and optimizer state from the GPU to CPU memory; "
                         "this run is on the CPU already: set it to false")
    if not ranks.distributed:
        if sharded:
            raise HvctlError(f"parallel: fsdp {cfg.fsdp}, ulysses {cfg.ulysses}, ring {cfg.ring} need that many "
                             "processes (--nproc)")
        return None
    mesh = build_mesh(ranks, device_type, fsdp=cfg.fsdp, ring=cfg.ring, ulysses=cfg.ulysses)
    if cfg.ring * cfg.ulysses > 1:
        if not hasattr(model, "transformer_blocks"):
            raise HvctlError("parallel.ulysses/ring: sequence parallelism applies to the DiT, not the VAE")
        apply_sequence_parallel(model, mesh)
    if sharded:
        import torch

        apply_fsdp(model, mesh, param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                   cpu_offload=cfg.cpu_offload)
    else:
        from torch.distributed._composable.replicate import replicate

        replicate(model)
    return mesh


class SequenceParallelInference:
    """One process of a parallel generation: its rank, device and mesh. The mesh's "data"
    dimension carries CFG parallelism (cfg = 2: the two guidance passes on two process groups)."""

    def __init__(self, ulysses: int, ring: int, device, cfg: int = 1):
        import torch

        self.ranks = init_distributed(device.type)
        if self.ranks.world_size != ulysses * ring * cfg:
            raise HvctlError(f"--ulysses-degree {ulysses} x --ring-degree {ring}" + (" x 2 (--cfg-parallel)" if cfg > 1 else "")
                             + f" needs {ulysses * ring * cfg} processes, this run has {self.ranks.world_size}")
        self.device = torch.device("cuda", self.ranks.local_rank) if device.type == "cuda" else device
        self.mesh = build_mesh(self.ranks, device.type, ring=ring, ulysses=ulysses)
        self.cfg_group = self.mesh["data"].get_group() if cfg > 1 else None

    def agree(self, value):
        """Rank 0's value on every rank (a seed drawn at random, say)."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def apply(self, transformer) -> None:
        apply_sequence_parallel(transformer, self.mesh)

    def close(self) -> None:
        shutdown(self.ranks)


def sequence_parallel_inference(ulysses: int, ring: int, device, cfg: int = 1) -> SequenceParallelInference | None:
    """None when the degrees ask for one process; else this process's part (run under torchrun)."""
    if ulysses * ring * cfg == 1:
        return None
    if not under_torchrun():
        raise HvctlError(f"parallel generation runs under torchrun with {ulysses * ring * cfg} processes "
                         "(`hvctl generate` starts them itself)")
    return SequenceParallelInference(ulysses, ring, device, cfg)


# -- runtime-balanced batching (Seaweed) ------------------------------------------------------


def sequence_cost(tokens: int, hidden: int) -> float:
    """Relative compute of one sample of `tokens` tokens through a transformer of width `hidden`:
    the projections and MLP cost ~24*n*D^2 FLOPs per layer, attention ~4*n^2*D."""
    return tokens * (1 + tokens / (6 * hidden))


def balance_micro_batches(costs: list[float], shards: int, per_shard: int) -> list[int]:
    """The data shard of each micro-batch: `per_shard` each, with the shards' summed costs as even
    as greedy allows (largest first, to the least loaded shard with room).

    Gradients are synchronised once a step, so a step takes as long as its slowest shard; with
    mixed buckets (images beside 129-frame videos) a fixed assignment leaves the others idle.
    """
    loads, counts, owners = [0.0] * shards, [0] * shards, [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        shard = min((s for s in range(shards) if counts[s] < per_shard), key=lambda s: (loads[s], s))
        owners[j] = shard
        loads[shard] += costs[j]
        counts[shard] += 1
    return owners
