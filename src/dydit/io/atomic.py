"""Crash-safe file writing: write to a temporary file in the same folder, fsync, then rename."""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"  # temp files are ".{name}.XXXXXXXX.tmp" beside their target


def remove_stale_temp_files(folder) -> list[Path]:
    """Removes the temp files that a killed atomic write left in ``folder`` (not recursive); returns them."""
    removed = []
    for f in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if f.is_file():
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path; on success it replaces ``path`` atomically, on error it is removed.

    A write that fails for want of space or permission (torch.save reports a full disk as a RuntimeError)
    raises :class:`dydit.errors.WriteError`, which names the disk and folder; ``path`` itself is untouched.
    """
    from dydit.errors import DISK_FULL, NOT_WRITABLE, disk_is_full, write_error

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise write_error(e, path) from e
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        # mkstemp makes owner-only files, and writers such as safetensors recreate the file: saved
        # models get the ordinary mode the umask gives
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        full = isinstance(e, (OSError, RuntimeError)) and disk_is_full(path.parent)  # judged with tmp still there
        if os.path.exists(tmp):
            os.remove(tmp)
        if full or getattr(e, "errno", None) in DISK_FULL + NOT_WRITABLE:
            raise write_error(e if isinstance(e, OSError) else OSError(errno.ENOSPC, "disk full"), path) from e
        raise


def atomic_torch_save(obj, path):
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
