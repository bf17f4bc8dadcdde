"""File helpers shared by the whole package: a streamed sha256 and the one crash-safe writer.

Standard library only, and nothing from the package: the image's assets stage runs streamkv/fetch.py with
just streamkv/__init__.py, fetch.py and this file copied in (see the Dockerfile).
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_at", "sha256_file"]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (model weights are several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` by `data` so that a crash leaves either the old file or the new one, never a part
    (atomic_write_at in the path's directory, made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        atomic_write_at(dir_fd, path.name, data, where=path)
    finally:
        os.close(dir_fd)


def atomic_write_at(dir_fd: int, name: str, data: bytes, *, where: Path | None = None) -> None:
    """Replace the file `name` of the directory `dir_fd` by `data`, atomically.

    A temp file in the same directory (created with O_EXCL and O_NOFOLLOW: never an existing file or a
    link) is written, fsynced and renamed over `name`, then the directory is fsynced so that the rename
    survives a power cut too. The temp file is removed if anything fails. What is there under `name` must be
    a regular file or nothing: a link, FIFO or device node is never replaced (OSError naming it, `where`).
    The result is 0644 whatever the umask: results and generated files are shared (and written by a --user
    container).
    """
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(mode):
            raise OSError(errno.EEXIST, f"{where or name} is not a regular file (a link, FIFO or device node): "
                          "never replaced")
    while True:
        tmp = f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    try:
        os.fchmod(fd, 0o644)   # created 0600, as mkstemp does, until it is whole
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise
    os.fsync(dir_fd)
