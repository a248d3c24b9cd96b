"""Load a diffusers-format HunyuanVideo model folder into diffusers and transformers classes.

The folder's model_index.json names each component's library and class, as diffusers reads it:
HunyuanVideoPipeline's, or HunyuanVideoImageToVideoPipeline's (the official I2V: a LLaVA text
encoder that reads the image too, with its `image_processor`).
Only the classes listed in COMPONENT_CLASSES are accepted (never an arbitrary import string),
and weights are read from safetensors only.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hvctl.errors import HvctlError
from hvctl.io import write_json_atomic
from hvctl.models.presets import OFFICIAL_GENERATION_DEFAULTS

COMPONENT_CLASSES = {
    "transformer": {("diffusers", "HunyuanVideoTransformer3DModel")},
    "vae": {("diffusers", "AutoencoderKLHunyuanVideo")},
    "scheduler": {("diffusers", "FlowMatchEulerDiscreteScheduler")},
    "text_encoder": {("transformers", "LlamaModel"), ("transformers", "LlavaForConditionalGeneration")},
    "text_encoder_2": {("transformers", "CLIPTextModel")},
    "tokenizer": {("transformers", c) for c in ("PreTrainedTokenizerFast", "TokenizersBackend", "LlamaTokenizerFast", "LlamaTokenizer", "AutoTokenizer")},
    "tokenizer_2": {("transformers", c) for c in ("CLIPTokenizer", "CLIPTokenizerFast")},
    "image_processor": {("transformers", c) for c in ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")},
}
WEIGHTED = ("transformer", "vae", "text_encoder", "text_encoder_2")


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' info logs and their own progress bars (hvctl shows its own)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@dataclass
class ModelFolder:
    """A model folder's layout, read without loading any weights."""

    path: Path
    index: dict
    hvctl_info: dict

    @classmethod
    def open(cls, path: str | Path) -> "ModelFolder":
        path = Path(path)
        if not path.is_dir():
            raise HvctlError(f"{path}: model folder not found")
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise HvctlError(f"{path}: not a diffusers model folder (no model_index.json)")
        index = _read_json(index_file)
        info_file = path / "hvctl.json"
        return cls(path, index, _read_json(info_file) if info_file.is_file() else {})

    @property
    def component_names(self) -> list[str]:
        """The components model_index.json names (not its _class_name and the like, nor empty slots)."""
        return [n for n, entry in self.index.items() if not n.startswith("_") and isinstance(entry, list) and entry[0]]

    def component_class(self, name: str) -> tuple[str, str]:
        entry = self.index.get(name)
        if not entry or entry[0] is None:
            raise HvctlError(f"{self.path}/model_index.json: no '{name}' component")
        library, class_name = entry
        if (library, class_name) not in COMPONENT_CLASSES[name]:
            allowed = ", ".join(sorted(f"{lib}.{cls}" for lib, cls in COMPONENT_CLASSES[name]))
            raise HvctlError(f"{self.path}/model_index.json: '{name}' is {library}.{class_name}; supported: {allowed}")
        return library, class_name

    def component_config(self, name: str) -> dict:
        config = "scheduler_config.json" if name == "scheduler" else "config.json"
        file = self.path / name / config
        if not file.is_file():
            raise HvctlError(f"{file}: missing")
        return _read_json(file)

    @property
    def reads_images(self) -> bool:
        """Whether the text encoder reads the image with the prompt (a LLaVA, the official I2V's)."""
        return self.component_class("text_encoder")[1] == "LlavaForConditionalGeneration"

    @property
    def has_weights(self) -> bool:
        return self.hvctl_info.get("weights", True)

    @property
    def generation_defaults(self) -> dict:
        """Generation settings that suit this model: hvctl.json's, else the official ones (the flow
        shift from the scheduler's config), plus whether the DiT takes embedded guidance."""
        guidance_embeds = bool(self.component_config("transformer").get("guidance_embeds", True))
        defaults = {**OFFICIAL_GENERATION_DEFAULTS, "flow_shift": self.component_config("scheduler").get("shift", 7.0)}
        if not guidance_embeds:
            defaults["embedded_guidance"] = None
        defaults.update(self.hvctl_info.get("generation", {}))
        return {**defaults, "guidance_embeds": guidance_embeds}


def input_device(module):
    """Where a component's inputs go: its own device, or the CPU while sequential offload keeps its
    weights on the meta device (accelerate's hooks move inputs along with the weights)."""
    import torch

    device = module.device
    return torch.device("cpu") if device.type == "meta" else device


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HvctlError(f"{path}: unreadable JSON ({e})") from None


