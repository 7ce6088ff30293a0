"""Atomic file writes: a file appears under its final name whole or not at all.

Every writer in the project goes through here. The body writes to a hidden temporary name
in the final file's folder (same filesystem, so the rename cannot turn into a copy), and
only a body that returns normally gets its file renamed into place with :func:`os.replace`.
A body that raises, or a process killed half way, leaves the old file (or no file) under
the final name; the temporary is removed on the way out of an exception.

Temporary names are ``.<name>.tmp-<pid>-<random>``: hidden, so folder listings that skip
dot files never count one, and unique per process and call, so concurrent writers of one
name never write into each other's file (the last rename wins, each rename a whole file).

Pure library: no Dagster import, cheap to import (sensors use it).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"  # in every temporary name: a sweep of leftovers from killed processes can match it


def temp_name(final: str | os.PathLike[str]) -> Path:
    """A fresh temporary path beside ``final`` (nothing is created)."""
    final = Path(final)
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def temp_beside(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` and remove whatever is left there afterwards.

    For writers that put the file in place themselves (a hardlink that must not overwrite,
    for instance); most want :func:`atomic_path`.
    """
    tmp = temp_name(final)
    try:
        yield tmp
    finally:
        # unlink, not exists(): a dangling symlink made by the body does not "exist" but must go
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(
    final: str | os.PathLike[str], *, fsync: bool = True, make_parents: bool = True
) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the body succeeds.

    The body creates the file (or a symlink) at the yielded path with any writer that takes a
    path. ``fsync`` flushes the file's bytes to disk before the rename makes them visible, so
    a power cut cannot leave an empty file under the final name; writers of many small files
    that are rebuilt anyway (thumbnails) turn it off. A symlink is not synced (there are no
    bytes of its own to flush). The folder itself is not synced: see :func:`fsync_dir`.
    """
    final = Path(final)
    if make_parents:
        final.parent.mkdir(parents=True, exist_ok=True)
    with temp_beside(final) as tmp:
        yield tmp
        if fsync and not tmp.is_symlink():
            fsync_file(tmp)
        tmp.replace(final)  # os.replace: atomic on POSIX, overwrites on Windows too


def write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", fsync: bool = True
) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 unless told otherwise); returns the path."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding=encoding)
    return path


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], Any], *, fsync: bool = True) -> Path:
    """Write ``path`` atomically through ``writer(tmp_path)`` (parquet, savefig, Image.save...)."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        writer(tmp)
    return path


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's bytes to disk (read-only open: fsync needs no write access on POSIX)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in ``folder`` durable (a no-op where the filesystem cannot)."""
    with contextlib.suppress(OSError):  # some filesystems (and Windows) cannot fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = [
    "TEMP_MARK",
    "atomic_path",
    "fsync_dir",
    "fsync_file",
    "temp_beside",
    "temp_name",
    "write_bytes",
    "write_text",
    "write_with",
]
