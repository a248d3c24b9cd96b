"""Video, image and audio files through PyAV: H.264 mp4, PNG and WAV out, anything ffmpeg decodes in.

Frames are numpy uint8 arrays [T, H, W, 3] (RGB); audio is mono float32 samples [N] in [-1, 1].
Every reader turns a missing, foreign, corrupt, truncated or empty file into an HvctlError naming
the file; every writer is atomic (hvctl.io).
"""

import itertools
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from hvctl.data.formats import AUDIO_RATE
from hvctl.errors import HvctlError
from hvctl.io import atomic_output

AAC_FRAME_SIZE = 1024  # samples per frame that ffmpeg's native AAC encoder requires


def write_video(path, frames, fps, crf=12, audio=None):
    """Write frames (an array [T,H,W,3] uint8, or any iterable of [H,W,3] uint8) as an H.264 mp4.

    audio: optional (samples, sample_rate), mono float samples in [-1, 1], muxed as AAC.
    Frames are encoded as they come, so a long iterable never has to be held in memory.
    """
    path = Path(path)
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise HvctlError(f"{path}: frames must be an array [T,H,W,3], got shape {frames.shape}")
    if not fps > 0:
        raise HvctlError(f"{path}: fps must be positive, got {fps}")
    if audio is not None:
        samples, sample_rate = _checked_audio(path, *audio)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise HvctlError(f"{path}: no frames to write")
    shape = _checked_rgb(path, first, "frame 0").shape
    with atomic_output(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        # Every stream must exist before the first packet is muxed.
        stream = _add_video_stream(container, path, shape, fps, crf)
        if audio is not None:
            audio_stream = container.add_stream("aac", rate=sample_rate, layout="mono")
        for i, frame in enumerate(itertools.chain([first], frames)):
            frame = _checked_rgb(path, frame, f"frame {i}")
            if frame.shape != shape:
                raise HvctlError(f"{path}: frame {i} has shape {frame.shape}, frame 0 had {shape}")
            container.mux(stream.encode(_yuv_frame(frame)))
        container.mux(stream.encode())
        if audio is not None:
            _encode_audio(container, audio_stream, samples)
    return path


def _yuv_frame(rgb):
    """An [H,W,3] uint8 frame as the encoder's yuv420p, with each plane's row padding zeroed.

    The conversion leaves the bytes between a plane's width and its line size as they were in
    memory, and x264 reads them (a 48-pixel-wide clip's chroma rows of 24 in lines of 32 gave
    different files from the same frames, depending on what the process had done before).
    """
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    for plane in frame.planes:
        if plane.line_size > plane.width:
            rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size).copy()
            rows[:, plane.width:] = 0
            plane.update(rows.tobytes())
    return frame


def _add_video_stream(container, path, shape, fps, crf):
    height, width = shape[:2]
    if height % 2 or width % 2:
        raise HvctlError(f"{path}: H.264 (yuv420p) needs an even width and height, got {width}x{height}")
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))  # 29.97 -> 30000/1001
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    # One encoder thread: x264's threaded output varied between runs on the same frames (seen on
    # toy avatar clips), and the same inputs must give the same file.
    stream.options = {"crf": str(crf), "threads": "1"}
    return stream


def _checked_audio(path, samples, sample_rate):
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise HvctlError(f"{path}: audio must be non-empty mono samples [N], got shape {samples.shape}")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise HvctlError(f"{path}: audio sample rate must be a positive integer, got {sample_rate}")
    return np.clip(samples, -1.0, 1.0), int(sample_rate)


