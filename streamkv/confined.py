"""Files below a directory that others share (the results directory): nothing outside it is ever read,
written or deleted, and nothing there can make a command hang.

results/ may be shared by several users, several nodes of a cluster, or copied from a colleague, so any
entry in it may be a symbolic link, a FIFO or a device node planted where a result, an artifact, a lock or
a temp file is expected. Every operation here therefore starts at the root's descriptor and walks down
with O_NOFOLLOW, one component at a time, then works relative to the directory it reached (`dir_fd`):
- a link below the root is never followed, whether it is a directory on the way or the file itself; it
  is refused in one line naming it and where it points (`Refused`);
- only regular files are read, replaced or removed; a FIFO or device node is checked with lstat before it
  is opened, and opened with O_NONBLOCK and checked again with fstat, so opening one never blocks;
- reads are bounded (MAX_READ_BYTES), and JSON is parsed only up to MAX_JSON_DEPTH levels of nesting
  (deeper documents would end in a RecursionError inside the json module).
The root itself is the user's choice (RESULTS_DIR may be a link to a scratch disk) and is opened as given.

Stdlib only.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .files import atomic_write_at

MAX_READ_BYTES = 64 << 20    # a result JSON is a few kB; a per-token NLL file of 1M tokens is 4 MiB
MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 64          # results nest 5 levels deep
_MAX_WALK_DEPTH = 8          # the deepest slot is paper_experiments/<stage>/<dataset>/<label>.json
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


class Refused(OSError):
    """A link, a special file or an oversized file where a regular file or a directory was expected; its
    message is one line naming it (an OSError, so a write that meets one fails like a full disk)."""

    def __init__(self, message: str):
        super().__init__(errno.EPERM, message)

    def __str__(self) -> str:
        return self.strerror


def kind(mode: int) -> str:
    """What an lstat mode is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "regular file")


def shown(text: str, limit: int = 60) -> str:
    """A value an error quotes: repr'd (no control character reaches the terminal) and at most `limit`
    characters, since it may come from a file or a link that is not ours to print."""
    quoted = repr(text)
    return quoted if len(quoted) <= limit else quoted[:limit] + "...'"


