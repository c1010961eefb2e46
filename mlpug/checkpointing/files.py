"""Crash-safe files: atomic writes and copies, directory fsync, temporary names and their clean-up."""

from __future__ import annotations

import os
from typing import BinaryIO, Callable


def fsync_directory(directory: str) -> None:
    """``fsync`` a directory so that a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: str) -> str:
    """The temporary file ``path`` is written to before the atomic rename: ``<dir>/.<name>.tmp-<pid>``."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that a crash at any moment leaves the old or the new complete file at ``path``.

    ``write(file)`` writes the bytes to a temporary file, which is flushed, fsync'ed and renamed to ``path``;
    then the directory is fsync'ed. On an error the temporary file is removed and the error re-raised.

    Args:
        path: Target file path; its directory is created when missing.
        write: Function that writes the content to the binary file object it receives.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise
    fsync_directory(os.path.dirname(path))


def atomic_link_or_copy(source: str, target: str) -> None:
    """Make ``target`` a crash-safe copy of the complete file ``source`` (a hard link where possible)."""
    temporary = temporary_path(target)
    try:
        if os.path.exists(temporary):
            os.remove(temporary)
        try:
            os.link(source, temporary)
        except OSError:
            with open(source, "rb") as source_file, open(temporary, "wb") as file:
                while chunk := source_file.read(1 << 24):
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise
    fsync_directory(os.path.dirname(os.path.abspath(target)))


def remove_stale_temporary_files(directory: str, prefix: str) -> list:
    """Remove ``.<prefix>*.tmp-<pid>`` files left by killed processes (pid no longer running); return them."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        if not name.startswith(f".{prefix}") or ".tmp-" not in name:
            continue
        pid_text = name.rsplit(".tmp-", 1)[1]
        if not pid_text.isdigit() or _process_exists(int(pid_text)):
            continue
        try:
            os.remove(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
