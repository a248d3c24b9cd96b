"""Atomic file output: the one place where hvctl writes a file.

Every writer goes through `atomic_output`: it writes a temporary file next to the target, fsyncs
it and renames it over the target, so a reader never sees a partial file and a crash leaves the
old file intact.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path):
    """Yield a temporary path next to `path`; on success it replaces `path`, on failure it is removed.

    The temporary name keeps the target's suffix (`.{name}.tmp-{pid}{suffix}`) so that tools which
    pick a format from the extension (ffmpeg) still do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        # Some writers (safetensors) create 0600 files; a cache or model folder is shared like any file.
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory):
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path, text):
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path, obj):
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
