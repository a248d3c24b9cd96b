"""The avatar training variant: a DiT's conditioners trained with full weights (the recipe's
`avatar:` section); the transformer's own weights train with them unless `trainable` says otherwise."""

from __future__ import annotations

from hvctl.errors import HvctlError
from hvctl.train.dit import DitSpec
from hvctl.train.specs import chain, register


@register("avatar")
class AvatarSpec(DitSpec):
    def check(self, r) -> None:
        if r.target != "dit" or r.lora is not None:
            raise HvctlError("avatar: trains a DiT's conditioners with full weights (not with lora, distill or target: vae)")
        if r.parallel.ring * r.parallel.ulysses > 1:  # frame-aligned cross-attention needs whole frames
            raise HvctlError("avatar: sequence parallelism (parallel.ring, parallel.ulysses) is not supported yet; use fsdp")
        super().check(r)

    def extend(self, t, model, folder):
        """The base model's own conditioners, else new ones from the recipe."""
        from hvctl.avatar import load_conditioners, new_conditioners

        if load_conditioners(folder.path, model) is None:  # the window is set once the data is known
            new_conditioners(t.r.avatar, model, window_frames=None).attach(model)
        return super().extend(t, model, folder)

    def encode_options(self, r) -> dict:
        return {**super().encode_options(r), "audio_encoder": r.avatar.audio_encoder,
                "audio_encoder_options": r.avatar.audio_encoder_options}

    def data(self, t, buckets):
        dataset = super().data(t, buckets)
        check_cached_conditions(t.model.avatar.config["conditioners"], dataset)
        return dataset

    def objective(self, t, dataset):
        from hvctl.train.objectives import FlowMatchingObjective

        return FlowMatchingObjective(t.r.flow, dataset.empty_text(), t.r.data.empty_prompt_rate, condition_drop=t.r.avatar.drop)

    def ready(self, t) -> None:
        super().ready(t)
        if t.model.avatar.config["window"]["frames"] is None:
            # Long avatar videos are made in windows as long as the longest clips trained on.
            clip_frames = [bucket[2] for stream in t.sampler.streams.values() for bucket in stream]
            t.model.avatar.config["window"]["frames"] = max(clip_frames)

    def exported(self, t, state):
        """The conditioners are saved apart (MODEL/avatar/): the transformer stays a plain diffusers one."""
        from hvctl.avatar import save_conditioners

        weights = {k.removeprefix("avatar."): state.pop(k) for k in list(state) if k.startswith("avatar.")}
        module, write = super().exported(t, state)
        config = t.model.avatar.config
        return module, chain(write, lambda folder: save_conditioners(folder / "model", config, weights) if weights else None)


def check_cached_conditions(config: dict, dataset) -> None:
    """Every condition the model is conditioned on must be in the cache, with the encoder's width."""
    have = {name: i for i, e in reversed(list(enumerate(dataset.entries))) for name in e.conditions}
    for name, options in config.items():
        if name not in have:
            raise HvctlError(f"avatar: no cached sample has a {name!r} condition; name its files in the manifest "
                             f"('{name}' per sample) and run hvctl encode")
        width = options.get("feature_dim")
        cached = dataset.item(have[name])[f"cond.{name}"].shape[-1]
        if width is not None and cached != width:
            raise HvctlError(f"avatar: cached {name} features are {cached} wide, the {name} conditioner reads "
                             f"{width} (encode with the model's audio encoder)")
