"""Training variants: one small spec each, so that the loop (hvctl/train/trainer.py) names none.

A spec says, for one kind of run, how to build the trained module, which batches it reads, its
objective, and what its checkpoints export; the trainer owns everything the variants share
(parallelism, optimizer, EMA, checkpoints, resume, metrics) and only calls the spec. The idea is
torchtitan's TrainSpec; here a spec is a class, so a variant overrides only what it changes.

Base variants (one per run, chosen by `variant_name`):
    dit          flow matching on the DiT: full weights, a `trainable` subset, or `reinit`  (hvctl/train/dit.py)
    vae          the VAE's reconstruction objective                                      (hvctl/train/vae.py)
    avatar       the DiT's avatar conditioners                                           (hvctl/avatar/training.py)
    cfg_distill  classifier-free-guidance distillation into a guidance-embedded student  (hvctl/train/distill.py)
    step_distill step distillation into a few-step student (distill mode: steps)        (hvctl/train/distill_steps.py)

Modifiers compose with a base variant: a mixin class placed before it in the run's spec class,
whose methods call super(), when the recipe asks for them:
    i2v          make a text-to-video DiT image-to-video before training  (hvctl/train/dit.py)
    lora         train LoRA adapters of the DiT instead of its weights; export merges them  (hvctl/train/dit.py)
    dpo          preference optimisation on `hvctl prefer`'s pairs against a frozen reference  (hvctl/train/dpo.py)

To add a variant:
  1. Its recipe: a `TrainRecipe` subclass with its own `KIND` and `VARIANT` (listed in
     hvctl/recipe.py's RECIPE_KINDS and, for a new command, in cli.py; VARIANT may be a property
     when a key chooses, as distill's `mode` does), or a key of TrainRecipe that `variant_name` reads.
  2. Its spec: subclass `TrainSpec` (or `DitSpec` to change only the objective, say) and
     decorate it with `@register("name")`; a modifier: a mixin decorated `@register_modifier("name", applies)`.
  3. Add its module to `BUILTIN` below, so that looking a variant up registers it.
  4. Test that it trains, resumes exactly and exports (tests/test_train.py shows how).

A spec instance belongs to one run: it may keep what it builds (the teacher, the VAE's config).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from hvctl.errors import HvctlError

if TYPE_CHECKING:
    import torch

    from hvctl.train.trainer import Trainer

BUILTIN = ("hvctl.train.dit", "hvctl.train.vae", "hvctl.avatar.training", "hvctl.train.distill", "hvctl.train.distill_steps",
           "hvctl.train.dpo")

SPECS: dict[str, type[TrainSpec]] = {}
MODIFIERS: dict[str, tuple[Callable, type]] = {}  # name: (applies(recipe) -> bool, mixin)


def register(name: str):
    """Class decorator: the spec of the base variant `name`."""
    def add(cls):
        if name in SPECS and SPECS[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"training variant {name!r} is registered twice ({SPECS[name].__qualname__}, {cls.__qualname__})")
        cls.name = name
        SPECS[name] = cls
        return cls
    return add


def register_modifier(name: str, applies: Callable):
    """Class decorator: a mixin applied to a run's spec when applies(recipe) is true. Modifiers
    apply in the order registered, the first registered innermost (next to the base spec)."""
    def add(cls):
        MODIFIERS[name] = (applies, cls)
        return cls
    return add


def variant_name(r) -> str:
    """The base variant of a train recipe: its class's VARIANT, else what its keys say."""
    if getattr(r, "VARIANT", None):
        return r.VARIANT
    if r.avatar is not None:
        return "avatar"
    return "vae" if r.target == "vae" else "dit"


def spec_for(r) -> TrainSpec:
    """A fresh spec for this recipe's run: its base variant with the modifiers it asks for."""
    for module in BUILTIN:
        importlib.import_module(module)
    name = variant_name(r)
    if name not in SPECS:
        raise HvctlError(f"unknown training variant {name!r} (known: {', '.join(sorted(SPECS))})")
    mixins = [cls for applies, cls in reversed(MODIFIERS.values()) if applies(r)]
    base = SPECS[name]
    cls = type("".join(m.__name__ for m in mixins) + base.__name__, (*mixins, base), {}) if mixins else base
    return cls()


