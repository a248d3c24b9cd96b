"""Run under torchrun: sequence-parallel sampling against one process; prints rank 0's largest latent error.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed/generate_check.py MODEL ULYSSES RING
"""

import json
import sys

import torch

from hvctl.generate import GenerateRecipe, TextToVideo, prepare
from hvctl.parallel import sequence_parallel_inference


def main(model: str, ulysses: int, ring: int) -> None:
    r, model_dir = prepare(GenerateRecipe(prompt="a red circle moves left on a black background", model=model, seed=3,
                                          steps=4, guidance_scale=2.0))
    t2v = TextToVideo(model_dir, r, torch.device("cpu"), torch.float32)
    single = t2v.latents([3, 4])  # before sharding: the one-process reference, on every rank
    parallel = sequence_parallel_inference(ulysses, ring, torch.device("cpu"))
    parallel.apply(t2v.parts.transformer)
    sharded = t2v.latents([3, 4])
    if parallel.ranks.is_main:
        print(json.dumps({"error": float((sharded - single).abs().max()), "scale": float(single.abs().max())}), flush=True)
    parallel.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
