"""Resume records: what produced an output, written beside it, so ``--resume`` can trust it.

A batch output ``out/case.nii.gz`` gets ``out/.case.nii.gz.medfmsegment.json`` holding the input's
identity (resolved path, size, modification time of every file read), the prompts, the model and
adapter identity, the settings, the library version and the output's own SHA-256. ``--resume``
skips a case only when all of these match now; a reordered input list, changed prompts or
model, or a truncated or replaced output makes the case run again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from .files import atomic_write_text

__all__ = ["record_path", "file_identity", "folder_identity", "output_checksum", "write_record",
           "record_matches", "RECORD_SUFFIX"]

RECORD_SUFFIX = ".medfmsegment.json"


def record_path(output: str | os.PathLike) -> Path:
    """The hidden record file beside an output."""
    output = Path(output)
    return output.with_name(f".{output.name}{RECORD_SUFFIX}")


def file_identity(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """``[{path, size, mtime_ns}]`` of files (resolved through symlinks): cheap, changes on any rewrite."""
    identity = []
    for path in paths:
        real = os.path.realpath(path)
        try:
            stat = os.stat(real)
            identity.append({"path": real, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        except OSError:
            identity.append({"path": real, "size": None, "mtime_ns": None})
    return identity


def folder_identity(folder: str | os.PathLike | None) -> list[dict[str, Any]] | None:
    """:func:`file_identity` of every file in a folder (an adapter), or None."""
    if folder is None:
        return None
    folder = Path(folder)
    if folder.is_file():
        return file_identity([folder])
    return file_identity(sorted(p for p in folder.rglob("*") if p.is_file()))


def output_checksum(path: str | os.PathLike) -> dict[str, Any] | None:
    """``{"sha256", "size"}`` of a file, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return {"sha256": digest.hexdigest(), "size": os.path.getsize(path)}
    except OSError:
        return None


def write_record(output: str | os.PathLike, provenance: dict[str, Any], pending: bool = False) -> Path:
    """Write the record of a just-written ``output`` (``provenance`` plus the output's checksum).

    ``pending=True`` writes it before the output, without a checksum: it claims the path as this
    tool's (so a rerun after a kill may replace it) but never counts as done.
    """
    record = {"provenance": provenance, "output": None if pending else output_checksum(output)}
    return atomic_write_text(record_path(output), json.dumps(record, indent=1, sort_keys=True))


def record_matches(output: str | os.PathLike, provenance: dict[str, Any]) -> bool:
    """Whether ``output`` exists, is intact and was produced from exactly ``provenance``."""
    try:
        record = json.loads(record_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    # Round-trip through JSON so tuples and lists compare equal.
    if record.get("provenance") != json.loads(json.dumps(provenance, sort_keys=True)):
        return False
    checksum = record.get("output")
    return checksum is not None and checksum == output_checksum(output)