def _json_depth(data: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (brackets inside strings do not count)."""
    brackets = re.sub(rb"[^\[\]{}]+", b"", re.sub(rb'"[^"\\]*(?:\\.[^"\\]*)*"', b"", data, flags=re.S))
    depth = deepest = 0
    for b in brackets:
        depth += 1 if b in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads(data: bytes, where: str):
    """A JSON document of at most MAX_JSON_DEPTH levels; ValueError (one line) otherwise."""
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise ValueError(f"{where}: corrupt JSON (nested more than {MAX_JSON_DEPTH} levels deep)")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: corrupt JSON (not UTF-8: byte {e.object[e.start]:#04x} at offset {e.start})") \
            from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: corrupt JSON ({e})") from None


class Tree:
    """The entries below `root`, reached as the module doc says. Paths given to its methods are the root
    joined with relative parts (as Store.path builds them); other paths are a ValueError."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def parts(self, path: Path | str) -> tuple[str, ...]:
        parts = Path(path).relative_to(self.root).parts
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"{path}: not a path below {self.root}")
        return parts

    def _refusal(self, dir_fd: int, name: str, where: Path, expected: str) -> Refused:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=dir_fd)
            return Refused(f"{where} is a symbolic link (to {shown(target)}): streamkv follows no link under "
                           f"the results directory {self.root}")
        return Refused(f"{where} is a {kind(st.st_mode)}, not a {expected}: streamkv never reads, replaces or "
                       "removes one")

    def _child(self, fd: int, name: str, where: Path, create: bool) -> int:
        try:
            return os.open(name, _DIR, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(where)) from None
            try:
                os.mkdir(name, dir_fd=fd)
            except FileExistsError:
                pass   # made by a concurrent run meanwhile (or a link planted meanwhile: refused below)
            return self._child(fd, name, where, create=False)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            raise self._refusal(fd, name, where, "directory") from None

    def open_directory(self, parts: tuple[str, ...], *, create: bool = False) -> int:
        """A descriptor (the caller closes it) of the directory root/parts, made if `create`."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, name in enumerate(parts):
                child = self._child(fd, name, self.root.joinpath(*parts[:i + 1]), create)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def directory(self, parts: tuple[str, ...], *, create: bool = False) -> Iterator[int]:
        fd = self.open_directory(parts, create=create)
        try:
            yield fd
        finally:
            os.close(fd)

    def lstat(self, path: Path | str) -> os.stat_result | None:
        """The entry's own status (a link's, not its target's), or None when it or its directory is absent."""
        *parents, name = self.parts(path)
        try:
            with self.directory(tuple(parents)) as dir_fd:
                return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def is_file(self, path: Path | str) -> bool:
        """Whether a regular file is there; Refused when something else is (a link, a FIFO, ...)."""
        st = self.lstat(path)
        if st is not None and not stat.S_ISREG(st.st_mode):
            *parents, name = self.parts(path)
            with self.directory(tuple(parents)) as dir_fd:
                raise self._refusal(dir_fd, name, Path(path), "regular file")
        return st is not None

    def open_regular(self, dir_fd: int, name: str, where: Path, flags: int, mode: int = 0o644) -> int:
        """A descriptor of the regular file `name` in `dir_fd` (created with O_CREAT in `flags`); Refused
        for anything else, which is never opened unless it appears between the lstat and the open (then
        O_NONBLOCK keeps the open from blocking and fstat refuses it)."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(where)) from None
        else:
            if not stat.S_ISREG(st.st_mode):
                raise self._refusal(dir_fd, name, where, "regular file")
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise self._refusal(dir_fd, name, where, "regular file") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._refusal(dir_fd, name, where, "regular file")
        return fd

    def read(self, path: Path | str, limit: int = MAX_READ_BYTES) -> bytes:
        """A regular file's bytes; FileNotFoundError when absent, Refused when it is no regular file or is
        larger than `limit`."""
        *parents, name = self.parts(path)
        with self.directory(tuple(parents)) as dir_fd:
            fd = self.open_regular(dir_fd, name, Path(path), os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise Refused(f"{path} is larger than {limit >> 20} MiB: not read")
        return data

    def read_json(self, path: Path | str, limit: int = MAX_JSON_BYTES):
        """A JSON file below the root, bounded in size and depth; OSError as `read`, ValueError when the
        text is no JSON document of at most MAX_JSON_DEPTH levels."""
        return loads(self.read(path, limit), str(path))

    def write(self, path: Path | str, data: bytes) -> None:
        """files.atomic_write below the root: its directories are made as needed, and what is there under
        the name must be a regular file (it is replaced) or nothing."""
        *parents, name = self.parts(path)
        with self.directory(tuple(parents), create=True) as dir_fd:
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                mode = stat.S_IFREG
            if not stat.S_ISREG(mode):
                raise self._refusal(dir_fd, name, Path(path), "regular file")
            atomic_write_at(dir_fd, name, data, where=Path(path))

    def unlink(self, path: Path | str) -> bool:
        """Remove a regular file; anything else (absent, a link, a FIFO, ...) is left alone: False."""
        *parents, name = self.parts(path)
        try:
            with self.directory(tuple(parents)) as dir_fd:
                if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    return False
                os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        return True

    def listing(self, directory: Path | str) -> list[tuple[str, int]]:
        """(name, lstat mode) of each entry of a directory below the root; [] when it is absent."""
        try:
            with self.directory(self.parts(directory)) as dir_fd, os.scandir(dir_fd) as entries:
                return sorted((e.name, e.stat(follow_symlinks=False).st_mode) for e in entries)
        except FileNotFoundError:
            return []

    def walk(self, top: Path | str, _depth: int = 0) -> Iterator[tuple[Path, int]]:
        """(path, lstat mode) of every entry below `top` that is not a directory, links included (never
        followed); directories deeper than any slot are not entered."""
        for name, mode in self.listing(top):
            if stat.S_ISDIR(mode) and _depth < _MAX_WALK_DEPTH:
                try:
                    yield from self.walk(Path(top) / name, _depth + 1)
                except Refused:
                    yield Path(top) / name, stat.S_IFLNK   # swapped for a link while we walked
            elif not stat.S_ISDIR(mode):
                yield Path(top) / name, mode

    def remove_directory(self, directory: Path | str) -> None:
        """Remove the regular files of a directory below the root, then the directory if that emptied it."""
        parts = self.parts(directory)
        try:
            with self.directory(parts) as dir_fd, os.scandir(dir_fd) as entries:
                for entry in list(entries):
                    if entry.is_file(follow_symlinks=False):
                        os.unlink(entry.name, dir_fd=dir_fd)
            with self.directory(parts[:-1]) as parent_fd:
                os.rmdir(parts[-1], dir_fd=parent_fd)
        except (FileNotFoundError, Refused):
            pass
        except OSError as err:
            if err.errno != errno.ENOTEMPTY:
                raise
