"""Runtime-balanced batching (parallel.balance): the idle time it saves on a mixed-bucket dataset.

1. Measured: seconds per training micro-batch (forward, backward; batch 2) of the `tiny` DiT on
   this CPU for each toy bucket: images (64x64, 64x96) and videos of 9, 17 and 33 frames, beside
   hvctl's cost estimate (hvctl.parallel.sequence_cost) for the same bucket.
2. Simulated with those measured times: the training stream of a mixed dataset (hvctl's
   BucketBatchSampler: 30% image steps, buckets in proportion to their sample counts), dealt to D
   data shards with A micro-batches each per step, by the fixed rule (micro-batch j to shard
   j mod D) and by `balance_micro_batches`. A step lasts as long as its slowest shard (gradients
   are synchronised once a step); idle = 1 - mean shard time / slowest shard time, summed over
   the steps. Only the assignment differs between the two: the same micro-batches, the same
   gradients.

Run:
    python benchmarks/balanced_batching.py
    python benchmarks/balanced_batching.py --shards 8 --accumulation 4 --steps 500
"""

from __future__ import annotations

import argparse
import time

BUCKETS = {  # (height, width, frames): samples in the simulated dataset
    (64, 64, 1): 3000, (64, 96, 1): 1500,
    (64, 64, 9): 1500, (64, 96, 17): 1000, (64, 64, 33): 600, (96, 64, 33): 400,
}


def measure(repeats: int) -> dict:
    import torch

    from hvctl.models.presets import build_components, get_preset
    from hvctl.parallel import sequence_cost

    torch.manual_seed(0)
    model = build_components(get_preset("tiny"))["transformer"].float().train()
    c = model.config
    out = {}
    for height, width, frames in BUCKETS:
        latent = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
        inputs = dict(hidden_states=torch.randn(2, *latent), timestep=torch.full((2,), 500.0),
                      encoder_hidden_states=torch.randn(2, 40, 64), encoder_attention_mask=torch.ones(2, 40, dtype=torch.bool),
                      pooled_projections=torch.randn(2, 32))
        model(**inputs, return_dict=False)[0].square().mean().backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(**inputs, return_dict=False)[0].square().mean().backward()
        tokens = latent[1] * (latent[2] // c.patch_size) * (latent[3] // c.patch_size)
        out[(height, width, frames)] = {"seconds": (time.perf_counter() - t0) / repeats, "tokens": tokens,
                                        "estimate": 2 * sequence_cost(tokens, c.num_attention_heads * c.attention_head_dim)}
    return out


def simulate(seconds: dict, estimates: dict, shards: int, accumulation: int, steps: int) -> dict:
    from hvctl.data.batching import BucketBatchSampler
    from hvctl.parallel import balance_micro_batches

    indices, bucket_of, start = {}, {}, 0
    for bucket, count in BUCKETS.items():
        indices[bucket] = list(range(start, start + count))
        bucket_of.update({i: bucket for i in indices[bucket]})
        start += count
    sampler = BucketBatchSampler(indices, batch_size=2, seed=0, image_ratio=0.3)
    totals = {"fixed": [0.0, 0.0], "balanced": [0.0, 0.0]}  # (step time, idle shard time)
    for _ in range(steps):
        drawn = [bucket_of[next(sampler)[0]] for _ in range(shards * accumulation)]
        owners = {"fixed": [j % shards for j in range(len(drawn))],
                  "balanced": balance_micro_batches([estimates[b] for b in drawn], shards, accumulation)}
        for rule, owner in owners.items():
            load = [sum(seconds[b] for b, o in zip(drawn, owner) if o == s) for s in range(shards)]
            totals[rule][0] += max(load)
            totals[rule][1] += sum(max(load) - x for x in load) / shards
    return {rule: {"seconds": t, "idle": idle / t} for rule, (t, idle) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    measured = measure(args.repeats)
    print(f"{'bucket (h x w x frames)':24} {'tokens':>7} {'s/micro-batch':>14} {'estimate':>9} {'s per unit':>11}")
    for (h, w, f), m in measured.items():
        print(f"{f'{h} x {w} x {f}':24} {m['tokens']:7d} {m['seconds']:14.4f} {m['estimate']:9.1f} "
              f"{m['seconds'] / m['estimate'] * 1000:11.3f}m")
    result = simulate({b: m["seconds"] for b, m in measured.items()}, {b: m["estimate"] for b, m in measured.items()},
                      args.shards, args.accumulation, args.steps)
    fixed, balanced = result["fixed"], result["balanced"]
    print(f"\n{args.steps} steps, {args.shards} data shards x {args.accumulation} micro-batches, 30% image steps:")
    for rule, r in result.items():
        print(f"  {rule:9} {r['seconds']:8.1f} s   idle {100 * r['idle']:5.1f}% of shard time")
    print(f"  balanced / fixed time: {balanced['seconds'] / fixed['seconds']:.3f}")


if __name__ == "__main__":
    main()
