"""Adapters as zip archives, so they travel to and from a service as bodies, never as paths.

An archive holds exactly an adapter folder's two files (``adapter.safetensors``,
``metadata.json``; see :mod:`MedFMSegmentLib.finetune.adapters`). Unpacking checks the names,
the sizes and the metadata's JSON before anything is written, then moves a complete folder into
place, so a bad archive leaves nothing behind. Standard library only (the client uses it).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

__all__ = ["ADAPTER_FILES", "ArchiveError", "pack_adapter", "read_adapter_archive", "unpack_adapter"]

#: The files of an adapter folder (the names ``MedFMSegmentLib.finetune.adapters`` writes).
ADAPTER_FILES = ("adapter.safetensors", "metadata.json")


class ArchiveError(ValueError):
    """An archive that is not an adapter: one line saying why."""


def pack_adapter(folder: str | os.PathLike) -> bytes:
    """The zip archive of the adapter folder ``folder``."""
    folder = Path(folder)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise ArchiveError(f"{folder.name} is not an adapter folder (no {missing[0]})")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ADAPTER_FILES:
            archive.write(folder / name, name)
    return buffer.getvalue()


def read_adapter_archive(data: bytes, max_bytes: int = 1 << 30) -> tuple[dict[str, bytes], dict]:
    """``({file name: bytes}, metadata)`` of the adapter archive ``data``, checked as
    :func:`unpack_adapter` checks it (nothing is written)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ArchiveError(f"not a zip archive: {exc}") from None
    if sorted(entries) != sorted(ADAPTER_FILES):
        raise ArchiveError(f"an adapter archive holds exactly {' and '.join(ADAPTER_FILES)}")
    if any(info.file_size > max_bytes for info in entries.values()):
        raise ArchiveError(f"an adapter file is over the limit of {max_bytes} bytes")
    try:
        contents = {name: archive.read(name) for name in ADAPTER_FILES}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ArchiveError(f"damaged archive: {exc}") from None
    try:
        metadata = json.loads(contents["metadata.json"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"metadata.json is not valid JSON: {exc}") from None
    if not isinstance(metadata, dict):
        raise ArchiveError("metadata.json is not a JSON object")
    return contents, metadata


def unpack_adapter(data: bytes, folder: str | os.PathLike, max_bytes: int = 1 << 30) -> Path:
    """Write the adapter in archive ``data`` as the new folder ``folder``, atomically.

    Raises:
        ArchiveError: Not a zip of exactly the adapter files, a file over ``max_bytes``, metadata
            that is not a JSON object, or ``folder`` existing already (it is never replaced).
    """
    folder = Path(folder)
    if folder.exists():
        raise ArchiveError(f"adapter {folder.name!r} exists (choose another name)")
    contents, _ = read_adapter_archive(data, max_bytes)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, content in contents.items():
            (tmp / name).write_bytes(content)
        os.chmod(tmp, 0o755)
        os.rename(tmp, folder)  # fails, leaving it as it was, if the folder appeared meanwhile
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise ArchiveError(f"adapter {folder.name!r} exists (choose another name)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
