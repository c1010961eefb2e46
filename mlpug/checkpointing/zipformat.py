"""Zip-format sniffing and checksums (PyTorch's ``torch.save`` layout and NumPy's ``.npz``)."""

from __future__ import annotations

import os
import zipfile

from mlpug.checkpointing.codec import _STRUCTURE_KEY
from mlpug.checkpointing.header import CheckpointError


def sniff_format(path: str) -> str:
    """``"pytorch"``, ``"numpy"`` or ``"unknown"``, from the zip members of a checkpoint file.

    Raises:
        CheckpointError: The file does not exist, is empty, truncated or not a zip archive.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"checkpoint file {path} ({size} bytes) is truncated or corrupt: {error}") from error
    if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        return "pytorch"
    if f"{_STRUCTURE_KEY}.npy" in names:
        return "numpy"
    return "unknown"


def verify_zip_checksums(path: str) -> None:
    """Check the CRC-32 of every member of a zip-format checkpoint (reads the whole file once).

    Raises:
        CheckpointError: A member's bytes do not match its checksum (the file is corrupt), naming the member.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {error}") from error
    if bad_member is not None:
        raise CheckpointError(f"checkpoint file {path} is corrupt: the checksum of {bad_member!r} does not match")