class TrainSpec:
    """One training variant. `t` is the Trainer: its recipe (t.r), device, ranks, run folder and
    base model folder are set when these are called, and the spec's own results (t.model,
    t.dataset, t.sampler, t.objective) once made."""

    name: ClassVar[str]
    component: ClassVar[str] = "transformer"  # the model folder's component trained and exported
    model_key: ClassVar[str] = "model"  # the recipe key naming the folder that training starts from

    def __init__(self):
        self.frozen: dict[str, torch.nn.Module] = {}  # modules the objective reads but does not train

    def check(self, r) -> None:
        """Refuse recipe settings this variant cannot honour, before any model loads."""

    def load(self, t: Trainer, folder) -> torch.nn.Module:
        """The component: the folder's weights, or (`reinit`) a fresh init of its config."""
        import torch

        from hvctl.models.loading import component_from_config, load_component

        if t.r.reinit:  # e.g. stage 0: a new DiT beside pretrained VAE and text encoders
            module = component_from_config(folder, self.component)
            if self.component == "transformer":
                from hvctl.models.dit_init import init_dit

                init_dit(module, t.r.dit_init)
            return module.to(t.device)
        return load_component(folder, self.component, dtype=torch.float32, device=t.device)

    def extend(self, t: Trainer, model, folder) -> torch.nn.Module:
        """Trained modules added to the loaded model before the trained parameters are chosen (default: none)."""
        return model

    def build(self, t: Trainer, folder) -> torch.nn.Module:
        """The trained module, on t.device, in train mode, its trained parameters requiring grad
        (all of them, or the recipe's `trainable` prefixes)."""
        model = self.extend(t, self.load(t, folder), folder)
        model.train().requires_grad_(True)
        if t.r.trainable is not None:
            freeze_all_but(model, t.r.trainable, self.component)
        return model

    def data(self, t: Trainer, buckets) -> object:
        """The dataset: `buckets` (a BucketConfig) per sample, .buckets {bucket: indices}, len()."""
        raise NotImplementedError

    def objective(self, t: Trainer, dataset) -> Callable:
        """(model, batch, generator, *, step, stratum) -> (loss, logs); state_dict() if it has state."""
        raise NotImplementedError

    def ready(self, t: Trainer) -> None:
        """Settings that wait for the data and sampler (default: none)."""

    def batch(self, t: Trainer, indices: list[int], generator: torch.Generator) -> dict:
        """One micro-batch: the samples `indices`, collated; randomness from `generator` only."""
        raise NotImplementedError

    def batch_cost(self, t: Trainer, indices: list[int]) -> float:
        """Estimated compute of a micro-batch (its samples share one bucket), for parallel.balance."""
        raise NotImplementedError

    def exported(self, t: Trainer, state: dict) -> tuple[torch.nn.Module, Callable[[Path], None] | None]:
        """On rank 0, from the full trained state: the module saved as the component, and a writer
        of anything else into a checkpoint folder (its model folder is written already)."""
        module = t.model_class.from_config(t.model.config)
        module.load_state_dict(state)
        return module, None

    def finish_export(self, t: Trainer, model_dir: Path, checkpoint: Path) -> None:
        """Last edits to the run's exported model folder, a copy of `checkpoint`'s (default: none)."""

    def result(self, t: Trainer) -> dict:
        """Extra entries of the run's result (default: none)."""
        return {}


def chain(*writers) -> Callable[[Path], None] | None:
    """One writer that runs the given ones (Nones skipped) in order."""
    writers = [w for w in writers if w is not None]
    if not writers:
        return None
    return lambda folder: [w(folder) for w in writers] and None


def freeze_all_but(model, prefixes: list[str], component: str) -> None:
    """Train only the parameters under these name prefixes (the recipe's `trainable`)."""
    names = [name for name, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
    if unknown:
        tops = sorted({n.split(".")[0] for n in names})
        raise HvctlError(f"trainable: {', '.join(unknown)} names no parameters of the {component}; "
                         f"its top-level parts: {', '.join(tops)}")
    for name, param in model.named_parameters():
        param.requires_grad_(any(name == p or name.startswith(p + ".") for p in prefixes))
