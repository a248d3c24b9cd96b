"""`hvctl train` and `hvctl distill`: one loop for every training variant (hvctl/train/specs.py).

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
    """Exponential moving average of parameters, kept in float32.

    The decay ramps up as diffusers' EMAModel ramps it, min(decay, (1 + t) / (10 + t)) at update t
    (the first update copies the weights): with a constant 0.999, 5% of the starting weights, a
    random init in a fresh run, would still be in the average after 3,000 steps."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.named_parameters() if v.requires_grad}

    def decay_at(self, t: int) -> float:
        return 0.0 if t == 0 else min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, module: torch.nn.Module, t: int) -> None:
        """Update number t (0: the first), the optimizer steps already taken."""
        weight = 1 - self.decay_at(t)
        for k, v in module.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), weight)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.float().clone() for k, v in state.items()}


class Trainer:
    """The loop shared by every training variant; what differs between them is the run's spec
    (hvctl/train/specs.py), which this calls and never names."""

    def __init__(self, r: TrainRecipe, *, progress: bool | None = None):
        from hvctl.models.loading import resolve_device_dtype
        from hvctl.io import check_output_dir
        from hvctl.models.loading import ModelFolder, quiet_libraries
        from hvctl.parallel import data_rank, init_distributed, parallelize
        from hvctl.train.specs import spec_for

        quiet_libraries()
        if r.out is None:
            raise HvctlError("train needs an output folder ('out' in the recipe or --out)")
        self.r = r
        self.spec = spec_for(r)
        self.spec.check(r)
        self.run = check_output_dir(r.out, "out")
        self.run.mkdir(parents=True, exist_ok=True)
        self.device, _ = resolve_device_dtype(r.device, "float32")
        self.ranks = init_distributed(self.device.type)
        if self.device.type == "cuda" and self.ranks.distributed:
            self.device = torch.device("cuda", self.ranks.local_rank)
        self.progress = progress if self.ranks.is_main else False
        self.component = self.spec.component
        self.base_model = self._base_model()
        torch.manual_seed(r.seed)
        self.model = self.spec.build(self, ModelFolder.open(self.base_model))
        self.frozen = self.spec.frozen
        if self.component == "transformer":  # every DiT the run calls, trained or frozen, on the recipe's kernel
            from hvctl.accelerate import set_attention, training_attention_backend

            backend = training_attention_backend(r.attention, self.device)
            for dit in (self.model, *self.frozen.values()):
                set_attention(dit, backend)
        self.model_class = type(self.model)  # FSDP and replicate swap the instance's class
        self.mesh = parallelize(self.model, self.ranks, self.device.type, r.parallel,
                                param_dtype=None if r.precision == "float32" else getattr(torch, r.precision))
        # The data shard: ranks of one sequence-parallel group read the same micro-batches.
        self.data_index, self.data_count = data_rank(self.mesh) if self.mesh is not None else (0, 1)
        self.dataset = self.spec.data(self, self._bucket_config())
        self.objective = self.spec.objective(self, self.dataset)
        self.sampler = self._sampler()
        self.bucket_of = {i: bucket for bucket, ix in self.dataset.buckets.items() for i in ix}
        self.spec.ready(self)
        o = r.optim
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, r))
        self.ema = EMA(self.model, r.ema_decay) if r.ema_decay > 0 else None
        self.step = 0
        self._resume()

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The frozen teacher of a distillation run (None otherwise)."""
        return self.frozen.get("teacher")

    def _base_model(self) -> Path:
        """The folder training starts from: the recipe's (its variant says which key), or one made
        from a preset in the run folder."""
        from hvctl.models.presets import init_model

        start = getattr(self.r, self.spec.model_key)
        if start is not None:
            return Path(start)
        if self.r.init_preset is None:
            raise HvctlError("train needs a starting model: 'model' (a model folder) or 'init_preset' (e.g. tiny)")
        from hvctl.parallel import barrier

        base = self.run / "base-model"
        if self.ranks.is_main and not (base / "model_index.json").is_file():
            init_model(self.r.init_preset, base, guidance_embeds=self.r.init_guidance_embeds, seed=self.r.seed,
                       overrides=self.r.init_overrides, dit_init=self.r.dit_init)
        barrier(self.ranks)
        return base

    def _bucket_config(self):
        from hvctl.data.buckets import BucketConfig

        d = self.r.data
        buckets = BucketConfig()
        if d.aspect_buckets is not None:
            buckets.aspect_buckets = [tuple(b) for b in d.aspect_buckets]
        if d.frame_buckets is not None:
            buckets.frame_buckets = list(d.frame_buckets)
        return buckets

    def _sampler(self):
        from hvctl.data.batching import BucketBatchSampler
        from hvctl.data.buckets import BucketConfig

        d = self.r.data
        # A stage trains on its own buckets and media only (a cache may hold more).
        stage = BucketConfig(aspect_buckets=d.aspect_buckets, frame_buckets=d.frame_buckets)
        stage_buckets = {b: ix for b, ix in self.dataset.buckets.items() if stage.admits(b, d.media)}
        try:
            return BucketBatchSampler(stage_buckets, d.batch_size, seed=self.r.seed, image_ratio=d.image_ratio)
        except ValueError as e:
            held = ", ".join("x".join(map(str, b)) for b in sorted(stage_buckets)) or "none"
            raise HvctlError(f"data: {e} among this stage's buckets ({held}); lower data.batch_size "
                             "or widen data.aspect_buckets / frame_buckets / media") from None

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
        return self.spec.batch_cost(self, indices)

    def micro_batch(self, indices: list[int], j: int) -> tuple[dict, torch.Generator, tuple[int, int]]:
        """Micro-batch j of the step: its samples, the generator of its randomness, its stratum."""
        digest = hashlib.sha256(f"{self.r.seed}/{self.step}/{j}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        stratum = (j, self.r.optim.grad_accumulation * self.data_count)
        return self.spec.batch(self, indices, generator), generator, stratum

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
            self.ema.update(self.model, self.step)
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
        last_validation: dict | None = None
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
                        last_validation = self.validate()
                        if last_validation and metrics:
                            metrics.write(self.step, last_validation)
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
                "last": last_logs, **({"validation": last_validation} if last_validation else {}), **self.spec.result(self)}

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

    def _exported(self) -> tuple[torch.nn.Module | None, object]:
        """On rank 0, the spec's export of the full weights (the EMA's when EMA is on): the module
        to save as the model and a writer of the rest; (None, None) elsewhere. Every rank must
        call it: sharded weights are gathered."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ema is not None:
            state.update({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in self.ema.shadow.items()})
        if not self.ranks.is_main:
            return None, None
        return self.spec.exported(self, state)

    def save(self) -> Path:
        from hvctl.train.checkpoint import copy_model_folder, save_checkpoint, write_state_files

        module, write_rest = self._exported()

        def write_main(folder: Path) -> None:
            copy_model_folder(self.base_model, folder / "model", self.component)
            module.save_pretrained(folder / "model" / self.component, safe_serialization=True)
            if write_rest is not None:
                write_rest(folder)
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
            self.spec.finish_export(self, tmp, latest)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        return final

    def validate(self) -> dict | None:
        """Validation (DiT) of the newest checkpoint's model folder, the weights a run exports: its
        videos, and its held-out loss, returned as metrics."""
        if self.component != "transformer":
            return None
        v = self.r.validation
        model = self.latest_checkpoint() / "model"
        if v.prompts:
            from hvctl.generate import GenerateRecipe, generate

            out = self.run / "validation" / f"step-{self.step:08d}"
            for i, prompt in enumerate(v.prompts):
                generate(GenerateRecipe(prompt=prompt, model=model, steps=v.steps, seed=v.seed, guidance_scale=v.guidance_scale,
                                        output=out / f"{i:02d}.mp4", device=str(self.device)), progress=False)
        if v.loss_cache is None:
            return None
        from hvctl.train.validation import loss_logs, model_losses

        result = model_losses(model, v.loss_cache, samples=v.loss_samples, sigmas=v.loss_sigmas, seed=v.seed,
                              device=str(self.device), guidance=self.r.flow.guidance,
                              accept_foreign_cache=v.accept_foreign_cache)
        return loss_logs(result)


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


def _recipe_dict(r: TrainRecipe) -> dict:
    from hvctl.recipe import recipe_to_dict

    return recipe_to_dict(r)


def train(r: TrainRecipe, *, progress: bool | None = None) -> dict | None:
    """Run a train recipe; the result on rank 0 (None on the other ranks)."""
    return Trainer(r, progress=progress).train()
