"""Durable files: what the chunk spool, the journal and a site's job records are made of.

Everything written here survives a crash once the call returns: data is fsynced, and so is
the directory whenever a file is created or renamed into place.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from pathlib import Path

_READ_BLOCK = 8 * 1024 * 1024


NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Write errors that mean the disk cannot grow (full, a quota, a file-size limit): not a
fault of the message being written, so nothing received is given up for them."""


def fsync_directory(directory: Path) -> None:
    """fsync a directory so that renames and new files in it are durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes | memoryview) -> None:
    """Write (create or truncate) ``path`` and fsync it; its directory entry is the caller's."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path``: a reader sees the old or the new content, never a torn one."""
    temp = path.with_name(path.name + ".tmp")
    write_file(temp, data)
    temp.replace(path)
    fsync_directory(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line durably (data and size; not the modification time)."""
    new = not path.exists()
    with path.open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fdatasync(f.fileno())
    if new:
        fsync_directory(path.parent)


def file_digest(path: Path) -> str:
    """sha256 of a file, read in blocks."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK):
            sha.update(block)
    return sha.hexdigest()


def map_file(path: Path) -> mmap.mmap | memoryview:
    """A private, copy-on-write mapping of ``path``: tensors decoded from it are writable and
    share its pages, writes never reach the file, and nothing is read until it is used."""
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return memoryview(b"")  # mmap cannot map an empty file
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
