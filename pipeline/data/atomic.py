"""Writing a local file so that a reader, or a rerun after a crash, finds the old file or the new one, never half
of one. One durability rule for every file the project writes this way:

    write NAME.tmp-PID beside NAME, flush and fsync it, rename it over NAME, fsync the folder

The fsync before the rename keeps a power loss from leaving NAME renamed but empty; the folder's fsync makes the
rename itself durable. A process killed before the rename leaves only its NAME.tmp-PID, which a store's next run
removes (pipeline/data/store.py) and which no reader mistakes for NAME.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO

TEMPORARY_INFIX = ".tmp-"


def temporary_name(path: str | os.PathLike) -> str:
    """Where `atomic_file` writes `path` before renaming it into place."""
    return f"{os.fspath(path)}{TEMPORARY_INFIX}{os.getpid()}"


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file opened for writing that becomes `path` (see the module docstring) when the block ends without an
    exception; an exception leaves `path` as it was and removes the temporary file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = temporary_name(path)
    try:
        with open(temporary, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except FileNotFoundError:
            pass
        raise
    fsync_folder(folder)


def atomic_write(path: str | os.PathLike, data: bytes | Iterable[bytes]) -> None:
    """Write `data` (bytes, or parts written in turn, so that a caller need not join them into one copy) to `path`
    atomically and durably."""
    with atomic_file(path) as f:
        f.writelines([data] if isinstance(data, bytes) else data)


def fsync_folder(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
