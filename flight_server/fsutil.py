"""Durable writes: every file the server keeps (consumer-group commits, stream state, run files
made from live streams, keys, the users file) is written through here.

A file is written as a hidden, uniquely named sibling, synced, renamed over its name, and then
its directory is synced, so that after a crash or a power cut the file holds its old content or
its new content, never a mix, and a rename that was reported done is not undone. The temporary
sibling's name matches no run-file pattern, so the catalog never lists one left by a crash.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import h5py


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: so that the names in it survive a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


@contextmanager
def atomic_file(path: Path, mode: int = 0o644, exclusive: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; it replaces `path` when the block
    ends without an error (and is removed when it does not). `exclusive`: fail with
    FileExistsError instead of replacing a file that exists (two servers starting at once must
    not end up with different keys)."""
    path = Path(path)
    tmp = _sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, path, exclusive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes, mode: int = 0o644, exclusive: bool = False) -> None:
    """Write `data` as `path`'s whole content, atomically and durably (see `atomic_file`)."""
    with atomic_file(path, mode, exclusive) as fh:
        fh.write(data)


@contextmanager
def atomic_h5(path: Path) -> Iterator[h5py.File]:
    """An HDF5 file that becomes `path` when the block ends without an error: readers see the
    whole file or none, even after a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    try:
        with h5py.File(tmp, "w-") as f:
            yield f
        fsync_path(tmp)
        publish(tmp, path, exclusive=False)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(tmp: Path, path: Path, exclusive: bool) -> None:
    if exclusive:
        os.link(tmp, path)  # fails if `path` exists; never a half-written `path`
        tmp.unlink()
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)
