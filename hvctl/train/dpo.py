"""Flow-matching DPO: preference optimisation of a velocity-predicting DiT against a frozen reference.

Diffusion-DPO (Wallace et al. 2023) rewrites the DPO objective for a denoiser: the implicit reward
of a sample is how much better the trained model denoises it than the reference does. With
velocity prediction (Flow-DPO, Liu et al. 2025, "Improving Video Generation with Human Feedback";
VideoDPO) the chosen latent x_w and the rejected x_l are noised with the same noise e and the same
sigma, x_s = (1 - sigma) x + sigma e, the target velocity is u = e - x, and

    err(m, x)  = || m(x_s, sigma, c) - u ||^2             (mean over latent elements)
    margin     = [err(ref, x_w) - err(theta, x_w)] - [err(ref, x_l) - err(theta, x_l)]
    loss       = -log sigmoid(beta / 2 * margin)

margin > 0 when the trained model has improved on the chosen sample, relative to the reference,
more than on the rejected one. At theta = reference the margin is exactly 0 and the loss is
log 2; its gradient lowers err(theta, x_w) and raises err(theta, x_l), weighted by
sigmoid(-beta/2 margin), which fades as the preference is learnt (the KL to the reference is
what beta prices). beta is constant over sigma, as Flow-DPO found best for video.

The reference is the starting model: a frozen copy for full-weight training, or, for LoRA, the
same module with its adapters switched off (no second copy in memory).

In a run, DPO is a modifier of the DiT variant (hvctl/train/specs.py), applied when the recipe has
a `dpo:` section: it keeps the reference, reads the pairs, and sets the run's steps from its rounds.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import hvctl.train.dit  # noqa: F401  (i2v and LoRA register first, so the DPO modifier wraps them)
from hvctl.i2v import training_condition
from hvctl.errors import HvctlError
from hvctl.flow import velocity_target
from hvctl.train.objectives import FlowMatchingObjective
from hvctl.train.specs import register_modifier


def dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta: float):
    """Per-sample Diffusion-DPO loss from per-sample squared errors (B,): (loss, margin)."""
    margin = (ref_err_w - model_err_w) - (ref_err_l - model_err_l)
    return -F.logsigmoid(0.5 * beta * margin), margin


def adapters_disabled(model):
    """A context in which a peft-adapted model is its own base model (the LoRA run's reference)."""
    if hasattr(model, "disable_adapters") and hasattr(model, "enable_adapters"):
        @contextlib.contextmanager
        def off():
            model.disable_adapters()
            try:
                yield
            finally:
                model.enable_adapters()
        return off()
    raise HvctlError("dpo: the model has no adapters to switch off for the reference")


class DpoObjective(FlowMatchingObjective):
    """The batch holds pairs: latent_mean/latent_std of the chosen sample and rejected.latent_mean/
    rejected.latent_std of the rejected one, under one prompt (hvctl prefer writes them)."""

    def __init__(self, flow, beta: float, reference=None):
        """reference: a frozen module, or None: the model itself with its LoRA adapters off."""
        if not (beta > 0 and beta < float("inf")):
            raise HvctlError(f"dpo.beta must be a positive finite number, got {beta}")
        super().__init__(flow, None, 0.0)  # the prompt is the preference; never dropped
        self.beta, self.reference = beta, reference

    def _errors(self, model, x0, noise, sigma, text, guidance) -> torch.Tensor:
        image = training_condition(model, x0)
        prediction = self.predict(model, x0, noise, sigma, text, guidance, image)
        squared = F.mse_loss(prediction, velocity_target(x0, noise).to(prediction.device), reduction="none")
        return self.per_sample_loss({}, squared, None if image is None else image.loss_mask(squared))

    def __call__(self, model, batch: dict, generator: torch.Generator, *, step: int = 0, stratum=None):
        b = self.noised(batch, generator, stratum)  # the chosen latent, the noise, sigma, the text
        n = b["x0"].shape[0]
        mean, std = batch["rejected.latent_mean"].float(), batch["rejected.latent_std"].float()
        rejected = mean + std * torch.randn(mean.shape, generator=generator)
        # One forward pass over both halves: [chosen; rejected], same noise and sigma per pair.
        x0 = torch.cat([b["x0"], rejected])
        noise, sigma = torch.cat([b["noise"], b["noise"]]), torch.cat([b["sigma"], b["sigma"]])
        text = tuple(torch.cat([t, t]) for t in b["text"])
        guidance = torch.full((2 * n,), self.flow.guidance) if model.config.guidance_embeds else None
        with torch.no_grad():
            if self.reference is None:
                with adapters_disabled(model):
                    ref = self._errors(model, x0, noise, sigma, text, guidance)
            else:
                ref = self._errors(self.reference, x0, noise, sigma, text, guidance)
        err = self._errors(model, x0, noise, sigma, text, guidance)
        loss, margin = dpo_loss(err[:n], err[n:], ref[:n].to(err.device), ref[n:].to(err.device), self.beta)
        loss = loss.mean()
        with torch.no_grad():
            accuracy = (margin > 0).float().mean()
        return loss, {"loss": loss.item(), "margin": margin.mean().item(), "reward_accuracy": accuracy.item(),
                      "chosen_err": err[:n].mean().item(), "rejected_err": err[n:].mean().item()}


class PairDataset:
    """`hvctl prefer`'s pairs over its cache: item i is pair i, the chosen sample's tensors (text,
    masks, latent posterior) plus the rejected one's posterior as rejected.latent_mean/_std."""

    def __init__(self, cache, records, source: str = "data.manifest"):
        roles: dict[str, dict[str, str]] = {}
        for rec in records:
            p = rec.extra.get("preference")
            if isinstance(p, dict) and p.get("role") in ("chosen", "rejected") and p.get("pair") is not None:
                roles.setdefault(str(p["pair"]), {})[p["role"]] = rec.id
        index = {e.id: i for i, e in enumerate(cache.entries)}
        self.cache, self.pairs = cache, []
        for pair, ids in sorted(roles.items()):
            if len(ids) == 2 and ids["chosen"] in index and ids["rejected"] in index:
                chosen, rejected = index[ids["chosen"]], index[ids["rejected"]]
                if cache.entries[chosen].bucket != cache.entries[rejected].bucket:
                    raise HvctlError(f"{source}: pair {pair}: chosen and rejected differ in size "
                                     f"({cache.entries[chosen].bucket} vs {cache.entries[rejected].bucket})")
                self.pairs.append((chosen, rejected))
        if not self.pairs:
            raise HvctlError(f"{source}: no preference pairs with both clips cached (records need "
                             "preference: {pair, role}; make them with hvctl prefer)")
        self.entries = [cache.entries[c] for c, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def buckets(self) -> dict[tuple[int, int, int], list[int]]:
        from hvctl.data.batching import group_by_bucket

        return group_by_bucket([e.bucket for e in self.entries])

    def item(self, index: int, variant: int = 0) -> dict:
        chosen, rejected = self.pairs[index]
        item = self.cache.item(chosen, variant)
        other = self.cache.item(rejected, 0)
        item["rejected.latent_mean"], item["rejected.latent_std"] = other["latent_mean"], other["latent_std"]
        return item

    def __getitem__(self, index: int) -> dict:
        return self.item(index)

    def empty_text(self) -> dict | None:
        return self.cache.empty_text()


@register_modifier("dpo", lambda r: r.dpo is not None)
class DpoModifier:
    """DPO on the DiT variant. Registered after i2v and LoRA, so it is outermost: the reference is
    the model they built (LoRA from a file included)."""

    def check(self, r) -> None:
        if self.name != "dit":
            raise HvctlError("dpo: trains a text-to-video DiT (target: dit, no avatar, not distill)")
        if r.data.task_ratio is not None:
            raise HvctlError("data.task_ratio: dpo trains on its pairs' own task; leave task_ratio out")
        if r.data.preload != "none":
            raise HvctlError("data.preload: dpo reads its pairs sample by sample; set none")
        super().check(r)

    def build(self, t, folder):
        """The model, and its frozen reference in self.frozen. A LoRA run from a zero adapter needs
        no copy: the model with its adapters off is the reference."""
        import copy

        model = super().build(t, folder)
        if t.r.lora is None or t.r.lora.init is not None:
            self.frozen["reference"] = copy.deepcopy(model).eval().requires_grad_(False)
        return model

    def data(self, t, buckets):
        dataset = super().data(t, buckets)
        if self.records is None:
            raise HvctlError("dpo reads its pairs from data.manifest (hvctl prefer's DIR/manifest.jsonl): set it")
        return PairDataset(dataset, self.records, f"data.manifest {t.r.data.manifest}")

    def objective(self, t, dataset):
        reference = self.frozen.get("reference")
        if reference is not None and t.r.parallel.ring * t.r.parallel.ulysses > 1:
            from hvctl.parallel import apply_sequence_parallel  # the reference sees whole inputs too

            apply_sequence_parallel(reference, t.mesh)
        return DpoObjective(t.r.flow, t.r.dpo.beta, reference)

    def ready(self, t) -> None:
        super().ready(t)
        r = t.r
        if r.dpo.rounds is not None:  # a round: each pair once (full micro-batches)
            import math

            micro_batches = sum(len(ix) // r.data.batch_size for stream in t.sampler.streams.values() for ix in stream.values())
            r.steps = r.dpo.rounds * math.ceil(micro_batches / (r.optim.grad_accumulation * t.data_count))
