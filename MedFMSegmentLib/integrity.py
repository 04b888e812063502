"""Checks that refuse damaged or misleading image files before they are read.

SimpleITK reads a truncated NIfTI with the missing voxels as zeros, coerces a sheared direction
to an orthogonal one, and reads a DICOM series with a missing slice at a stretched spacing; each
gives a wrong label map with no error. These checks turn such files into :class:`InputError`.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError

__all__ = ["check_image_file", "check_orthonormal", "check_voxel_count", "check_finite",
           "check_slice_positions", "stray_dicom_files", "DICOM_SUFFIXES"]

#: File name endings taken as DICOM slices even when they cannot be parsed.
DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
_ORTHONORMAL_TOLERANCE = 1e-4


def check_image_file(path: str | os.PathLike) -> None:
    """Refuse a NIfTI (``.nii``/``.nii.gz``) whose data is shorter than its header says, or sheared.

    A ``.nii.gz`` is decompressed once as a stream (gzip's CRC and length trailer catch damage
    anywhere in it); other formats are left to their readers, which fail on truncation.
    """
    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    if name.endswith(".gz"):
        header, length = _gzip_header_and_length(path)
    else:
        with open(path, "rb") as handle:
            header = handle.read(540)
        length = path.stat().st_size
    info = _nifti_header(header, path)
    if info is None:
        return  # not a NIfTI header: the reader gives the error
    offset, data_bytes, shear = info
    if length < offset + data_bytes:
        raise InputError(f"cannot read image {path}: truncated (its header needs {offset + data_bytes} bytes, "
                         f"the file holds {length})")
    if shear:
        raise InputError(f"{path} has a non-orthonormal (sheared) direction in its sform; resample it to an "
                         "orthonormal grid first (its label map could not lie on the same grid)")


def _gzip_header_and_length(path: Path) -> tuple[bytes, int]:
    length = 0
    header = b""
    try:
        with gzip.open(path, "rb") as stream:
            while block := stream.read(1 << 22):
                if len(header) < 540:
                    header += block[:540 - len(header)]
                length += len(block)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"cannot read image {path}: truncated or damaged gzip stream ({exc})") from None
    return header, length


def _nifti_header(header: bytes, path: Path) -> tuple[int, int, bool] | None:
    """``(vox_offset, data_bytes, sheared_sform)`` of a NIfTI-1/2 header, None if it is not one."""
    if len(header) < 348:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348:
            dim = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            sform_code = struct.unpack(endian + "h", header[254:256])[0]
            srow = np.array(struct.unpack(endian + "12f", header[280:328]), dtype=float).reshape(3, 4)
            shear = sform_code > 0 and _sheared(srow[:, :3])
            break
        if size == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dim = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            shear = False
            break
    else:
        return None
    ndim = int(dim[0])
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 0 for d in dim[1:ndim + 1]):
        raise InputError(f"cannot read image {path}: malformed NIfTI header (dim {list(dim)}, bitpix {bitpix})")
    voxels = int(np.prod([max(int(d), 1) for d in dim[1:ndim + 1]], dtype=object))
    return max(offset, 0), voxels * int(bitpix) // 8, bool(shear)


def _sheared(linear: np.ndarray) -> bool:
    norms = np.linalg.norm(linear, axis=0)
    if np.any(norms <= 0):
        return True
    unit = linear / norms
    return bool(np.abs(unit.T @ unit - np.eye(3)).max() > _ORTHONORMAL_TOLERANCE)


def check_orthonormal(direction: np.ndarray, source: str, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> None:
    """Refuse a direction matrix whose columns are not orthonormal (a sheared grid), or a non-finite grid."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    if not (np.isfinite(direction).all() and np.isfinite(spacing).all() and np.isfinite(origin).all()):
        raise InputError(f"{source} has a non-finite spacing, origin or direction in its header")
    if np.abs(direction.T @ direction - np.eye(3)).max() > _ORTHONORMAL_TOLERANCE:
        raise InputError(f"{source} has a non-orthonormal (sheared) direction matrix; resample it to an "
                         "orthonormal grid first (its label map could not lie on the same grid)")


def check_voxel_count(size: Sequence[int], bytes_per_voxel: int, source: str) -> None:
    """Refuse an image whose header claims more voxels than this machine's memory could hold."""
    voxels = int(np.prod([int(s) for s in size], dtype=object))
    needed = voxels * (bytes_per_voxel + 4)  # the file's pixels plus the float32 copy
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 1 << 36
    if voxels == 0:
        raise InputError(f"{source} has no voxels (size {tuple(size)})")
    if needed > memory:
        raise InputError(f"{source} claims {voxels} voxels (size {tuple(size)}): {needed / 2**30:.1f} GiB "
                         f"needed, more than this machine's {memory / 2**30:.1f} GiB")


def check_finite(array: np.ndarray, source: str) -> None:
    """Refuse an image holding NaN or infinite voxels (intensity scaling would be undefined)."""
    if not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise InputError(f"{source} has {bad} NaN or infinite voxels; replace them (e.g. with 0) first")


def check_slice_positions(positions: np.ndarray, normal: np.ndarray, files: Sequence[str], source: str) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along their normal (a missing slice).

    Args:
        positions: ``(N, 3)`` ImagePositionPatient of the slices in reading order (LPS mm).
        normal: The slice normal (LPS).
        files: The slice files, in the same order (named in the message).
        source: The series (for the message).
    """
    if len(positions) < 3:
        return
    along = np.asarray(positions, dtype=float) @ (np.asarray(normal, dtype=float) / np.linalg.norm(normal))
    steps = np.diff(along)
    step = float(np.median(steps))
    if abs(step) < 1e-6:
        raise InputError(f"DICOM series {source} has several slices at one position: it mixes acquisitions")
    bad = np.flatnonzero(np.abs(steps - step) > max(0.01 * abs(step), 1e-3))
    if bad.size:
        at = int(bad[0])
        raise InputError(f"DICOM series {source} is not evenly spaced: {steps[at]:.3f} mm between "
                         f"{Path(files[at]).name} and {Path(files[at + 1]).name} (elsewhere {step:.3f} mm); "
                         "a slice is missing or unreadable")


def stray_dicom_files(folder: str | os.PathLike, series_files: Sequence[str]) -> list[str]:
    """Files under ``folder`` that look like DICOM slices but belong to no readable series."""
    known = {os.path.realpath(f) for f in series_files}
    stray = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or os.path.realpath(path) in known:
            continue
        if path.name.lower().endswith(DICOM_SUFFIXES) or _has_dicom_magic(path):
            stray.append(str(path))
    return stray


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False
