"""The errors dydit raises for a user's mistake, and the checks that raise them before any work starts.

A :class:`UserError` says what is wrong, where, and how to fix it; the `dydit` command prints its message
as one line and exits non-zero (no traceback: that is kept for bugs, or shown with ``dydit --debug``).
It subclasses ValueError, so Python callers that catch ValueError keep working.
"""
from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path


class DyditError(Exception):
    """Base of the errors whose message is the whole story; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UserError(DyditError, ValueError):
    """A bad option, input or file: the message names it and says how to fix it."""

    exit_code = 2


class WriteError(DyditError):
    """A file could not be written (full disk, read-only or forbidden folder); nothing earlier was replaced."""

    exit_code = 1


class Interrupted(DyditError):
    """SIGINT/SIGTERM stopped a run after it wrote a checkpoint; ``--resume`` continues it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# ---------------------------------------------------------------------------------------------
# option checks (the CLI runs them before loading anything)
# ---------------------------------------------------------------------------------------------


def check_count(option: str, value, allow_none: bool = True) -> None:
    """Counts (steps, batch sizes, sample numbers, limits) are whole numbers ≥ 1."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{option} must be a whole number >= 1, got {value!r}")


def check_finite(option: str, value, minimum: float | None = None) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{option} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{option} must be >= {minimum}, got {value!r}")


def check_device(device: str | None) -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` that this machine has; None is always fine (the default)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__}"
                            f"{' is a CPU build' if torch.version.cuda is None else ''}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"--device {device!r}: expected cpu or cuda")


def check_writable_folder(folder, option: str = "--out") -> None:
    """Creates ``folder`` if needed and proves a file can be written there (then removes it)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
        fd, probe = _mkstemp(folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise write_error(e, folder / ".probe", option=option, what="files there") from None


def check_output_file(path, option: str, suffixes: tuple[str, ...] | None = None) -> None:
    """An output file: a writable folder, not a folder itself, and (optionally) one of ``suffixes``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name{' ending in ' + '/'.join(suffixes) if suffixes else ''}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path}: expected a file ending in {'/'.join(suffixes)}")
    check_writable_folder(path.parent if str(path.parent) else Path("."), option=option)


def _mkstemp(folder: Path):
    import tempfile

    return tempfile.mkstemp(prefix=".dydit-probe.", suffix=".tmp", dir=folder)


# ---------------------------------------------------------------------------------------------
# OS errors as one line: which disk, which folder, what survived
# ---------------------------------------------------------------------------------------------

DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def mount_point(path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def disk_is_full(folder, margin: int = 1 << 20) -> bool:
    """Whether the file system of ``folder`` has less than ``margin`` bytes free."""
    try:
        return shutil.disk_usage(mount_point(folder)).free < margin
    except OSError:
        return False


def write_error(e: BaseException, path, option: str | None = None, kept: str | None = None,
                what: str | None = None) -> WriteError:
    """A WriteError for a failed write of ``path``; ``kept`` says what is intact (default: the old file),
    ``what`` names what was being written (default: the file's name)."""
    path = Path(path)
    what = what or path.name
    folder = path.parent
    code = getattr(e, "errno", None)
    where = f"{folder} (disk {mount_point(folder)})"
    intact = kept or (f"the previous {path.name} there is intact" if path.exists() else "nothing was written")
    if code in DISK_FULL or (code is None and disk_is_full(folder)):
        try:
            free = shutil.disk_usage(mount_point(folder)).free
        except OSError:
            free = 0
        msg = (f"no space left on the disk holding {where}, {free / 2**20:.1f} MiB free, while writing {what}; "
               f"{intact}. Free some space, then rerun")
    elif code in NOT_WRITABLE:
        reason = "is read-only" if code == errno.EROFS else "is not writable (permission denied)"
        msg = (f"{where} {reason}: cannot write {what}; {intact}. Choose another "
               f"{option or 'output folder'} or make it writable")
    elif code == errno.ENOTDIR or isinstance(e, NotADirectoryError):
        msg = f"{folder}: a path component is a file, not a folder; choose another {option or 'output folder'}"
    else:
        msg = f"cannot write {path}: {getattr(e, 'strerror', None) or e}; {intact}"
    err = WriteError(msg)
    err.code, err.path = code, path
    return err


def one_line(error: BaseException) -> str:
    """The message of an error as one line (multi-line messages are joined)."""
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, DyditError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    return " ".join(text.split())
