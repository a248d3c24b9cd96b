"""The DiT's training variant (flow matching on cached latents) and its two modifiers, i2v and LoRA.

DitSpec trains the transformer's full weights, a `trainable` subset of them, or, with `reinit`, a
fresh init of its config; on all of the manifest's samples or (`data.select`, SFT) its best by a
score, and, for an image-to-video model, on a mix of tasks (`data.task_ratio`). The modifiers are mixins (hvctl/train/specs.py) that compose with it and
with the variants built on it:
- I2vModifier makes the loaded model image-to-video first (hvctl/i2v.py holds the maths;
  the objective conditions each clip on its own first frame once the model is i2v);
- LoraModifier adds adapters after the model is built and trains them alone; export merges them
  into the base weights and writes the adapter file beside the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hvctl.errors import HvctlError
from hvctl.train.specs import TrainSpec, chain, register, register_modifier


@register("dit")
class DitSpec(TrainSpec):
    component = "transformer"

    def build(self, t, folder) -> torch.nn.Module:
        self.vae_config = folder.component_config("vae")  # the latent grid, for batch_cost
        return super().build(t, folder)

    def data(self, t, buckets):
        from hvctl.cache import LatentCache

        d = t.r.data
        cache = Path(d.cache) if d.cache else self.encode_here(t, buckets)
        ids = self.records = None
        if d.manifest is not None:
            from hvctl.data.manifest import read_manifest

            self.records = read_manifest(d.manifest)
            ids = [rec.id for rec in self.records]
            if d.select is not None:  # SFT: the best samples by a score
                from hvctl.data.select import select_ids

                ids = select_ids(self.records, d.select, f"data.manifest {d.manifest}")
        from hvctl.models.loading import prepare_model

        text_len = d.text_len or prepare_model(t.base_model)[1]["text_len"]
        dataset = LatentCache(cache, text_len=text_len, split=d.split, ids=ids)
        if not len(dataset):
            raise HvctlError(f"{cache}: no cached samples" + (f" in split {d.split}" if d.split else ""))
        if not d.accept_foreign_cache:
            from hvctl.cache import check_cache_encoders

            check_cache_encoders(cache, dataset.entries, t.base_model)
        if t.r.flow.unmasked_weight != 1 and not any(e.loss_mask for e in dataset.entries):
            raise HvctlError(f"flow.unmasked_weight {t.r.flow.unmasked_weight} needs loss masks, and {cache} has none "
                             "(set each manifest record's loss_mask, then run hvctl encode again)")
        return dataset

    def trained_in_full(self, t, model) -> list[torch.nn.Module]:
        """Modules a LoRA run trains whole beside the adapters (default: none)."""
        return []

    def encode_options(self, r) -> dict:
        """Extra EncodeRecipe settings when the trainer encodes the manifest itself (default: none)."""
        return {}

    def encode_here(self, t, buckets) -> Path:
        """No cache given: encode the manifest into the run folder first (incremental, so cheap on resume)."""
        from hvctl.encode import EncodeRecipe, encode
        from hvctl.parallel import barrier

        d = t.r.data
        if d.manifest is None:
            raise HvctlError("DiT training needs data.cache or data.manifest")
        cache = t.run / "cache"
        if t.ranks.is_main:
            encode(EncodeRecipe(manifest=d.manifest, model=t.base_model, out=cache, aspect_buckets=buckets.aspect_buckets,
                                frame_buckets=buckets.frame_buckets, caption_variants=d.caption_variants,
                                text_len=d.text_len, device=str(t.device), storage_dtype="float32",
                                **self.encode_options(t.r)),
                   progress=t.progress)
        barrier(t.ranks)
        return cache

    def objective(self, t, dataset, condition_drop: dict | None = None):
        from hvctl.train.objectives import FlowMatchingObjective

        tasks = None
        if t.r.data.task_ratio is not None:  # task mixing (hvctl/i2v.py)
            from hvctl.i2v import check_task_ratio

            tasks = check_task_ratio(t.r.data.task_ratio, t.model)
        return FlowMatchingObjective(t.r.flow, dataset.empty_text(), t.r.data.empty_prompt_rate,
                                     condition_drop=condition_drop, tasks=tasks)

    def ready(self, t) -> None:
        from hvctl.data.device_cache import preload

        self.preloaded = preload(t.dataset, t.sampler, t.r.data.preload, t.device)

    def batch(self, t, indices, generator) -> dict:
        from hvctl.data.batching import collate

        # A caption variant per sample: field dropout and permutation, precomputed by encode.
        variants = torch.randint(0, 1 << 30, (len(indices),), generator=generator)
        if t.r.data.short_caption_rate is not None:
            variants[torch.rand(len(indices), generator=generator) < t.r.data.short_caption_rate] = 0
        variants = variants.tolist()
        if self.preloaded is not None:
            return self.preloaded.batch(indices, variants)
        return collate([t.dataset.item(i, v) for i, v in zip(indices, variants)])

    def batch_cost(self, t, indices) -> float:
        from hvctl.models.vae import latent_shape
        from hvctl.parallel import sequence_cost

        height, width, frames = t.bucket_of[indices[0]]
        dit = t.model.config
        _, frames, height, width = latent_shape(self.vae_config, dit.in_channels, frames, height, width)
        tokens = frames // dit.patch_size_t * (height // dit.patch_size) * (width // dit.patch_size)
        return len(indices) * sequence_cost(tokens, dit.num_attention_heads * dit.attention_head_dim)


@register_modifier("i2v", lambda r: r.i2v is not None)
class I2vModifier:
    """Image-to-video: a text-to-video DiT is expanded to the recipe's design once loaded; a model
    that already is one is trained as it is."""

    def check(self, r) -> None:
        if self.component != "transformer":
            raise HvctlError("i2v: conditions the DiT; it goes with target: dit")
        super().check(r)

    def load(self, t, folder):
        from hvctl.i2v import condition_type, expand_for_i2v

        model = super().load(t, folder)
        if condition_type(model) is None:
            return expand_for_i2v(model, t.r.i2v).to(t.device)
        if condition_type(model) != t.r.i2v:
            raise HvctlError(f"i2v: {t.r.i2v}, but the model is already {condition_type(model)}")
        return model


@register_modifier("lora", lambda r: r.lora is not None)
class LoraModifier:
    """LoRA: adapters on the built DiT are trained instead of its weights (hvctl/lora.py)."""

    def check(self, r) -> None:
        if self.component != "transformer" or r.trainable is not None:
            raise HvctlError("lora: trains the DiT's adapters only; it goes with target: dit and no 'trainable'")
        super().check(r)

    def build(self, t, folder):
        from hvctl.lora import add_lora, init_lora_from_file

        model = super().build(t, folder)
        add_lora(model, t.r.lora)
        if t.r.lora.init is not None:  # a resumed run's checkpoint overrides it later
            init_lora_from_file(model, t.r.lora)
        for module in self.trained_in_full(t, model):
            module.requires_grad_(True)
        return model

    def exported(self, t, state):
        """The base weights with the adapter merged in; the adapter alone also goes to CHECKPOINT/lora."""
        from hvctl.lora import lora_state_dict, merged_into, save_lora

        weights = lora_state_dict(t.model, t.r.lora, state)
        base = {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}
        module, write = super().exported(t, base)

        def write_lora(folder: Path) -> None:  # for `generate --lora`
            save_lora(folder / "lora" / "pytorch_lora_weights.safetensors", weights)

        return merged_into(module, weights), chain(write_lora, write)

    def finish_export(self, t, model_dir, checkpoint) -> None:
        """RUN/lora: the last checkpoint's adapter, beside RUN/model."""
        import shutil

        super().finish_export(t, model_dir, checkpoint)
        shutil.rmtree(t.run / "lora", ignore_errors=True)
        shutil.copytree(checkpoint / "lora", t.run / "lora")

    def result(self, t) -> dict:
        return {**super().result(t), "lora": str(t.run / "lora" / "pytorch_lora_weights.safetensors")}
