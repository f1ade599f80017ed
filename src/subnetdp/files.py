"""Writing run files: whole or not at all, and never outside the run's folder.

Every file a run writes (checkpoints, metrics, the config, the plan, the summary, the models) goes
through :func:`atomic_write`.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


class RunFileError(OSError):
    """A run file could not be written (e.g. a full disk); the message names the path."""


def atomic_write(path: str | Path, data: bytes | str | Callable[[Any], None]) -> Path:
    """Write ``path`` whole or not at all: the one way a run writes a file.

    ``data`` is bytes, text, or a function that writes into a binary file object. The bytes go to a
    temporary file in the same folder (so the rename cannot cross file systems), are fsynced, and
    the temporary is renamed over ``path``; on any failure it is removed. The temporary has an
    unpredictable name and is created with ``O_EXCL | O_NOFOLLOW`` (as ``mkstemp`` does), so a file or
    symbolic link planted in the folder is never opened, and the rename replaces a link at ``path``
    rather than writing where it points: nothing outside the folder is written. Files are created with
    mode 0666 minus the umask, like any ``open(..., "w")``, so every run file has the same
    permissions. A full disk raises :class:`RunFileError` naming the path.
    """
    path = Path(path)
    tmp, fd = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunFileError(e.errno, f"cannot write {path}: no space left on the device; free space "
                                        "or choose another --out") from None
        raise
    _fsync_dir(path.parent)
    return path


def _new_temp(path: Path) -> tuple[Path, int]:
    """A fresh temporary beside ``path``: a random name, created exclusively, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:  # a planted name, or a one-in-2**64 collision: draw another
            continue


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (the directory entry), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
