"""`hvctl train`: one loop for the DiT (flow matching) and the VAE.

The model is a plain diffusers module and the loop holds no parallel code; data, objective,
optimizer, EMA and checkpoints are separate pieces with state_dict()s, so a run stopped at step k
and resumed reaches the very weights an uninterrupted run has.
"""

from __future__ import annotations

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
    progress = min(1.0, (step - o.warmup_steps) / max(1, r.steps - o.warmup_steps))
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
        from hvctl.models.loading import load_component, ModelFolder, quiet_libraries

        quiet_libraries()
        if r.out is None:
            raise HvctlError("train needs an output folder ('out' in the recipe or --out)")
        self.r, self.progress = r, progress
        self.run = Path(r.out)
        self.run.mkdir(parents=True, exist_ok=True)
        self.device, _ = resolve_device_dtype(r.device, "float32")
        self.component = "transformer" if r.target == "dit" else "vae"
        self.base_model = self._base_model()
        torch.manual_seed(r.seed)
        self.model = load_component(ModelFolder.open(self.base_model), self.component, dtype=torch.float32, device=self.device)
        self.model.train().requires_grad_(True)
        if r.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.dataset, self.sampler, self.objective = self._data_and_objective()
        o = r.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, r))
        self.ema = EMA(self.model, r.ema_decay) if r.ema_decay > 0 else None
        self.generator = torch.Generator().manual_seed(r.seed)
        self.step = 0
        self._resume()

    def _base_model(self) -> Path:
        """The folder training starts from: the recipe's model, or one made from a preset in the run folder."""
        from hvctl.models.presets import init_model

        if self.r.model is not None:
            return Path(self.r.model)
        if self.r.init_preset is None:
            raise HvctlError("train needs a starting model: 'model' (a model folder) or 'init_preset' (e.g. tiny)")
        base = self.run / "base-model"
        if not (base / "model_index.json").is_file():
            init_model(self.r.init_preset, base, guidance_embeds=self.r.init_guidance_embeds, seed=self.r.seed)
        return base

    def _data_and_objective(self):
        from hvctl.data.batching import BucketBatchSampler
        from hvctl.data.buckets import BucketConfig

        d = self.r.data
        buckets = BucketConfig(aspect_buckets=[tuple(b) for b in d.aspect_buckets], frame_buckets=list(d.frame_buckets))
        if self.r.target == "vae":
            from hvctl.data.media import MediaDataset
            from hvctl.train.objectives import VaeObjective

            if d.manifest is None:
                raise HvctlError("VAE training reads pixels: set data.manifest")
            dataset = MediaDataset(d.manifest, buckets, split=d.split)
            objective = VaeObjective(self.r.vae_loss, self.device)
        else:
            from hvctl.cache import LatentCache
            from hvctl.train.objectives import FlowMatchingObjective

            cache = Path(d.cache) if d.cache else self._encode_here()
            ids = None
            if d.manifest is not None:
                from hvctl.data.manifest import read_manifest

                ids = [rec.id for rec in read_manifest(d.manifest)]
            from hvctl.generate import prepare_model

            text_len = d.text_len or prepare_model(self.base_model)[1]["text_len"]
            dataset = LatentCache(cache, text_len=text_len, split=d.split, ids=ids)
            if not len(dataset):
                raise HvctlError(f"{cache}: no cached samples" + (f" in split {d.split}" if d.split else ""))
            objective = FlowMatchingObjective(self.r.flow, dataset.empty_text(), d.empty_prompt_rate)
        try:
            sampler = BucketBatchSampler(dataset.buckets, d.batch_size, seed=self.r.seed, image_ratio=d.image_ratio)
        except ValueError as e:
            raise HvctlError(f"data: {e} (lower data.batch_size)") from None
        return dataset, sampler, objective

    def _encode_here(self) -> Path:
        """No cache given: encode the manifest into the run folder first (incremental, so cheap on resume)."""
        from hvctl.encode import EncodeRecipe, encode

        d = self.r.data
        if d.manifest is None:
            raise HvctlError("DiT training needs data.cache or data.manifest")
        cache = self.run / "cache"
        encode(EncodeRecipe(manifest=d.manifest, model=self.base_model, out=cache, aspect_buckets=d.aspect_buckets,
                            frame_buckets=d.frame_buckets, caption_variants=d.caption_variants, text_len=d.text_len,
                            device=str(self.device), storage_dtype="float32"), progress=self.progress)
        return cache

    # -- the loop -------------------------------------------------------------------------------

    def next_batch(self) -> dict:
        from hvctl.data.batching import collate

        indices = next(self.sampler)
        if self.r.target == "vae":
            return collate([self.dataset[i] for i in indices])
        # A caption variant per sample: field dropout and permutation, precomputed by encode.
        variants = torch.randint(0, 1 << 30, (len(indices),), generator=self.generator).tolist()
        return collate([self.dataset.item(i, v) for i, v in zip(indices, variants)])

    def train_step(self) -> dict:
        r = self.r
        logs: dict[str, float] = {}
        autocast = torch.autocast(self.device.type, dtype=getattr(torch, r.precision), enabled=r.precision != "float32")
        for _ in range(r.optim.grad_accumulation):
            batch = self.next_batch()
            with autocast:
                if r.target == "vae":
                    loss, micro = self.objective(self.model, batch, self.generator, self.step)
                else:
                    loss, micro = self.objective(self.model, batch, self.generator)
            if not torch.isfinite(loss):
                last = self.latest_checkpoint()
                raise HvctlError(f"step {self.step + 1}: the loss is {loss.item()} (batch {batch['id']}); "
                                 f"last checkpoint: {last if last else 'none'}")
            (loss / r.optim.grad_accumulation).backward()
            for k, v in micro.items():
                logs[k] = logs.get(k, 0.0) + v / r.optim.grad_accumulation
        if r.optim.grad_clip is not None:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.optim.grad_clip))
        logs["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return logs

    def train(self) -> dict:
        from hvctl.progress import progress_bar

        r = self.r
        metrics = MetricsLog(self.run, r.tensorboard)
        started, start_step = time.perf_counter(), self.step
        samples_per_step = r.data.batch_size * r.optim.grad_accumulation
        last_logs: dict = {}
        with progress_bar(r.steps, "training", enabled=self.progress) as advance:
            advance(self.step)
            while self.step < r.steps:
                t0 = time.perf_counter()
                logs = self.train_step()
                logs["samples_per_s"] = samples_per_step / (time.perf_counter() - t0)
                advance()
                if self.step % r.log_every == 0 or self.step == r.steps:
                    metrics.write(self.step, logs)
                if self.step % r.checkpoint.every == 0 or self.step == r.steps:
                    self.save()
                    if r.validation.every and self.step % r.validation.every == 0:
                        self.validate()
                last_logs = logs
        metrics.close()
        final = self.export()
        return {"run": str(self.run), "model": str(final), "steps": self.step, "resumed_from": start_step or None,
                "seconds": round(time.perf_counter() - started, 2), "last": last_logs}

    # -- checkpoints ----------------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        from hvctl.train.checkpoint import list_checkpoints

        found = list_checkpoints(self.run)
        return found[-1] if found else None

    def _export_module(self) -> torch.nn.Module:
        """The module to save as the model: the EMA weights when EMA is on."""
        if self.ema is None:
            return self.model
        import copy

        module = copy.deepcopy(self.model)
        with torch.no_grad():
            for k, v in module.named_parameters():
                if k in self.ema.shadow:
                    v.copy_(self.ema.shadow[k])
        return module

    def save(self) -> Path:
        from hvctl.train.checkpoint import save_checkpoint

        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        trainer = {"step": self.step, "sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "recipe": _recipe_dict(self.r)}
        return save_checkpoint(
            self.run, self.step, base_model=self.base_model, component=self.component, export_module=self._export_module(),
            weights=self.model.state_dict(), ema=self.ema.state_dict() if self.ema else None,
            optimizer_state={"optimizer": self.optimizer.state_dict(), "objective": getattr(self.objective, "state_dict", dict)()},
            rng=rng, trainer=trainer, keep_last=self.r.checkpoint.keep_last,
        )

    def _resume(self) -> None:
        from hvctl.train.checkpoint import load_checkpoint

        latest = self.latest_checkpoint()
        if latest is None:
            return
        state = load_checkpoint(latest)
        self.model.load_state_dict(state["weights"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"]["optimizer"])
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state["optimizer"]["objective"])
        self.scheduler.load_state_dict(state["trainer"]["scheduler"])
        self.sampler.load_state_dict(state["trainer"]["sampler"])
        self.generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = state["trainer"]["step"]

    def export(self) -> Path:
        """RUN/model: the last checkpoint's model folder, the run's result."""
        import shutil

        latest = self.latest_checkpoint()
        final = self.run / "model"
        tmp = self.run / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(latest / "model", tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

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

    def __init__(self, run: Path, tensorboard: bool):
        self.file = open(run / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tensorboard"))
            except ImportError:
                pass

    def write(self, step: int, logs: dict) -> None:
        self.file.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in logs.items()}}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in logs.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _recipe_dict(r: TrainRecipe) -> dict:
    from hvctl.recipe import recipe_to_dict

    return recipe_to_dict(r)


def train(r: TrainRecipe, *, progress: bool | None = None) -> dict:
    return Trainer(r, progress=progress).train()
