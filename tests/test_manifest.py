import json

import numpy as np
import pytest

from hvctl.data.buckets import BucketConfig, assign_bucket, fit_to_bucket
from hvctl.data.manifest import ManifestRecord, iter_manifest, read_manifest, write_manifest
from hvctl.errors import HvctlError

VIDEO = {"id": "v1", "media": "media/v1.mp4", "kind": "video", "width": 96, "height": 64, "frames": 17, "fps": 8.0}
IMAGE = {"id": "i1", "media": "media/i1.png", "kind": "image", "width": 64, "height": 64, "frames": 1}


def write_lines(path, *objects):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects))
    return path


def test_round_trip_keeps_unknown_keys(tmp_path):
    later_stages = {"clarity": 153.2, "audio": "audio/v1.wav", "scores": {"ocr": 0.0, "motion": [1, 2]}}
    manifest = write_lines(tmp_path / "in.jsonl", {**VIDEO, "caption": {"short_description": "x"}, "split": "train",
                                                   **later_stages}, "", IMAGE)
    records = read_manifest(manifest)
    assert [r.id for r in records] == ["v1", "i1"]
    assert records[0].extra == later_stages and records[0].caption == {"short_description": "x"}
    assert (records[1].fps, records[1].caption, records[1].split, records[1].extra) == (None, None, None, {})
    assert records[0].media_path(tmp_path) == tmp_path / "media" / "v1.mp4"

    out = write_manifest(tmp_path / "out.jsonl", records)
    first = json.loads(out.read_text().splitlines()[0])
    assert first["clarity"] == 153.2 and first["scores"] == later_stages["scores"] and "extra" not in first
    assert read_manifest(out) == records
    assert write_manifest(tmp_path / "again.jsonl", read_manifest(out)).read_text() == out.read_text()


@pytest.mark.parametrize("line, reason", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({k: v for k, v in VIDEO.items() if k != "media"}, "missing field media"),
    ({**VIDEO, "width": "96"}, "width must be a positive integer"),
    ({**VIDEO, "frames": True}, "frames must be a positive integer"),
    ({**VIDEO, "kind": "audio"}, "kind must be image or video"),
    ({**VIDEO, "frames": 16}, "4k\\+1 frames"),
    ({**IMAGE, "frames": 5}, "an image has 1 frame"),
    ({**VIDEO, "fps": None}, "fps must be a positive number"),
    ({**VIDEO, "caption": "a red circle"}, "caption must be a JSON object"),
    ({**VIDEO, "split": "val"}, "split must be train, eval or null"),
    ({**VIDEO, "id": "i1"}, "duplicate id 'i1' \\(first on line 1\\)"),
])
def test_malformed_lines_name_the_line(tmp_path, line, reason):
    manifest = write_lines(tmp_path / "m.jsonl", IMAGE, "", line, VIDEO)
    with pytest.raises(HvctlError, match=reason) as error:
        read_manifest(manifest)
    message = str(error.value)
    assert message.startswith(f"{manifest}:3: ") and "\n" not in message


def test_a_line_that_is_not_utf8(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", IMAGE)
    manifest.write_bytes(manifest.read_bytes() + b'{"id": "\xff"}\n')
    with pytest.raises(HvctlError, match=f"{manifest}:2: .*utf-8"):
        read_manifest(manifest)


def test_on_error_skips_bad_lines(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", IMAGE, "{oops", {**VIDEO, "frames": 2}, VIDEO)
    errors = []
    records = list(iter_manifest(manifest, on_error=errors.append))
    assert [r.id for r in records] == ["i1", "v1"]
    assert [str(e).split(": ")[0] for e in errors] == [f"{manifest}:2", f"{manifest}:3"]


def test_missing_manifest(tmp_path):
    with pytest.raises(HvctlError, match="no such manifest"):
        read_manifest(tmp_path / "nope.jsonl")


def test_write_refuses_what_read_would_refuse(tmp_path):
    good = ManifestRecord.from_dict(VIDEO)
    bad_records = [
        [good, ManifestRecord.from_dict({**IMAGE, "id": "v1"})],
        [ManifestRecord(**{**VIDEO, "frames": 10})],
        [ManifestRecord(**VIDEO, extra={"kind": "image"})],
        [ManifestRecord(**VIDEO, extra={"score": float("nan")})],
        [ManifestRecord(**VIDEO, extra={"array": np.zeros(2)})],
    ]
    for records in bad_records:
        with pytest.raises(HvctlError, match="out.jsonl: record"):
            write_manifest(tmp_path / "out.jsonl", records)
    assert list(tmp_path.iterdir()) == []


def test_assign_bucket_examples():
    cfg = BucketConfig()  # the toy world's: (64,64), (64,96), (96,64) and 9, 17, 33 frames
    assert assign_bucket(1920, 1080, 129, cfg) == (64, 96, 33)  # landscape 16:9
    assert assign_bucket(1080, 1920, 20, cfg) == (96, 64, 17)  # portrait
    assert assign_bucket(500, 480, 9, cfg) == (64, 64, 9)  # near square
    assert assign_bucket(640, 480, 1, cfg) == (64, 96, 1)  # an image: 4:3 is nearer 3:2 than 1:1
    assert assign_bucket(64, 64, 8, cfg) is None  # shorter than every frame bucket
    tie = BucketConfig(aspect_buckets=[(32, 64), (64, 32)], frame_buckets=[5])
    assert assign_bucket(50, 50, 5, tie) == (32, 64, 5)  # a tie goes to the bucket listed first
    tie.aspect_buckets.reverse()
    assert assign_bucket(50, 50, 5, tie) == (64, 32, 5)


def test_fit_to_bucket_crops_the_centre_and_keeps_the_first_frames():
    frames = np.zeros((20, 64, 128, 3), dtype=np.uint8)
    frames[:, :, :32] = (255, 0, 0)  # the left and right quarters are cropped away
    frames[:, :, 32:96] = (255, 255, 255)
    frames[:, :, 96:] = (0, 0, 255)
    frames[:, 0, 64, 1] = np.arange(20)  # marks each frame's index
    out = fit_to_bucket(frames, (32, 32, 9))
    assert out.shape == (9, 32, 32, 3) and out.dtype == np.uint8
    assert (out[:, 1:, :, 0] == 255).all() and (out[:, 1:] > 200).all()
    assert np.argsort(out[:, 0, :, 1].mean(axis=1)).tolist() == list(range(9))
    same = frames[:, :, 32:96]
    assert np.array_equal(fit_to_bucket(same, (64, 64, 20)), same)
    with pytest.raises(HvctlError, match="cannot fill a 33-frame bucket"):
        fit_to_bucket(frames, (64, 64, 33))
