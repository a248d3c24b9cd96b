"""Run under torchrun with 2 processes: CFG-parallel sampling against one process; prints rank 0's largest latent error.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed/cfg_parallel_check.py MODEL
"""

import json
import sys

import torch

from hvctl.generate import GenerateRecipe, TextToVideo, prepare
from hvctl.parallel import sequence_parallel_inference


def main(model: str) -> None:
    r, model_dir = prepare(GenerateRecipe(prompt="a red circle moves left on a black background", model=model, seed=3,
                                          steps=3, guidance_scale=4.0, negative_prompt="blurry", cfg_parallel=True))
    t2v = TextToVideo(model_dir, r, torch.device("cpu"), torch.float32)
    single = t2v.latents([3])  # both passes in one batch: the one-process reference, on every rank
    calls = []
    t2v.parts.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    parallel = sequence_parallel_inference(1, 1, torch.device("cpu"), cfg=2)
    t2v.sampler.cfg_group = parallel.cfg_group
    split = t2v.latents([3])
    if parallel.ranks.is_main:
        print(json.dumps({"error": float((split - single).abs().max()), "scale": float(single.abs().max()),
                          "batch_per_call": sorted(set(calls))}), flush=True)
    parallel.close()


if __name__ == "__main__":
    main(sys.argv[1])
