"""How a fresh DiT's weights are initialised.

diffusers builds a HunyuanVideoTransformer3DModel with torch's default layer init: it is meant to
load trained weights, not to start training. A fresh DiT then starts with every block's
modulation (shift, scale and gate, from the timestep and pooled text) and the output projection
random, so each block adds a random, timestep-dependent perturbation to the residual stream and
the first predictions are noise of the wrong scale.

`adaln-zero` is the DiT paper's initialisation (Peebles & Xie 2023, "adaLN-Zero"), which the
official HunyuanVideo code keeps for its final layer and token refiner: linear layers Xavier-
uniform, biases zero, the timestep and text-projection MLPs normal(0, 0.02), and every modulation
layer and the output projection zero, so each block starts as the identity and the model's first
prediction is zero. `diffusers` leaves the weights as diffusers made them.
"""

from __future__ import annotations

DIT_INITS = ("diffusers", "adaln-zero")

# Modules whose outputs modulate a block (shift, scale, gate) or are the model's prediction: the
# module names of diffusers' HunyuanVideo transformer, matched at the end of the qualified name.
_ZEROED_SUFFIXES = (
    "norm1.linear", "norm1_context.linear",  # double-stream blocks (AdaLayerNormZero)
    "norm.linear",  # single-stream blocks (AdaLayerNormZeroSingle)
    "norm_out.linear",  # the final layer (AdaLayerNormContinuous) and each token-refiner block's gates
)


def init_dit(model, scheme: str) -> None:
    """Re-initialise a fresh DiT's weights in place by `scheme` (one of DIT_INITS), from torch's
    current RNG (so the caller's seed decides it)."""
    import torch

    if scheme not in DIT_INITS:
        raise ValueError(f"unknown DiT init {scheme!r}; choose one of {', '.join(DIT_INITS)}")
    if scheme == "diffusers":
        return
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, torch.nn.Conv3d):  # the patch embedding: Xavier as a linear map of a patch
                torch.nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
        for name, module in model.named_modules():
            # dotted, so that "context_embedder" (the token refiner) is not read as "text_embedder"
            if ".timestep_embedder." in f".{name}." or ".text_embedder." in f".{name}.":
                if isinstance(module, torch.nn.Linear):
                    torch.nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, torch.nn.Linear) and (name.endswith(_ZEROED_SUFFIXES) or name == "proj_out"):
                torch.nn.init.zeros_(module.weight)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
