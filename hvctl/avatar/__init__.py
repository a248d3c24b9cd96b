"""Avatar: a reference image animated by audio, pose and expression, any of them at once.

The conditioners (plugins/hvctl_avatar, chosen by registered name) are applied to a plain
diffusers HunyuanVideo transformer from outside: `AvatarConditioners.attach` adds them as its
`avatar` submodule (so they train, checkpoint and shard with it) and hooks them in, adding input
tokens after the patch embedding and residuals after chosen blocks. The transformer's own code and
weights stay those of a text-to-video model.

A model folder holds them beside the usual components:

    MODEL/avatar/config.json                 the conditioners and their options, the audio encoder, the window
    MODEL/avatar/conditioners.safetensors    their weights

The conditions of one call are a dict of tensors (`given`):
    reference   (B, C, 1, H', W')     the reference image's latent      | latent-aligned
    pose        (B, C, T', H', W')    the pose video's latents          |
    audio       (B, T, F)             audio features per video frame    | frame-aligned
    expression  (B, T, E)             expression features per video frame
    audio_mask  (B, 1, H, W)          where the audio may act (1: everywhere when absent)
    present.X   (B,)                  1 where sample b has condition X (hybrid batches, dropout)

The package, one concern a module:
    conditioners.py   the conditioners: built, hooked in, read from and saved to a model folder
    conditions.py     condition files and arrays -> the conditioners' inputs, per sample and batched
    windows.py        long videos: overlapping windows, blended
    generation.py     `hvctl avatar`: the recipe, the loaded model, the run
    training.py       the avatar training variant (hvctl/train/specs.py)
"""

from hvctl.avatar.conditioners import (AVATAR_DIR, WEIGHTS_FILE, AvatarConditioners, audio_encoder_for,
                                       conditions_context, load_conditioners, new_conditioners, read_avatar_config,
                                       save_conditioners)
from hvctl.avatar.conditions import (CONDITIONS, FRAME_ALIGNED, LATENT_ALIGNED, MASKS, ConditionEncoder,
                                     batch_inputs, read_expression)
from hvctl.avatar.generation import AvatarGenerator, AvatarRecipe, avatar, frames_for
from hvctl.data.formats import AUDIO_RATE
from hvctl.avatar.windows import WindowedDenoiser, blend_weights, window_inputs, windows

__all__ = ["AUDIO_RATE", "AVATAR_DIR", "CONDITIONS", "FRAME_ALIGNED", "LATENT_ALIGNED", "MASKS", "WEIGHTS_FILE",
           "AvatarConditioners", "AvatarGenerator", "AvatarRecipe", "ConditionEncoder", "WindowedDenoiser", "audio_encoder_for",
           "avatar", "batch_inputs", "blend_weights", "conditions_context", "frames_for", "load_conditioners",
           "new_conditioners", "read_avatar_config", "read_expression", "save_conditioners", "window_inputs", "windows"]