def _encode_audio(container, stream, samples):
    for start in range(0, samples.size, AAC_FRAME_SIZE):
        chunk = samples[start:start + AAC_FRAME_SIZE]
        chunk = np.pad(chunk, (0, AAC_FRAME_SIZE - chunk.size))  # the last frame, padded with silence
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = stream.rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def write_wav(path, samples, sample_rate):
    """Write mono float samples in [-1, 1] as a 16-bit PCM WAV file."""
    path = Path(path)
    samples, sample_rate = _checked_audio(path, samples, sample_rate)
    pcm = np.rint(samples * 32767).astype("<i2")
    with atomic_output(path) as tmp, wave.open(str(tmp), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return path


def read_audio(path, sample_rate=AUDIO_RATE):
    """Decode the first audio stream of a file (wav, mp3, an mp4's audio, ...): mono float32 [N] in
    [-1, 1] at `sample_rate`, downmixed and resampled as needed."""
    path = Path(path)
    if not path.is_file():
        raise HvctlError(f"{path}: no such file")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise HvctlError(f"{path}: not a readable audio file ({_reason(e)})") from None
    with container:
        if not container.streams.audio:
            raise HvctlError(f"{path}: no audio stream found")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        try:
            for frame in container.decode(container.streams.audio[0]):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # the resampler's tail
        except av.FFmpegError as e:
            raise HvctlError(f"{path}: corrupt or truncated audio ({_reason(e)})") from None
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise HvctlError(f"{path}: audio stream has no samples")
    return np.clip(samples.astype(np.float32), -1.0, 1.0)


def read_video(path):
    """Decode every frame of the first video stream: (frames [T,H,W,3] uint8, fps)."""
    path = Path(path)
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        try:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        except av.FFmpegError as e:
            raise HvctlError(f"{path}: corrupt or truncated video ({_reason(e)})") from None
        declared, fps = stream.frames, _fps(stream, path)
    if not frames:
        raise HvctlError(f"{path}: video has zero frames")
    if declared and len(frames) < declared:
        raise HvctlError(f"{path}: truncated video, decoded {len(frames)} of {declared} frames")
    return np.stack(frames), fps


class VideoReader:
    """A video's frames one at a time, for `with`: read_video would hold a whole source in memory,
    and a real source may be an hour long. Opening checks it as hvctl.video does."""

    def __init__(self, path: Path):
        self.path = path
        self.container = _open_input(path)
        try:
            self.stream = _video_stream(self.container, path)
            self.fps = _fps(self.stream, path)
        except BaseException:
            self.container.close()
            raise
        self.width, self.height = self.stream.codec_context.width, self.stream.codec_context.height

    def frames(self):
        try:
            for frame in self.container.decode(self.stream):
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as e:
            raise HvctlError(f"{self.path}: corrupt or truncated video ({_reason(e)})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()


def probe_video(path):
    """Size, frame count and fps without decoding: what the header says (packets are counted where
    it has no frame count). Only read_video notices frames missing from a truncated file."""
    path = Path(path)
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        frames = stream.frames
        if not frames:
            try:
                frames = sum(1 for packet in container.demux(stream) if packet.size)
            except av.FFmpegError as e:
                raise HvctlError(f"{path}: corrupt or truncated video ({_reason(e)})") from None
        if not frames:
            raise HvctlError(f"{path}: video has zero frames")
        ctx = stream.codec_context
        return {"width": ctx.width, "height": ctx.height, "frames": frames, "fps": _fps(stream, path)}


def write_image(path, rgb):
    """Write an RGB uint8 [H,W,3] array as PNG (lossless)."""
    path = Path(path)
    rgb = _checked_rgb(path, rgb, "image")
    # image2pipe writes the one packet as is; image2 would read '%' in the name as a pattern.
    with atomic_output(path) as tmp, av.open(str(tmp), "w", format="image2pipe") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def read_image(path):
    """Decode an image (PNG, JPEG, ... or a video's first frame) to RGB uint8 [H,W,3]."""
    path = Path(path)
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        try:
            frame = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise HvctlError(f"{path}: corrupt or truncated image ({_reason(e)})") from None
        if frame is None:
            raise HvctlError(f"{path}: image has no picture in it")
        return frame.to_ndarray(format="rgb24")


def _checked_rgb(path, array, what):
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise HvctlError(f"{path}: {what} has dtype {array.dtype}, expected uint8")
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise HvctlError(f"{path}: {what} has shape {array.shape}, expected [H,W,3]")
    return np.ascontiguousarray(array)


def _open_input(path):
    if not path.is_file():
        raise HvctlError(f"{path}: no such file")
    try:
        return av.open(str(path))
    except av.FFmpegError as e:
        raise HvctlError(f"{path}: not a readable video or image ({_reason(e)})") from None


def _video_stream(container, path):
    if not container.streams.video:
        raise HvctlError(f"{path}: no video stream found (not a video, or truncated or corrupt)")
    return container.streams.video[0]


def _fps(stream, path):
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise HvctlError(f"{path}: video stream has no frame rate")
    return float(rate)


def _reason(error):
    return getattr(error, "strerror", None) or str(error)