@dataclass
class Components:
    """The loaded parts of a HunyuanVideo model; any part not asked for is None."""

    folder: ModelFolder
    transformer: object = None
    vae: object = None
    text_encoder: object = None
    tokenizer: object = None
    text_encoder_2: object = None
    tokenizer_2: object = None
    image_processor: object = None  # with a LLaVA text encoder only
    scheduler_config: dict | None = None


def _component_type(folder: ModelFolder, name: str):
    library, class_name = folder.component_class(name)
    return getattr(importlib.import_module(library), class_name)


def load_component(folder: ModelFolder, name: str, *, dtype=None, device=None):
    cls = _component_type(folder, name)
    class_name = cls.__name__
    path = folder.path / name
    if not path.is_dir():
        raise HvctlError(f"{path}: component folder missing")
    if name in WEIGHTED and not folder.has_weights:
        raise HvctlError(f"{folder.path}: has configs but no weights (written with --meta)")
    kwargs = {}
    if name in WEIGHTED:
        kwargs = {"use_safetensors": True}
        kwargs["dtype"] = dtype
    try:
        component = cls.from_pretrained(path, **kwargs)
    except Exception as e:  # the libraries raise many types for a broken folder
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HvctlError(f"{path}: cannot load {class_name}: {reason}") from None
    if device is not None and hasattr(component, "to"):
        component = component.to(device)
    if hasattr(component, "eval"):
        component.eval().requires_grad_(False)
    return component


def component_from_config(folder: ModelFolder, name: str):
    """A freshly initialised component (float32, torch's current RNG) from the folder's config alone."""
    return _component_type(folder, name).from_config(folder.component_config(name))


def load_components(path: str | Path, *, dtype=None, device=None, parts=("transformer", "vae", "text")) -> Components:
    """Load the asked parts of a model folder: "transformer", "vae", "text" (both encoders and tokenizers, and the
    image processor of a LLaVA text encoder)."""
    quiet_libraries()
    folder = ModelFolder.open(path)
    text = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    names = [n for part in parts for n in (text if part == "text" else [part])]
    if "text" in parts and folder.reads_images:
        names.append("image_processor")
    loaded = {name: load_component(folder, name, dtype=dtype, device=device) for name in names}
    return Components(folder=folder, scheduler_config=folder.component_config("scheduler"), **loaded)


# Keys diffusers and transformers write into config.json / tokenizer_config.json about where from
# and by which version a component was saved, not what it is: a component re-saved from another
# folder keeps its fingerprint.
PROVENANCE_KEYS = ("_name_or_path", "_diffusers_version", "transformers_version", "name_or_path", "is_local",
                   "local_files_only")


def _fingerprint_bytes(p: Path):
    if p.name.endswith("config.json"):
        try:
            config = json.loads(p.read_text())
        except (OSError, ValueError):
            config = None
        if isinstance(config, dict):
            yield json.dumps({k: v for k, v in config.items() if k not in PROVENANCE_KEYS}, sort_keys=True).encode()
            return
    with open(p, "rb") as f:
        yield from iter(lambda: f.read(1 << 20), b"")


def folder_fingerprint(path: str | Path) -> str:
    """sha256 over every file of a model folder (relative name and content; *config.json files
    without their PROVENANCE_KEYS).

    Hashing 26 GB of weights takes a minute, so the result is cached per (path, size, mtime).
    """
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    cache_file = cache_dir() / "fingerprints.json"
    key = hashlib.sha256(json.dumps(["v2", str(path), stamp]).encode()).hexdigest()
    cache = _read_json(cache_file) if cache_file.is_file() else {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    for p in files:
        digest.update(str(p.relative_to(path)).encode() + b"\0")
        for block in _fingerprint_bytes(p):
            digest.update(block)
    cache[key] = "sha256:" + digest.hexdigest()
    try:
        write_json_atomic(cache_file, cache)
    except OSError:
        pass  # a read-only cache only costs a rehash next time
    return cache[key]


def cache_dir() -> Path:
    """Where hvctl keeps its own files: $HVCTL_HOME, else ~/.cache/hvctl."""
    root = os.environ.get("HVCTL_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hvctl"
    return Path(root)


def resolve_device_dtype(device: str, dtype: str):
    """A recipe's device and dtype ("auto": CUDA in bfloat16 when there is one, else the CPU in
    float32) as torch objects; a device this machine lacks is a one-line error."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise HvctlError(f"--device {device}: not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HvctlError(f"--device {device}: CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return device, getattr(torch, dtype)


def prepare_model(model: Path | None) -> tuple[Path, dict]:
    """The model folder to use (the embedded default when none is named) and its generation defaults."""
    from hvctl.models.default import default_model_dir

    model_dir = Path(model) if model else default_model_dir()
    return model_dir, ModelFolder.open(model_dir).generation_defaults
