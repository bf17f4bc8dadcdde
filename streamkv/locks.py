"""Advisory locks on files of a results directory: concurrent stages split the work and never write one
slot at the same time.

A lock is flock(2) on a small lock file. The kernel drops it when its holder exits, `kill -9` included,
so a lock never goes stale and nobody has to guess whether a PID is still alive (Linux NFS clients map
flock onto POSIX byte-range locks, so it also holds between the nodes of a cluster sharing the directory).
The holder writes its host and pid into the file (for people, and for tests that kill it) and unlinks
the file before releasing it, so no lock files pile up; a waiter that locked a file
unlinked meanwhile notices (its inode is no longer the path's) and tries again.

Locks are re-entrant within one process (a stage that holds a slot's lock may call Store.write, which
takes it too): flock would otherwise make a process wait for itself through a second descriptor.

Lock files are opened as streamkv.confined opens everything under the results directory: a link or a FIFO
planted under a lock's name is refused, never followed or opened for writing.

Stdlib only.
"""
from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .confined import Tree

__all__ = ["hold", "holder"]

_held: dict[Path, int] = {}   # lock files this process holds -> nesting depth


def _same_file(fd: int, dir_fd: int, name: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _acquire(tree: Tree, path: Path, wait: bool) -> tuple[int, int] | None:
    """(directory descriptor, descriptor holding the lock on `path`), or None when wait=False and another
    process holds it. The lock file is opened relative to its directory, walked down from the tree's root
    without following links, and must be a regular file (streamkv.confined)."""
    *parents, name = tree.parts(path)
    dir_fd = tree.open_directory(tuple(parents), create=True)
    try:
        while True:
            fd = tree.open_regular(dir_fd, name, path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                os.close(dir_fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, dir_fd, name):
                return dir_fd, fd
            os.close(fd)   # the previous holder unlinked it after we opened it: lock the new file instead
    except BaseException:
        os.close(dir_fd)
        raise


@contextmanager
def hold(path: Path | str, *, wait: bool = True, root: Path | str | None = None) -> Iterator[bool]:
    """Hold the lock file `path` for the block; yields True. With wait=False, yields False at once (and
    holds nothing) when another process holds it. `root`: the directory below which no link is followed
    on the way to `path` (default: its own directory)."""
    path = Path(path).absolute()
    if path in _held:
        _held[path] += 1
        try:
            yield True
        finally:
            _held[path] -= 1
        return
    tree = Tree(Path(root).absolute() if root is not None else path.parent)
    held = _acquire(tree, path, wait)
    if held is None:
        yield False
        return
    dir_fd, fd = held
    try:
        os.ftruncate(fd, 0)   # a holder killed by SIGKILL left its name in the file
        os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
    except OSError:
        pass   # a full disk: the name is for people and tests only; the lock itself holds without it
    _held[path] = 1
    try:
        yield True
    finally:
        del _held[path]
        try:
            if _same_file(fd, dir_fd, path.name):   # while still locked: a waiter re-checks the inode
                os.unlink(path.name, dir_fd=dir_fd)
        finally:
            os.close(fd)
            os.close(dir_fd)


def holder(path: Path | str) -> int | None:
    """The pid on this host that holds the lock file `path`, or None when nobody does (or the holder is on
    another host). Asked from another process: probing takes the lock for an instant when it is free."""
    path = Path(path).absolute()
    try:
        # empty for the instant a new holder writes its name
        fields = Tree(path.parent).read(path, 4096).decode(errors="replace").split()
    except FileNotFoundError:
        return None
    held = _acquire(Tree(path.parent), path, wait=False)
    if held is not None:                     # free: release it as hold() would
        dir_fd, fd = held
        os.unlink(path.name, dir_fd=dir_fd)
        os.close(fd)
        os.close(dir_fd)
        return None
    return int(fields[1]) if len(fields) == 2 and fields[0] == socket.gethostname() else None
