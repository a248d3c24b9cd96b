"""`hvctl train`: one loop for the DiT (flow matching) and the VAE.

The model is a plain diffusers module and the loop holds no parallel code; data, objective,
optimizer, EMA and checkpoints are separate pieces with state_dict()s, so a run stopped at step k
and resumed reaches the very weights an uninterrupted run has.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from hvctl.errors import HvctlError
from hvctl.train.config import TrainRecipe


def lr_factor(step: int, r: TrainRecipe) -> float:
    """Linear warm-up, then constant, cosine or linear decay to min_lr_ratio at the last step."""
    o = r.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    total = o.schedule_steps or r.steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * decay


class EMA:
    """Exponential moving average of parameters, kept in float32."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.named_parameters() if v.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.float().clone() for k, v in state.items()}


class Trainer:
    def __init__(self, r: TrainRecipe, *, progress: bool | None = None):
        from hvctl.generate import resolve_device_dtype
        from hvctl.io import check_output_dir
        from hvctl.models.loading import load_component, ModelFolder, quiet_libraries
        from hvctl.parallel import data_rank, init_distributed, parallelize

        quiet_libraries()
        if r.out is None:
            raise HvctlError("train needs an output folder ('out' in the recipe or --out)")
        self.r = r
        self.run = check_output_dir(r.out, "out")
        self.run.mkdir(parents=True, exist_ok=True)
        self.device, _ = resolve_device_dtype(r.device, "float32")
        self.ranks = init_distributed(self.device.type)
        if self.device.type == "cuda" and self.ranks.distributed:
            self.device = torch.device("cuda", self.ranks.local_rank)
        self.progress = progress if self.ranks.is_main else False
        self.component = "transformer" if r.target == "dit" else "vae"
        self.base_model = self._base_model()
        torch.manual_seed(r.seed)
        folder = ModelFolder.open(self.base_model)
        self.teacher = None
        if r.KIND == "distill":
            self.teacher, self.model = self._teacher_and_student(folder)
        elif r.reinit:  # stage 0: a new DiT beside pretrained VAE and text encoders
            from hvctl.models.loading import component_from_config

            self.model = component_from_config(folder, self.component).to(self.device)
        else:
            self.model = load_component(folder, self.component, dtype=torch.float32, device=self.device)
        if r.i2v is not None:
            from hvctl.conditioning import condition_type, expand_for_i2v

            if condition_type(self.model) is None:
                self.model = expand_for_i2v(self.model, r.i2v).to(self.device)
            elif condition_type(self.model) != r.i2v:
                raise HvctlError(f"i2v: {r.i2v}, but the model is already {condition_type(self.model)}")
        if r.avatar is not None:
            self._attach_conditioners(folder)
        self.model.train().requires_grad_(True)
        if r.trainable is not None:
            self._freeze_all_but(r.trainable)
        if r.lora is not None:
            from hvctl.lora import add_lora

            if r.target != "dit" or r.trainable is not None:
                raise HvctlError("lora: trains the DiT's adapters only; it goes with target: dit and no 'trainable'")
            add_lora(self.model, r.lora)
            if r.lora.init is not None:  # a resumed run's checkpoint overrides it later
                from hvctl.lora import init_lora_from_file

                init_lora_from_file(self.model, r.lora)
            if self.teacher is not None and self.new_guidance_embedder:  # a new embedding has no weights to adapt
                self.model.time_text_embed.guidance_embedder.requires_grad_(True)
        self.model_class = type(self.model)  # FSDP and replicate swap the instance's class
        self.mesh = parallelize(self.model, self.ranks, self.device.type, r.parallel,
                                param_dtype=None if r.precision == "float32" else getattr(torch, r.precision))
        # The data shard: ranks of one sequence-parallel group read the same micro-batches.
        self.data_index, self.data_count = data_rank(self.mesh) if self.mesh is not None else (0, 1)
        self.dataset, self.sampler, self.objective = self._data_and_objective()
        self.bucket_of = {i: bucket for bucket, ix in self.dataset.buckets.items() for i in ix}
        if r.avatar is not None and self.model.avatar.config["window"]["frames"] is None:
            # Long avatar videos are made in windows as long as the longest clips trained on.
            clip_frames = [bucket[2] for stream in self.sampler.streams.values() for bucket in stream]
            self.model.avatar.config["window"]["frames"] = max(clip_frames)
        self.vae_config = folder.component_config("vae") if r.target == "dit" else {}
        o = r.optim
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, r))
        self.ema = EMA(self.model, r.ema_decay) if r.ema_decay > 0 else None
        self.step = 0
        self._resume()

    def _teacher_and_student(self, folder):
        """The frozen teacher DiT, and the student: its architecture plus a guidance embedding,
        holding its weights (the new embedder zero-initialised unless the recipe says random, so
        that the student starts as the teacher's conditional pass)."""
        from hvctl.models.loading import load_component

        teacher = load_component(folder, "transformer", dtype=torch.float32, device=self.device)
        steps = self.r.mode == "steps"  # step distillation also takes a guidance-embedded teacher
        if teacher.config.guidance_embeds and not steps:
            raise HvctlError(f"{folder.path}: the teacher already embeds guidance; distillation needs one without")
        teacher.eval().requires_grad_(False)
        embeds = teacher.config.guidance_embeds or not steps or self.r.embed_guidance
        student = type(teacher).from_config({**teacher.config, "guidance_embeds": embeds}).to(self.device)
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("time_text_embed.guidance_embedder.") for k in missing), missing
        self.new_guidance_embedder = bool(missing)
        if missing and self.r.guidance_embedder_init == "zero":
            last = student.time_text_embed.guidance_embedder.linear_2
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
        return teacher, student

    def _attach_conditioners(self, folder) -> None:
        """The avatar conditioners: the base model's own, else new ones from the recipe."""
        from hvctl.avatar import load_conditioners, new_conditioners

        if self.r.target != "dit" or self.r.lora is not None or self.teacher is not None:
            raise HvctlError("avatar: trains a DiT's conditioners with full weights (not with lora, distill or target: vae)")
        if self.r.parallel.ring * self.r.parallel.ulysses > 1:  # frame-aligned cross-attention needs whole frames
            raise HvctlError("avatar: sequence parallelism (parallel.ring, parallel.ulysses) is not supported yet; use fsdp")
        if load_conditioners(folder.path, self.model) is None:  # the window is set once the data is known
            new_conditioners(self.r.avatar, self.model, window_frames=None).attach(self.model)

    def _check_cached_conditions(self, dataset) -> None:
        """Every condition the model is conditioned on must be in the cache, with the encoder's width."""
        config = self.model.avatar.config["conditioners"]
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

    def _freeze_all_but(self, prefixes: list[str]) -> None:
        names = [name for name, _ in self.model.named_parameters()]
        unknown = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
        if unknown:
            tops = sorted({n.split(".")[0] for n in names})
            raise HvctlError(f"trainable: {', '.join(unknown)} names no parameters of the {self.component}; "
                             f"its top-level parts: {', '.join(tops)}")
        for name, param in self.model.named_parameters():
            param.requires_grad_(any(name == p or name.startswith(p + ".") for p in prefixes))

    def _base_model(self) -> Path:
        """The folder training starts from: the recipe's model, or one made from a preset in the run folder."""
        from hvctl.models.presets import init_model

        if self.r.KIND == "distill":
            if self.r.teacher is None or self.r.target != "dit":
                raise HvctlError("distill needs 'teacher' (a model folder) and target: dit")
            return Path(self.r.teacher)
        if self.r.model is not None:
            return Path(self.r.model)
        if self.r.init_preset is None:
            raise HvctlError("train needs a starting model: 'model' (a model folder) or 'init_preset' (e.g. tiny)")
        from hvctl.parallel import barrier

        base = self.run / "base-model"
        if self.ranks.is_main and not (base / "model_index.json").is_file():
            init_model(self.r.init_preset, base, guidance_embeds=self.r.init_guidance_embeds, seed=self.r.seed,
                       overrides=self.r.init_overrides)
        barrier(self.ranks)
        return base

    def _data_and_objective(self):
        from hvctl.data.batching import BucketBatchSampler
        from hvctl.data.buckets import BucketConfig

        d = self.r.data
        buckets = BucketConfig()
        if d.aspect_buckets is not None:
            buckets.aspect_buckets = [tuple(b) for b in d.aspect_buckets]
        if d.frame_buckets is not None:
            buckets.frame_buckets = list(d.frame_buckets)
        if self.r.target == "vae":
            from hvctl.data.media import MediaDataset
            from hvctl.train.objectives import VaeObjective

            if d.manifest is None:
                raise HvctlError("VAE training reads pixels: set data.manifest")
            dataset = MediaDataset(d.manifest, buckets, split=d.split)
            if self.ranks.distributed and self.r.vae_loss.adversarial_weight > 0:
                raise HvctlError("vae_loss.adversarial_weight > 0 trains on one process for now (run without --nproc)")
            objective = VaeObjective(self.r.vae_loss, self.device)
        else:
            from hvctl.cache import LatentCache
            from hvctl.train.objectives import FlowMatchingObjective

            cache = Path(d.cache) if d.cache else self._encode_here(buckets)
            ids = None
            if d.manifest is not None:
                from hvctl.data.manifest import read_manifest

                ids = [rec.id for rec in read_manifest(d.manifest)]
            from hvctl.generate import prepare_model

            text_len = d.text_len or prepare_model(self.base_model)[1]["text_len"]
            dataset = LatentCache(cache, text_len=text_len, split=d.split, ids=ids)
            if not len(dataset):
                raise HvctlError(f"{cache}: no cached samples" + (f" in split {d.split}" if d.split else ""))
            if not d.accept_foreign_cache:
                from hvctl.cache import check_cache_encoders

                check_cache_encoders(cache, dataset.entries, self.base_model)
            if self.r.flow.unmasked_weight != 1 and not any(e.loss_mask for e in dataset.entries):
                raise HvctlError(f"flow.unmasked_weight {self.r.flow.unmasked_weight} needs loss masks, and {cache} has none "
                                 "(set each manifest record's loss_mask, then run hvctl encode again)")
            if self.r.avatar is not None:
                self._check_cached_conditions(dataset)
            if self.teacher is not None:
                from hvctl.train.objectives import GuidanceDistillationObjective

                if self.r.parallel.ring * self.r.parallel.ulysses > 1:  # the teacher sees whole inputs too
                    from hvctl.parallel import apply_sequence_parallel

                    apply_sequence_parallel(self.teacher, self.mesh)
                if self.r.mode == "steps":
                    objective = self._step_distillation_objective(dataset)
                else:
                    objective = GuidanceDistillationObjective(self.r.flow, dataset.empty_text(), self.teacher,
                                                              tuple(self.r.guidance_range))
            else:
                objective = FlowMatchingObjective(self.r.flow, dataset.empty_text(), d.empty_prompt_rate,
                                                  condition_drop=self.r.avatar.drop if self.r.avatar else None)
        # A stage trains on its own buckets and media only (a cache may hold more).
        stage = BucketConfig(aspect_buckets=d.aspect_buckets, frame_buckets=d.frame_buckets)
        stage_buckets = {b: ix for b, ix in dataset.buckets.items() if stage.admits(b, d.media)}
        try:
            sampler = BucketBatchSampler(stage_buckets, d.batch_size, seed=self.r.seed, image_ratio=d.image_ratio)
        except ValueError as e:
            held = ", ".join("x".join(map(str, b)) for b in sorted(stage_buckets)) or "none"
            raise HvctlError(f"data: {e} among this stage's buckets ({held}); lower data.batch_size "
                             "or widen data.aspect_buckets / frame_buckets / media") from None
        return dataset, sampler, objective

    def _step_distillation_objective(self, dataset):
        """Phased consistency distillation (hvctl/train/distill_steps.py) on the teacher's schedule."""
        from hvctl.models.loading import ModelFolder
        from hvctl.train.distill_steps import StepDistillationObjective, student_schedule

        r = self.r
        if r.i2v is not None or self.teacher.config.image_condition_type is not None:
            raise HvctlError("distill mode steps: image-to-video students are not supported yet (a text-to-video teacher only)")
        edges, teacher_sigmas, self.student_shift, self.teacher_steps = student_schedule(
            r.student_steps, r.student_shift, ModelFolder.open(self.base_model).generation_defaults, r.teacher_steps,
            r.teacher_shift)
        guidance_range = tuple(r.guidance_range) if self.model.config.guidance_embeds else None
        return StepDistillationObjective(r.flow, dataset.empty_text(), self.teacher, edges=edges, teacher_sigmas=teacher_sigmas,
                                         guidance_range=guidance_range, teacher_solver_steps=r.teacher_solver_steps,
                                         phase_start_share=r.phase_start_share, empty_prompt_rate=r.data.empty_prompt_rate)

    def _encode_here(self, buckets) -> Path:
        """No cache given: encode the manifest into the run folder first (incremental, so cheap on resume)."""
        from hvctl.encode import EncodeRecipe, encode

        d = self.r.data
        if d.manifest is None:
            raise HvctlError("DiT training needs data.cache or data.manifest")
        from hvctl.parallel import barrier

        cache = self.run / "cache"
        if self.ranks.is_main:
            audio = {} if self.r.avatar is None else {"audio_encoder": self.r.avatar.audio_encoder,
                                                      "audio_encoder_options": self.r.avatar.audio_encoder_options}
            encode(EncodeRecipe(manifest=d.manifest, model=self.base_model, out=cache, aspect_buckets=buckets.aspect_buckets,
                                frame_buckets=buckets.frame_buckets, caption_variants=d.caption_variants,
                                text_len=d.text_len, device=str(self.device), storage_dtype="float32", **audio),
                   progress=self.progress)
        barrier(self.ranks)
        return cache

    # -- the loop -------------------------------------------------------------------------------

    def step_micro_batches(self) -> list[tuple[list[int], int]]:
        """This rank's micro-batches of the coming step: (sample indices, j) pairs.

        Every rank draws the step's A*D micro-batches of the one global stream (A accumulation
        steps, D data shards). Data shard d keeps j = a*D + d, or, with parallel.balance, the A
        that balance the shards' estimated compute; either way each micro-batch's randomness is
        seeded from (seed, step, j) alone, so resuming, and spreading the same micro-batches
        over more ranks, changes nothing.
        """
        from hvctl.parallel import balance_micro_batches

        per_shard, shards = self.r.optim.grad_accumulation, self.data_count
        drawn = [next(self.sampler) for _ in range(per_shard * shards)]
        if self.r.parallel.balance and shards > 1:
            owners = balance_micro_batches([self.batch_cost(ix) for ix in drawn], shards, per_shard)
        else:
            owners = [j % shards for j in range(len(drawn))]
        return [(ix, j) for j, ix in enumerate(drawn) if owners[j] == self.data_index]

    def batch_cost(self, indices: list[int]) -> float:
        """Estimated compute of a micro-batch (all its samples share one bucket)."""
        from hvctl.models.vae import latent_shape
        from hvctl.parallel import sequence_cost

        height, width, frames = self.bucket_of[indices[0]]
        if self.r.target == "vae":  # convolutions: linear in the pixels
            return len(indices) * height * width * frames
        dit = self.model.config
        _, t, h, w = latent_shape(self.vae_config, dit.in_channels, frames, height, width)
        tokens = t // dit.patch_size_t * (h // dit.patch_size) * (w // dit.patch_size)
        return len(indices) * sequence_cost(tokens, dit.num_attention_heads * dit.attention_head_dim)

    def micro_batch(self, indices: list[int], j: int) -> tuple[dict, torch.Generator, tuple[int, int]]:
        """Micro-batch j of the step: its samples, the generator of its randomness, its stratum."""
        from hvctl.data.batching import collate

        digest = hashlib.sha256(f"{self.r.seed}/{self.step}/{j}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        stratum = (j, self.r.optim.grad_accumulation * self.data_count)
        if self.r.target == "vae":
            return collate([self.dataset[i] for i in indices]), generator, stratum
        # A caption variant per sample: field dropout and permutation, precomputed by encode.
        variants = torch.randint(0, 1 << 30, (len(indices),), generator=generator).tolist()
        return collate([self.dataset.item(i, v) for i, v in zip(indices, variants)]), generator, stratum

    def train_step(self) -> dict:
        from hvctl.parallel import mean_across_ranks

        r = self.r
        logs: dict[str, float] = {}
        autocast = torch.autocast(self.device.type, dtype=getattr(torch, r.precision), enabled=r.precision != "float32")
        for indices, j in self.step_micro_batches():
            batch, generator, stratum = self.micro_batch(indices, j)
            with autocast:
                loss, micro = self.objective(self.model, batch, generator, step=self.step, stratum=stratum)
            if not torch.isfinite(loss):
                last = self.latest_checkpoint()
                raise HvctlError(f"step {self.step + 1}: the loss is {loss.item()} (batch {batch['id']}); "
                                 f"last checkpoint: {last if last else 'none'}")
            (loss / r.optim.grad_accumulation).backward()
            for k, v in micro.items():
                logs[k] = logs.get(k, 0.0) + v / r.optim.grad_accumulation
        logs = mean_across_ranks(logs, self.ranks)
        if r.optim.grad_clip is not None:
            trained = [p for p in self.model.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(trained, r.optim.grad_clip)
            logs["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        logs["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return logs

    def train(self) -> dict:
        from hvctl.parallel import barrier, shutdown
        from hvctl.progress import progress_bar

        r = self.r
        metrics = MetricsLog(self.run, r.tensorboard, resume_step=self.step) if self.ranks.is_main else None
        started, start_step = time.perf_counter(), self.step
        samples_per_step = r.data.batch_size * r.optim.grad_accumulation * self.data_count
        last_logs: dict = {}
        with progress_bar(r.steps, "training", enabled=self.progress) as advance:
            advance(self.step)
            while self.step < r.steps:
                t0 = time.perf_counter()
                logs = self.train_step()
                logs["samples_per_s"] = samples_per_step / (time.perf_counter() - t0)
                advance()
                if metrics and (self.step % r.log_every == 0 or self.step == r.steps):
                    metrics.write(self.step, logs)
                if self.step % r.checkpoint.every == 0 or self.step == r.steps:
                    self.save()  # every rank writes its shards
                    if self.ranks.is_main and r.validation.every and self.step % r.validation.every == 0:
                        self.validate()
                    barrier(self.ranks)
                last_logs = logs
        if metrics:
            metrics.close()
        shutdown(self.ranks)
        if not self.ranks.is_main:
            return None
        final = self.export()
        return {"run": str(self.run), "model": str(final), "steps": self.step, "resumed_from": start_step or None,
                "processes": self.ranks.world_size, "seconds": round(time.perf_counter() - started, 2),
                "last": last_logs,
                **({"lora": str(self.run / "lora" / "pytorch_lora_weights.safetensors")} if self.r.lora else {})}

    # -- checkpoints ----------------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        from hvctl.train.checkpoint import list_checkpoints

        found = list_checkpoints(self.run)
        return found[-1] if found else None

    def _state_tensors(self) -> dict:
        """Trained weights, optimizer state and EMA weights as one flat dict of (possibly sharded)
        tensors: what a checkpoint saves and a resume loads into, in place."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
        self._optimizer_settings = {k: v for k, v in optimizer.items() if not isinstance(v, torch.Tensor)}
        tensors = {**{f"model/{k}": v for k, v in model.items()},
                   **{f"optimizer/{k}": v for k, v in optimizer.items() if isinstance(v, torch.Tensor)}}
        if self.ema is not None:
            tensors.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        return tensors

    def _export_module(self) -> tuple[torch.nn.Module | None, dict | None, dict | None]:
        """On rank 0, a fresh module holding the full weights to save as the model (the EMA's
        when EMA is on), for LoRA runs the adapter's file weights, and for avatar runs the
        conditioners' weights (saved apart: the transformer stays a plain diffusers one);
        (None, None, None) elsewhere. Every rank must call it: sharded weights are gathered."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ema is not None:
            state.update({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in self.ema.shadow.items()})
        if not self.ranks.is_main:
            return None, None, None
        module = self.model_class.from_config(self.model.config)
        if self.r.lora is not None:  # the base weights, then the adapter merged in
            from hvctl.lora import lora_state_dict, merged_into

            lora_weights = lora_state_dict(self.model, self.r.lora, state)
            module.load_state_dict({k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k})
            return merged_into(module, lora_weights), lora_weights, None
        avatar_weights = {k.removeprefix("avatar."): state.pop(k) for k in list(state) if k.startswith("avatar.")}
        module.load_state_dict(state)
        return module, None, avatar_weights or None

    def save(self) -> Path:
        from hvctl.train.checkpoint import copy_model_folder, save_checkpoint, write_state_files

        module, lora_weights, avatar_weights = self._export_module()

        def write_main(folder: Path) -> None:
            copy_model_folder(self.base_model, folder / "model", self.component)
            module.save_pretrained(folder / "model" / self.component, safe_serialization=True)
            if lora_weights is not None:  # also the adapter alone, for `generate --lora`
                from hvctl.lora import save_lora

                save_lora(folder / "lora" / "pytorch_lora_weights.safetensors", lora_weights)
            if avatar_weights is not None:
                from hvctl.avatar import save_conditioners

                save_conditioners(folder / "model", self.model.avatar.config, avatar_weights)
            # A new embedding defaults to the teacher's scale; an embedded teacher's stays unless student_guidance says.
            if self.teacher is not None and (self.new_guidance_embedder or (self.r.student_guidance is not None
                                                           and self.model.config.guidance_embeds)):
                _embed_guidance_defaults(folder / "model", self.r.student_guidance)
            if self.teacher is not None and self.r.mode == "steps":
                from hvctl.train.distill_steps import record_student_defaults

                record_student_defaults(folder / "model", self.r.student_steps, self.student_shift, self.teacher_steps)
            trainer = {"step": self.step, "sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict(),
                       "optimizer": self._optimizer_settings, "recipe": _recipe_dict(self.r)}
            write_state_files(folder, rng={"torch": torch.get_rng_state()}, trainer=trainer,
                              objective=getattr(self.objective, "state_dict", dict)())

        return save_checkpoint(self.run, self.step, ranks=self.ranks, tensors=self._state_tensors(),
                               write_main=write_main, keep_last=self.r.checkpoint.keep_last)

    def _resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from hvctl.train.checkpoint import load_checkpoint

        latest = self.latest_checkpoint()
        if latest is None:
            return
        tensors = self._state_tensors()
        state = load_checkpoint(latest, tensors, self.ranks.distributed)
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        # The param groups' settings (the current lr among them) come back from JSON.
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in state["trainer"]["optimizer"].items()}
        set_state_dict(self.model, self.optimizer, model_state_dict=part("model/"),
                       optim_state_dict={**settings, **part("optimizer/")},
                       options=StateDictOptions(flatten_optimizer_state_dict=True))
        if self.ema is not None:
            self.ema.load_state_dict(part("ema/"))
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state["objective"])
        self.scheduler.load_state_dict(state["trainer"]["scheduler"])
        self.sampler.load_state_dict(state["trainer"]["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = state["trainer"]["step"]

    def export(self) -> Path:
        """RUN/model: the last checkpoint's model folder, the run's result."""
        import shutil

        from hvctl.io import disk_errors

        latest = self.latest_checkpoint()
        final = self.run / "model"
        tmp = self.run / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with disk_errors(final, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
            shutil.copytree(latest / "model", tmp)
            if self.r.target == "vae" and self.r.calibrate_scaling_factor:
                from hvctl.io import write_json_atomic

                config_file = tmp / "vae" / "config.json"
                config = json.loads(config_file.read_text())
                config["scaling_factor"] = self.latent_scaling_factor(tmp)
                write_json_atomic(config_file, config)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            if (latest / "lora").is_dir():
                shutil.rmtree(self.run / "lora", ignore_errors=True)
                shutil.copytree(latest / "lora", self.run / "lora")
        return final

    @torch.no_grad()
    def latent_scaling_factor(self, model_dir: Path, samples: int = 64) -> float:
        """1 / std of the exported VAE's posterior means over (up to) `samples` training samples."""
        from hvctl.models.loading import ModelFolder, load_component

        vae = load_component(ModelFolder.open(model_dir), "vae", dtype=torch.float32, device=self.device)
        step = max(1, len(self.dataset) // samples)
        means = [vae.encode(self.dataset[i]["pixels"][None].to(self.device)).latent_dist.mean.flatten()
                 for i in range(0, len(self.dataset), step)][:samples]
        return round(1.0 / float(torch.cat(means).std()), 6)

    def validate(self) -> None:
        """Validation videos (DiT) from the newest checkpoint's model folder."""
        if self.r.target != "dit" or not self.r.validation.prompts:
            return
        from hvctl.generate import GenerateRecipe, generate

        v = self.r.validation
        out = self.run / "validation" / f"step-{self.step:08d}"
        for i, prompt in enumerate(v.prompts):
            generate(GenerateRecipe(prompt=prompt, model=self.latest_checkpoint() / "model", steps=v.steps, seed=v.seed,
                                    guidance_scale=v.guidance_scale, output=out / f"{i:02d}.mp4", device=str(self.device)),
                     progress=False)


class MetricsLog:
    """Metrics as JSON lines (RUN/metrics.jsonl) and, when installed, TensorBoard (RUN/tensorboard)."""

    def __init__(self, run: Path, tensorboard: bool, resume_step: int = 0):
        path = run / "metrics.jsonl"
        if path.is_file():  # rows past the checkpoint resumed from are replayed: drop them, not log them twice
            from hvctl.io import write_text_atomic

            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if _metrics_step(line) <= resume_step]
            if len(kept) != len(lines):
                write_text_atomic(path, "".join(kept))
        self.file = open(path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tensorboard"))
            except ImportError:
                pass

    def write(self, step: int, logs: dict) -> None:
        from hvctl.io import disk_errors

        with disk_errors(self.file.name):
            self.file.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in logs.items()}}) + "\n")
            self.file.flush()
        if self.tb is not None:
            for k, v in logs.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _metrics_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line of a killed run: dropped


def _embed_guidance_defaults(model_dir: Path, scale: float | None = None) -> None:
    """A distilled student's generation defaults: one pass, with `scale` embedded, or else the
    teacher's guidance scale (6, the official default, when the teacher's is 1)."""
    from hvctl.io import write_json_atomic

    info_file = model_dir / "hvctl.json"
    if not info_file.is_file():
        return
    info = json.loads(info_file.read_text())
    generation = info.setdefault("generation", {})
    teacher_scale = generation.get("guidance_scale") or 1.0
    if scale is None:
        scale = teacher_scale if teacher_scale > 1 else 6.0
    generation["embedded_guidance"] = scale
    generation["guidance_scale"] = 1.0
    write_json_atomic(info_file, info)


def _recipe_dict(r: TrainRecipe) -> dict:
    from hvctl.recipe import recipe_to_dict

    return recipe_to_dict(r)


def train(r: TrainRecipe, *, progress: bool | None = None) -> dict | None:
    """Run a train recipe; the result on rank 0 (None on the other ranks)."""
    return Trainer(r, progress=progress).train()
