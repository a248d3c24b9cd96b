"""The avatar conditioners of one model: built from a recipe or read from a model folder, hooked
into a plain diffusers transformer, and saved beside it (MODEL/avatar/, see hvctl/avatar/__init__.py)."""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
from torch import nn

from hvctl.avatar.conditions import CONDITIONS
from hvctl.errors import HvctlError

AVATAR_DIR = "avatar"
WEIGHTS_FILE = "conditioners.safetensors"


class AvatarConditioners(nn.Module):
    """The conditioners of one model, and the hooks that feed them the current call's conditions."""

    def __init__(self, config: dict, model_config: dict):
        from hvctl import plugins

        super().__init__()
        self.config = config
        self.conditioners = nn.ModuleDict({
            name: plugins.create("conditioner", name, model_config=dict(model_config), **options)
            for name, options in config["conditioners"].items()
        })
        self.inputs: dict | None = None
        self.grid: tuple[int, int, int] | None = None

    @contextmanager
    def given(self, inputs: dict | None):
        """Model calls inside see these conditions (None: none, the plain text-to-video model)."""
        self.inputs = inputs
        try:
            yield
        finally:
            self.inputs = None

    def _scaled(self, name: str, value: torch.Tensor) -> torch.Tensor:
        present = self.inputs.get(f"present.{name}")
        if present is None:
            return value
        return value * present.to(value).view(-1, *[1] * (value.dim() - 1))

    def _active(self):
        return [(name, c) for name, c in self.conditioners.items() if self.inputs.get(name) is not None]

    def add_input_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        for name, conditioner in self._active():
            if hasattr(conditioner, "input_tokens"):
                tokens = tokens + self._scaled(name, conditioner.input_tokens(self.inputs, self.grid))
        return tokens

    def add_after_block(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        for name, conditioner in self._active():
            if block in conditioner.blocks:
                hidden = hidden + self._scaled(name, conditioner.after_block(block, hidden, self.inputs, self.grid))
        return hidden

    def attach(self, transformer) -> None:
        """Make these the transformer's conditioners (its `avatar` submodule) and hook them in."""
        transformer.add_module("avatar", self)
        transformer.register_forward_pre_hook(self._record_grid, with_kwargs=True)
        transformer.x_embedder.register_forward_hook(
            lambda module, args, out: out if self.inputs is None else self.add_input_tokens(out))
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        used = {b for c in self.conditioners.values() for b in c.blocks}
        for index in sorted(used):
            blocks[index].register_forward_hook(partial(self._after_block_hook, index))

    def _record_grid(self, transformer, args, kwargs):
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        c = transformer.config
        self.grid = (latents.shape[2] // c.patch_size_t, latents.shape[3] // c.patch_size, latents.shape[4] // c.patch_size)

    def _after_block_hook(self, index, block, args, out):
        if self.inputs is None:
            return out
        hidden, text = out
        return self.add_after_block(index, hidden), text


def new_conditioners(settings, transformer, window_frames: int | None) -> AvatarConditioners:
    """Fresh conditioners for a train recipe's `avatar` section (zero-initialised outputs);
    window_frames: the inference window, the longest clips trained on."""
    unknown = sorted(set(settings.options) - set(CONDITIONS))
    if unknown:  # options of known but unused conditions are let be: one base recipe serves several
        raise HvctlError(f"avatar.options: {', '.join(unknown)} is not a condition ({', '.join(CONDITIONS)})")
    options = {name: dict(settings.options.get(name, {})) for name in settings.conditions}
    if "audio" in options and "feature_dim" not in options["audio"]:
        options["audio"]["feature_dim"] = audio_encoder_for(settings.audio_encoder, settings.audio_encoder_options).feature_dim
    config = {
        "conditioners": options,
        "audio_encoder": {"name": settings.audio_encoder, "options": dict(settings.audio_encoder_options)},
        "window": {"frames": window_frames, "overlap": settings.window_overlap},
    }
    conditioners = AvatarConditioners(config, transformer.config)
    return conditioners.to(transformer.device, transformer.dtype)


def audio_encoder_for(name: str, options: dict):
    from hvctl import plugins

    return plugins.create("audio_encoder", name, **options)


def read_avatar_config(model_dir: Path) -> dict | None:
    file = Path(model_dir) / AVATAR_DIR / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HvctlError(f"{file}: unreadable ({e})") from None


def load_conditioners(model_dir: Path, transformer) -> AvatarConditioners | None:
    """The model folder's conditioners attached to `transformer`; None when it has none."""
    from safetensors.torch import load_file

    config = read_avatar_config(model_dir)
    if config is None:
        return None
    conditioners = AvatarConditioners(config, transformer.config)
    weights = Path(model_dir) / AVATAR_DIR / WEIGHTS_FILE
    if not weights.is_file():
        raise HvctlError(f"{weights}: missing")
    try:
        conditioners.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise HvctlError(f"{weights}: does not fit {Path(model_dir) / AVATAR_DIR / 'config.json'} "
                         f"({str(e).splitlines()[0]})") from None
    conditioners.to(transformer.device, transformer.dtype).attach(transformer)
    return conditioners


def save_conditioners(model_dir: Path, config: dict, state: dict) -> None:
    """Write MODEL/avatar/ (state: the conditioners' weights, keys without the `avatar.` prefix)."""
    from safetensors.torch import save_file

    from hvctl.io import atomic_output, write_json_atomic

    folder = Path(model_dir) / AVATAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    write_json_atomic(folder / "config.json", config)


def conditions_context(model, inputs: dict | None):
    """`model.avatar.given(inputs)` for a model with conditioners, else nothing."""
    avatar = getattr(model, "avatar", None)
    return avatar.given(inputs) if avatar is not None and inputs else nullcontext()
