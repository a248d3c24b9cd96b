"""Audio encoders: a 16 kHz mono waveform -> one feature vector per video frame, (frames, F).

Each video frame gets the mean of the encoder's frames whose centres fall within half a frame
period of the video frame's time, so audio and video stay in step whatever the two rates are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hvctl.data.formats import AUDIO_RATE
from hvctl.errors import HvctlError


def pool_to_frames(features: torch.Tensor, feature_rate: float, fps: float, frames: int) -> torch.Tensor:
    """(N, F) features at `feature_rate` per second -> (frames, F) at `fps`."""
    centres = (torch.arange(features.shape[0], dtype=torch.float64) + 0.5) / feature_rate
    video_times = torch.arange(frames, dtype=torch.float64) / fps
    nearest = torch.bucketize(centres, video_times + 0.5 / fps)  # the video frame each feature frame serves
    pooled = torch.zeros(frames, features.shape[1], dtype=torch.float64)
    counts = torch.zeros(frames, dtype=torch.float64)
    keep = nearest < frames
    pooled.index_add_(0, nearest[keep], features[keep].double())
    counts.index_add_(0, nearest[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    return (pooled / counts.clamp_min(1)[:, None]).float()


def _fit_length(samples: np.ndarray, fps: float, frames: int) -> np.ndarray:
    """The waveform covering `frames` video frames: cut, or padded with silence."""
    n = int(round(frames / fps * AUDIO_RATE))
    samples = np.asarray(samples, dtype=np.float32)[:n]
    return np.pad(samples, (0, n - samples.size))


class LogMelEncoder:
    """Whisper's log-mel spectrogram (25 ms windows every 10 ms, 80 mel bands, log10 clipped 8
    below the clip's peak, scaled as (x + 4) / 4), with no learned weights."""

    def __init__(self, n_mels: int = 80):
        from transformers.audio_utils import mel_filter_bank

        self.n_fft, self.hop = 400, 160
        self.feature_dim = n_mels
        self.filters = torch.from_numpy(mel_filter_bank(
            num_frequency_bins=self.n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
            max_frequency=AUDIO_RATE / 2, sampling_rate=AUDIO_RATE, norm="slaney", mel_scale="slaney")).float()
        self.identity = f"logmel/{n_mels}"

    def to(self, device):
        return self

    def __call__(self, samples: np.ndarray, fps: float, frames: int) -> torch.Tensor:
        audio = torch.from_numpy(_fit_length(samples, fps, frames))
        stft = torch.stft(audio, self.n_fft, self.hop, window=torch.hann_window(self.n_fft), return_complex=True)
        power = stft[..., :-1].abs() ** 2  # (freq, time)
        mel = (self.filters.T @ power).clamp_min(1e-10).log10()
        mel = torch.maximum(mel, mel.max() - 8.0)
        return pool_to_frames(((mel + 4.0) / 4.0).T, AUDIO_RATE / self.hop, fps, frames)


class WhisperEncoder:
    """A Whisper model's encoder, from a local transformers folder (with its feature extractor):
    the hidden states of `layer`, 50 per second, over the audio cut in Whisper's windows."""

    def __init__(self, path: str, layer: int = -1):
        from transformers import WhisperFeatureExtractor, WhisperModel

        folder = Path(path)
        if not (folder / "config.json").is_file() or not (folder / "preprocessor_config.json").is_file():
            raise HvctlError(f"{folder}: not a Whisper folder (needs config.json and preprocessor_config.json)")
        self.extractor = WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
        self.encoder = WhisperModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).encoder.eval()
        self.layer = layer
        self.feature_dim = self.encoder.config.d_model
        from hvctl.models.loading import folder_fingerprint

        self.identity = f"whisper/{folder_fingerprint(folder)}/{layer}"

    def to(self, device):
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def __call__(self, samples: np.ndarray, fps: float, frames: int) -> torch.Tensor:
        audio = _fit_length(samples, fps, frames)
        window = self.extractor.n_samples
        rate = self.extractor.nb_max_frames / 2 / (window / AUDIO_RATE)  # encoder frames per second
        device = next(self.encoder.parameters()).device
        parts = []
        for start in range(0, audio.size, window):
            chunk = audio[start:start + window]
            mel = self.extractor(chunk, sampling_rate=AUDIO_RATE, return_tensors="pt", padding="max_length").input_features
            states = self.encoder(mel.to(device, self.encoder.dtype), output_hidden_states=True).hidden_states[self.layer][0]
            parts.append(states[:int(np.ceil(chunk.size / AUDIO_RATE * rate))].float().cpu())
        return pool_to_frames(torch.cat(parts), rate, fps, frames)
