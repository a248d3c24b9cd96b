"""What every stage agrees on about media: the default buckets, the frame counts a causal VAE
encodes, the audio sample rate, the file suffixes read as videos and images. Free of heavy
imports: the CLI's checks and the toy world read it."""

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# The default aspect (height, width) and duration buckets of curate, encode and training. They are
# the toy world's sizes, on which the embedded default model is trained; a recipe for real footage
# sets its own (aspect_buckets, frame_buckets).
ASPECT_BUCKETS = [(64, 64), (64, 96), (96, 64)]
DURATION_BUCKETS = [9, 17, 33]

AUDIO_RATE = 16000  # Hz, mono: what the audio encoders read, the toy world renders and the mp4 carries


def is_frame_count(frames: int, image: bool = False) -> bool:
    """Whether a video of `frames` frames fits the causal VAE: 4k+1, k >= 1 (its first latent frame
    encodes one frame, each later one four); with image=True, a single frame too."""
    return (frames == 1 and image) or (frames >= 5 and (frames - 1) % 4 == 0)
