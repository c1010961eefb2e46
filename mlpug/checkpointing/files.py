"""Crash-safe files: atomic writes and copies, directory fsync, temporary names and their clean-up.

The write protocol (:func:`atomic_write_path`, used by every saver and by :func:`atomic_write` and
:func:`atomic_link_or_copy`): the content goes to a temporary file in a directory of
this process inside the target's directory (``.mlpug.tmp-<pid>/<name>``, see :func:`temporary_path`; safetensors'
own temporary files land there too), which is closed (flushed), ``fsync``'ed, renamed over
the target with ``os.replace`` (atomic on POSIX), and then the directory is ``fsync``'ed. A process killed at
any moment leaves the previous complete file or the new complete file at the target, never a partial one; on
an error the temporary file is removed and a :class:`CheckpointWriteError` names the file (and, for a full disk,
says "no space left on device"). Temporary files of killed processes are removed by
:func:`remove_stale_temporary_files`.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from typing import BinaryIO, Optional


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written; the file at that path is unchanged (a previous checkpoint is kept).

    Its ``errno`` is that of the cause (``errno.ENOSPC`` for a full disk, None when unknown); the cause is chained.

    Attributes:
        path: The file that could not be written (None when not known).
    """

    path: Optional[str] = None


def write_error(path: str, error: OSError) -> CheckpointWriteError:
    """The :class:`CheckpointWriteError` for ``error``, raised while writing ``path``.

    Args:
        path: The file being written (the target, not its temporary file).
        error: What the write, ``fsync`` or the rename raised.

    Returns:
        An error naming ``path`` and the reason (``"no space left on device"`` for ``ENOSPC``), with the cause's
        ``errno``.
    """
    if error.errno == errno.ENOSPC:
        reason = "no space left on device; free disk space, or give a checkpoints_path on another disk"
    else:
        reason = error.strerror or str(error) or type(error).__name__
    message = f"cannot write checkpoint file {path}: {reason} (the file at that path is unchanged)"
    result = CheckpointWriteError(error.errno, message) if error.errno is not None else CheckpointWriteError(message)
    result.path = path
    return result


def fsync_directory(directory: str) -> None:
    """``fsync`` a directory so that a rename inside it survives a power loss (no-op where unsupported).

    Args:
        directory: The directory of the renamed file.
    """
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


TEMPORARY_DIRECTORY_PREFIX = ".mlpug.tmp-"


def temporary_path(path: str) -> str:
    """The temporary file ``path`` is written to before the atomic rename: ``<dir>/.mlpug.tmp-<pid>/<name>``.

    The per-process directory (on the target's file system, so the rename stays atomic) also holds what a writer
    creates next to its file (safetensors writes through a ``.tmpXXXXXX`` file of its own), so that the
    temporary files of a killed process are found by its pid (:func:`remove_stale_temporary_files`).
    """
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f"{TEMPORARY_DIRECTORY_PREFIX}{os.getpid()}", name)


def fsync_file(path: str) -> None:
    """``fsync`` the file at ``path``, so that its content (written and closed by someone else) is on disk.

    On Linux ``fsync`` of any descriptor of a file writes all of the file's dirty pages, so the file need not be
    the descriptor it was written through.

    Args:
        path: A complete, closed file.

    Raises:
        OSError: The file cannot be opened or ``fsync`` fails (e.g. an I/O error of the disk).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_path(path: str, write: Callable[[str], None]) -> None:
    """Create a file through a function that writes to a path, so that a crash leaves the old or the new file.

    ``write(temporary)`` creates the complete file at the temporary path (:func:`temporary_path`) and closes it;
    the file is then ``fsync``'ed, renamed to ``path`` with ``os.replace`` and the directory is ``fsync``'ed.
    This is the protocol of every checkpoint write (``safetensors``' ``save_file`` writes to a path).

    Args:
        path: Target file path; its directory is created when missing.
        write: Function that writes the complete content to the path it receives.

    Raises:
        CheckpointWriteError: Creating the directory, ``write``, ``fsync`` or the rename raised an ``OSError``
            (chained); the temporary file is removed first and ``path`` is unchanged.
        BaseException: Whatever else ``write`` raised, after the same clean-up.
    """
    path = os.path.abspath(path)
    temporary = temporary_path(path)
    try:
        os.makedirs(os.path.dirname(temporary), exist_ok=True)
        write(temporary)
        fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        try:
            os.remove(temporary)
        except OSError:
            pass
        if isinstance(error, OSError) and not isinstance(error, CheckpointWriteError):
            raise write_error(path, error) from error
        raise
    fsync_directory(os.path.dirname(path))


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through an open binary file object, crash-safely (see :func:`atomic_write_path`).

    Args:
        path: Target file path; its directory is created when missing.
        write: Function that writes the content to the binary file object it receives.
    """

    def write_file(temporary: str) -> None:
        with open(temporary, "wb") as file:
            write(file)

    atomic_write_path(path, write_file)


def atomic_link_or_copy(source: str, target: str) -> None:
    """Make ``target`` a crash-safe copy of the complete file ``source`` (a hard link where possible).

    Args:
        source: An existing complete file.
        target: The path of the copy (written with :func:`atomic_write_path`).
    """

    def link_or_copy(temporary: str) -> None:
        if os.path.exists(temporary):
            os.remove(temporary)
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)

    atomic_write_path(target, link_or_copy)


def remove_stale_temporary_files(directory: str, prefix: str, including_own: bool = False) -> list:
    """Remove the temporary directories ``.mlpug.tmp-<pid>`` (see :func:`temporary_path`) and the temporary
    files ``.<prefix>*.tmp-<pid>`` (of earlier versions) left by killed processes (pid no longer running).

    Args:
        directory: The checkpoint directory (a missing one has nothing to remove).
        prefix: The base name of the files, e.g. ``base_checkpoint_filename``.
        including_own: Also remove this process's own temporary files (at the end of its run, when no write is
            in progress any more).

    Returns:
        The names of the removed files.
    """
    removed: list[str] = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        is_directory = name.startswith(TEMPORARY_DIRECTORY_PREFIX)
        if not is_directory and (not name.startswith(f".{prefix}") or ".tmp-" not in name):
            continue
        pid_text = name.rsplit(".tmp-", 1)[1]
        if not pid_text.isdigit():
            continue
        if _process_exists(int(pid_text)) and not (including_own and int(pid_text) == os.getpid()):
            continue
        try:
            target = os.path.join(directory, name)
            if is_directory:
                shutil.rmtree(target)
            else:
                os.remove(target)
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
