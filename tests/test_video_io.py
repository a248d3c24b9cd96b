import json

import av
import numpy as np
import pytest

from hvctl.errors import HvctlError
from hvctl.io import atomic_output, write_json_atomic, write_text_atomic
from hvctl.toy.world import render, sample_spec
from hvctl.video import (
    probe_video, read_image, read_video, write_image, write_video,
)


@pytest.fixture
def toy_video():
    return render(sample_spec(0, 1, "train", size=(64, 96), frames=9))


def leftovers(directory):
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name]


def test_mp4_round_trip(tmp_path, toy_video):
    path = write_video(tmp_path / "a.mp4", toy_video, fps=8)
    frames, fps = read_video(path)
    assert frames.shape == (9, 64, 96, 3) and frames.dtype == np.uint8 and fps == 8.0
    assert np.abs(frames.astype(int) - toy_video).mean() < 2.0
    assert probe_video(path) == {"width": 96, "height": 64, "frames": 9, "fps": 8.0}
    assert leftovers(tmp_path) == []


def test_frames_may_come_from_an_iterable(tmp_path, toy_video):
    write_video(tmp_path / "a.mp4", iter(list(toy_video)), fps=29.97)
    assert probe_video(tmp_path / "a.mp4")["fps"] == pytest.approx(29.97)


def test_audio_is_muxed_as_aac(tmp_path, toy_video):
    rate = 16000
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate * 9 // 8) / rate)
    path = write_video(tmp_path / "a.mp4", toy_video, fps=8, audio=(tone, rate))
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac" and audio.rate == rate and audio.channels == 1
        samples = np.concatenate([f.to_ndarray() for f in container.decode(audio)], axis=1)
    assert samples.shape[1] >= tone.size and np.abs(samples).max() == pytest.approx(0.5, abs=0.05)
    assert read_video(path)[0].shape == toy_video.shape


def test_bad_audio_is_refused(tmp_path, toy_video):
    for audio, reason in [((np.zeros((2, 100)), 16000), "mono samples"), ((np.zeros(100), 0), "sample rate")]:
        with pytest.raises(HvctlError, match=reason):
            write_video(tmp_path / "a.mp4", toy_video, fps=8, audio=audio)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("frames, reason", [
    (np.zeros((3, 63, 64, 3), np.uint8), "even width and height"),
    (np.zeros((3, 64, 64, 3), np.float32), "dtype float32"),
    (np.zeros((3, 64, 64, 4), np.uint8), "shape"),
    (np.zeros((64, 64, 3), np.uint8), r"\[T,H,W,3\]"),
    (np.zeros((0, 64, 64, 3), np.uint8), "no frames"),
])
def test_bad_frames_are_refused(tmp_path, frames, reason):
    with pytest.raises(HvctlError, match=reason) as error:
        write_video(tmp_path / "bad.mp4", frames, fps=8)
    assert str(tmp_path / "bad.mp4") in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_the_old_file_intact(tmp_path, toy_video):
    path = write_video(tmp_path / "a.mp4", toy_video, fps=8)
    before = path.read_bytes()

    def third_frame_is_bad():
        yield toy_video[0]
        yield toy_video[1]
        yield toy_video[2].astype(np.float32)

    def source_crashes():
        yield toy_video[0]
        raise RuntimeError("source died")

    with pytest.raises(HvctlError, match="frame 2 has dtype float32"):
        write_video(path, third_frame_is_bad(), fps=8)
    with pytest.raises(RuntimeError):
        write_video(path, source_crashes(), fps=8)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_missing_file(tmp_path):
    for read in (read_video, probe_video, read_image):
        with pytest.raises(HvctlError, match="no such file") as error:
            read(tmp_path / "nope.mp4")
        assert "nope.mp4" in str(error.value)


def test_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    for read in (read_video, probe_video, read_image):
        with pytest.raises(HvctlError, match="not a readable video") as error:
            read(path)
        assert str(path) in str(error.value)


def write_raw_mp4(path, frames, faststart):
    with av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path.read_bytes()


def test_truncated_video_without_its_index(tmp_path, toy_video):
    # By default the mp4 index (moov) comes last: a cut file has frame data but no index.
    data = write_raw_mp4(tmp_path / "full.mp4", toy_video, faststart=False)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    for read in (read_video, probe_video):
        with pytest.raises(HvctlError, match="no video stream found") as error:
            read(cut)
        assert str(cut) in str(error.value)


@pytest.mark.parametrize("cut_inside_a_frame", [False, True])
def test_truncated_video_with_its_index_first(tmp_path, toy_video, cut_inside_a_frame):
    # With faststart the index comes first: a cut file promises frames it lacks.
    data = write_raw_mp4(tmp_path / "full.mp4", toy_video, faststart=True)
    with av.open(str(tmp_path / "full.mp4")) as container:
        offsets = sorted(packet.pos for packet in container.demux(video=0) if packet.size)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: offsets[0] + 100] if cut_inside_a_frame else data[: offsets[5]])
    with pytest.raises(HvctlError, match="corrupt or truncated video|decoded 5 of 9 frames") as error:
        read_video(cut)
    assert str(cut) in str(error.value)


def test_zero_frame_video(tmp_path):
    path = tmp_path / "empty.avi"  # mp4 drops a track without samples; avi keeps it
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height = 64, 64
        container.start_encoding()
    for read in (read_video, probe_video):
        with pytest.raises(HvctlError, match="zero frames") as error:
            read(path)
        assert str(path) in str(error.value)


def test_png_round_trip_is_exact(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    path = write_image(tmp_path / "100%.png", rgb)  # '%' would be a pattern to ffmpeg's image2
    assert np.array_equal(read_image(path), rgb)
    with pytest.raises(HvctlError, match="dtype"):
        write_image(tmp_path / "x.png", rgb.astype(np.int64))


def test_corrupt_png(tmp_path):
    path = write_image(tmp_path / "a.png", np.zeros((16, 16, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(HvctlError) as error:
        read_image(path)
    assert str(path) in str(error.value)


def test_text_and_json_writers_are_atomic(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "a.json", {"b": [1, 2], "é": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": [1, 2], "é": "ü"}
    write_text_atomic(path, "old")
    with pytest.raises(ZeroDivisionError):
        with atomic_output(path) as tmp:
            tmp.write_text("half written")
            1 / 0
    assert path.read_text() == "old"
    assert leftovers(path.parent) == []


def test_the_frames_given_to_the_encoder_have_no_uninitialised_padding():
    # 48 pixels wide: chroma rows of 24 in lines of 32, whose last 8 bytes x264 reads
    from hvctl.video import _yuv_frame

    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    frame = _yuv_frame(rgb)
    padded = [p for p in frame.planes if p.line_size > p.width]
    assert padded, "no plane with row padding: the test no longer covers the case"
    for plane in padded:
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        assert not rows[:, plane.width:].any()
    assert np.array_equal(frame.to_ndarray(format="rgb24"),
                          av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray(format="rgb24"))
