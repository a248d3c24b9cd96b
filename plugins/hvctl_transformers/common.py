"""Loading a local transformers folder, and generating from it greedily."""

from __future__ import annotations

from pathlib import Path

from hvctl.errors import HvctlError


def check_folder(model, what: str) -> Path:
    if model is None:
        raise HvctlError(f"the {what} needs a model folder: pass --model DIR (a local transformers folder)")
    path = Path(model)
    if not (path / "config.json").is_file():
        raise HvctlError(f"{path}: not a transformers model folder (no config.json)")
    return path


def load(path: Path, auto_model: str, processor_class: str, device: str):
    """(model, processor) from a local folder, in eval mode on `device`; a clear error otherwise."""
    import transformers

    from hvctl.models.loading import resolve_device_dtype

    transformers.utils.logging.disable_progress_bar()  # a bar per load is noise in a stage's output
    torch_device, dtype = resolve_device_dtype(device, "auto")
    try:
        processor = getattr(transformers, processor_class).from_pretrained(path, local_files_only=True)
        model = getattr(transformers, auto_model).from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise HvctlError(f"{path}: cannot load as {auto_model} ({str(e).splitlines()[0]})") from None
    return model.to(torch_device).eval(), processor


def generate_reply(model, inputs: dict, max_new_tokens: int, tokenizer) -> str:
    """The model's greedy continuation of `inputs`, decoded (deterministic: no sampling)."""
    import torch

    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
