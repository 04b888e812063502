"""The service's binary frames: arrays (volumes, masks, mask slices) with a small JSON header.

A frame is ``MAGIC``, a little-endian uint32 header length, the JSON header, then the arrays'
bytes one after the other, zlib-compressed (or raw: ``"codec": "none"``). Boolean arrays travel
bit-packed (``numpy.packbits``). The header lists each array's ``dtype`` and ``shape`` and may
carry more fields (geometry, slice positions). The declared sizes are checked against a limit
before anything is decompressed, so a small body cannot expand into a huge allocation.

Shared by server and client; needs numpy only.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import Sequence

import numpy as np

__all__ = ["MAGIC", "MEDIA_TYPE", "WireError", "encode_frame", "decode_frame", "geometry_to_dict",
           "geometry_from_dict", "volume_id"]

MAGIC = b"MFSF1\n"
MEDIA_TYPE = "application/x-medfmsegment-frame"
DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64", "int64", "uint64")


class WireError(ValueError):
    """A frame that cannot be read: one line saying why."""


def _raw(array: np.ndarray) -> bytes:
    if array.dtype == np.bool_:
        return np.packbits(array.reshape(-1)).tobytes()
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    return (count + 7) // 8 if dtype == "bool" else count * np.dtype(dtype).itemsize


def encode_frame(arrays: Sequence[np.ndarray], header: dict | None = None, level: int = 1) -> bytes:
    """Pack ``arrays`` and the JSON-serialisable ``header`` fields into one frame.

    ``level`` is zlib's (1: fast; 0: no compression at all, ``"codec": "none"``).
    """
    meta = dict(header or {})
    meta["arrays"] = [{"dtype": str(a.dtype), "shape": list(a.shape)} for a in arrays]
    for spec in meta["arrays"]:
        if spec["dtype"] not in DTYPES:
            raise WireError(f"arrays of type {spec['dtype']} cannot be sent")
    meta["codec"] = "zlib" if level > 0 else "none"
    payload = b"".join(_raw(a) for a in arrays)
    if level > 0:
        payload = zlib.compress(payload, level)
    encoded = json.dumps(meta, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(encoded)) + encoded + payload


def decode_frame(data: bytes, max_bytes: int = 1 << 34) -> tuple[dict, list[np.ndarray]]:
    """``(header, arrays)`` of a frame; raises :class:`WireError` for anything malformed or larger
    than ``max_bytes`` once decompressed."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise WireError("body is not a MedFMSegment frame (bad magic)")
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if length > 1 << 20 or start + length > len(data):
        raise WireError("frame header is truncated or too long")
    try:
        header = json.loads(data[start:start + length])
        specs = [(str(s["dtype"]), [int(v) for v in s["shape"]]) for s in header["arrays"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError(f"frame header is not valid: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("frame header is not a JSON object")
    for dtype, shape in specs:
        if dtype not in DTYPES or any(v < 0 for v in shape) or len(shape) > 4:
            raise WireError(f"frame array {dtype} {shape} is not supported")
    sizes = [_nbytes(dtype, shape) for dtype, shape in specs]
    total = sum(sizes)
    if total > max_bytes:
        raise WireError(f"frame arrays need {total} bytes, over the limit of {max_bytes}")
    payload = data[start + length:]
    if header.get("codec", "zlib") == "zlib":
        inflater = zlib.decompressobj()
        try:
            payload = inflater.decompress(payload, total + 1)
        except zlib.error as exc:
            raise WireError(f"frame data is not valid zlib: {exc}") from None
        if not inflater.eof and len(payload) <= total:
            raise WireError("frame data is truncated")
    elif header.get("codec") != "none":
        raise WireError(f"unknown frame codec {header.get('codec')!r}")
    if len(payload) != total:
        raise WireError(f"frame data has {len(payload)} bytes, its header declares {total}")
    arrays, offset = [], 0
    for (dtype, shape), size in zip(specs, sizes):
        chunk = payload[offset:offset + size]
        offset += size
        if dtype == "bool":
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            flat = np.unpackbits(np.frombuffer(chunk, np.uint8), count=count).astype(bool)
        else:
            flat = np.frombuffer(chunk, np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=False)
        arrays.append(flat.reshape(shape))
    return header, arrays


def geometry_to_dict(geometry) -> dict:
    """A :class:`~MedFMSegmentLib.geometry.VolumeGeometry` as JSON fields."""
    return {"size": list(geometry.size), "spacing": list(geometry.spacing), "origin": list(geometry.origin),
            "direction": np.asarray(geometry.direction, float).reshape(-1).tolist()}


def geometry_from_dict(data: dict):
    """The :class:`~MedFMSegmentLib.geometry.VolumeGeometry` of :func:`geometry_to_dict`'s fields."""
    from ..geometry import VolumeGeometry

    try:
        geometry = VolumeGeometry(tuple(data["size"]), tuple(data["spacing"]), tuple(data["origin"]),
                                  np.asarray(data["direction"], dtype=float).reshape(3, 3))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"geometry is not valid: {exc}") from None
    values = np.concatenate([geometry.spacing, geometry.origin, geometry.direction.reshape(-1)])
    if not np.all(np.isfinite(values)):
        raise WireError("geometry holds NaN or infinite values")
    return geometry


def volume_id(array: np.ndarray, geometry, is_2d: bool) -> str:
    """Content-derived id of a volume: SHA-256 of its grid, type and voxel bytes (first 32 hex digits).

    Client and server compute it alike, so a client can ask whether the server already has a
    volume before sending it.
    """
    meta = {"dtype": str(array.dtype), "shape": list(array.shape), "is_2d": bool(is_2d),
            "geometry": geometry_to_dict(geometry)}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()[:32]
