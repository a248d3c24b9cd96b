"""File output, in one place: where hvctl checks an output path and writes a file.

Every writer goes through `atomic_output`: it writes a temporary file next to the target, fsyncs
it and renames it over the target, so a reader never sees a partial file and a crash leaves the
old file intact. A full or read-only disk becomes one HvctlError naming the path (`disk_errors`),
and `check_output_file` / `check_output_dir` / `check_not_input` refuse an unusable output before
any work starts.
"""

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

from hvctl.errors import HvctlError

# Errors of the disk rather than of hvctl: reported as one line, never as a traceback.
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
               errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large", errno.EACCES: "permission denied"}
# Libraries that wrap the OS error in their own type (safetensors, PyAV, torch) keep its text.
_DISK_TEXTS = {"no space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC, "storagefull": errno.ENOSPC,
               "read-only file system": errno.EROFS, "os error 30": errno.EROFS, "readonlyfilesystem": errno.EROFS}


def disk_problem(path, error: BaseException) -> str | None:
    """Why writing under `path` failed, when the disk is the cause (full, read-only, quota), else None.

    Called before the partial output is removed: a full disk still shows as full then."""
    chain, e = [], error
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return DISK_ERRNOS[e.errno]
    text = " ".join(str(e) for e in chain).lower().replace(" ", "")
    for needle, code in _DISK_TEXTS.items():
        if needle.replace(" ", "") in text:
            return DISK_ERRNOS[code]
    try:
        stat = os.statvfs(_existing_ancestor(Path(path)))
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return DISK_ERRNOS[errno.EROFS]
    if stat.f_bavail == 0:
        return DISK_ERRNOS[errno.ENOSPC]
    return None


@contextmanager
def disk_errors(path, cleanup=None):
    """Turn a failure caused by the disk while writing `path` into one HvctlError naming it;
    `cleanup()` (removing partial output) runs on any failure, after the diagnosis."""
    try:
        yield
    except BaseException as e:
        # Not only Exceptions: torch's CheckpointException is a BaseException.
        ours = isinstance(e, (HvctlError, KeyboardInterrupt, SystemExit, GeneratorExit))
        cause = None if ours else disk_problem(path, e)
        if cleanup is not None:
            cleanup()
        if cause is not None:
            raise HvctlError(f"{path}: cannot write: {cause}") from None
        raise


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_parent(path: Path, flag: str) -> None:
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir():
        raise HvctlError(f"{flag}{path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        raise HvctlError(f"{flag}{path}: cannot write in {parent} ({'read-only file system' if read_only else 'permission denied'})")


def check_output_file(path, flag: str = "") -> Path:
    """Refuse, before any work, a file output that cannot be written: a folder, a path under a
    file, a folder without write permission. `flag` names it in the message (e.g. "--output")."""
    path, flag = Path(path), f"{flag} " if flag else ""
    if path.is_dir():
        raise HvctlError(f"{flag}{path}: is a folder; give a file name")
    _check_parent(path, flag)
    return path


def check_output_dir(path, flag: str = "") -> Path:
    """Refuse, before any work, a folder output that is a file or lies under one, or cannot be written."""
    path, flag = Path(path), f"{flag} " if flag else ""
    if path.exists() and not path.is_dir():
        raise HvctlError(f"{flag}{path}: is a file, not a folder")
    if path.is_dir():
        _check_parent(path / "x", flag)
    else:
        _check_parent(path, flag)
    return path


def check_not_input(out, inputs, flag: str = "") -> None:
    """Refuse an output that is one of the command's inputs: writing it would destroy the input."""
    out = Path(out)
    for source in inputs:
        if source is None:
            continue
        source = Path(source)
        same = os.path.abspath(out) == os.path.abspath(source)
        if not same and out.exists() and source.exists():
            same = os.path.samefile(out, source)
        if same:
            raise HvctlError(f"{f'{flag} ' if flag else ''}{out}: is the input {source}; write the output elsewhere")


@contextmanager
def atomic_output(path):
    """Yield a temporary path next to `path`; on success it replaces `path`, on failure it is removed.

    The temporary name keeps the target's suffix (`.{name}.tmp-{pid}{suffix}`) so that tools which
    pick a format from the extension (ffmpeg) still do.
    """
    path = Path(path)
    if path.is_dir():
        raise HvctlError(f"{path}: is a folder; cannot write a file there")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    with disk_errors(path, cleanup=lambda: tmp.unlink(missing_ok=True)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise HvctlError(f"{path}: {_existing_ancestor(path.parent)} is a file, not a folder") from None
        yield tmp
        # Some writers (safetensors) create 0600 files; a cache or model folder is shared like any file.
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
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
