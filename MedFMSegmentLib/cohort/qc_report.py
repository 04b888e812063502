"""A batch's QC report: per case a thumbnail with the contour, the volume in ml, the time and flags.

``report.html`` (self-contained: thumbnails are inline PNGs, styles inline) and ``qc.csv`` are
written beside ``summary.csv``, atomically. A result is flagged when its mask is empty, falls
apart into many connected components, or has a volume far from the cohort's median.
"""

from __future__ import annotations

import base64
import csv
import html
import io as _io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import atomic_write_text

__all__ = ["CaseQC", "QCThresholds", "measure", "measure_output", "read_output_mask", "flag_cases", "write_report",
           "report_from_outputs", "png_bytes"]

QC_FIELDS = ("case", "input", "output", "status", "seconds", "volume_ml", "components", "flags")


@dataclass
class QCThresholds:
    """When a result is flagged: more than ``max_components`` components, or a volume more than
    ``volume_factor`` times above or below the median of the cohort's non-empty results (with at
    least ``min_cohort`` of them)."""

    max_components: int = 3
    volume_factor: float = 3.0
    min_cohort: int = 3


@dataclass
class CaseQC:
    """One case's QC figures; ``thumbnail`` is a PNG (empty when there is no mask)."""

    case: str
    input: str = ""
    output: str = ""
    status: str = "ok"
    seconds: float = 0.0
    voxels: int = 0
    volume_ml: float = 0.0
    components: int = 0
    thumbnail: bytes = b""
    flags: list[str] = field(default_factory=list)
    not_measured: str = ""  # why the figures are missing (the output could not be measured)

    def row(self) -> dict:
        return {"case": self.case, "input": self.input, "output": self.output, "status": self.status,
                "seconds": f"{self.seconds:.2f}", "volume_ml": f"{self.volume_ml:.3f}",
                "components": self.components, "flags": ";".join(self.flags)}


def measure(image, mask: np.ndarray, case: str = "", max_size: int = 192) -> CaseQC:
    """Volume, connected components (26-connected) and a thumbnail of a ``(K, J, I)`` mask on ``image``.

    The thumbnail is slice K at the middle of the mask's extent (the image's middle slice when the
    mask is empty), windowed to the image's 1st-99th percentiles, with the mask's contour in red.
    """
    from scipy import ndimage

    mask = np.asarray(mask).astype(bool)
    spacing = tuple(float(s) for s in image.geometry.spacing)  # (I, J, K)
    voxels = int(mask.sum())
    components = int(ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1]) if voxels else 0
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    k = int((ks[0] + ks[-1]) // 2) if ks.size else mask.shape[0] // 2
    return CaseQC(case, voxels=voxels, volume_ml=voxels * float(np.prod(spacing)) / 1000.0, components=components,
                  thumbnail=png_bytes(_thumbnail(image.array[k], mask[k], spacing[0], spacing[1], max_size)))


def measure_output(image, mask: np.ndarray | None, output: str | os.PathLike, case: str = "") -> CaseQC:
    """:func:`measure` a mask (or, given None, the batch output ``output``); never raises.

    A mask that cannot be measured gives a :class:`CaseQC` whose ``not_measured`` says why, so
    the QC of a batch never turns a written result into a failed case.
    """
    try:
        return measure(image, read_output_mask(output, image) if mask is None else mask, case)
    except Exception as exc:  # noqa: BLE001 - QC is a report on results, never a reason to lose one
        return CaseQC(case, not_measured=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def read_output_mask(output: str | os.PathLike, image) -> np.ndarray:
    """A batch output (label map, ``.seg.nrrd`` or DICOM SEG) as a ``(K, J, I)`` mask on ``image``'s grid."""
    from ..io import read_label

    if str(output).endswith(".dcm"):
        from .dicom_seg import read_dicom_seg

        return read_dicom_seg(output, image.geometry)
    return read_label(output).array > 0


def _thumbnail(plane: np.ndarray, mask: np.ndarray, spacing_i: float, spacing_j: float, max_size: int) -> np.ndarray:
    from scipy import ndimage

    lo, hi = np.percentile(plane, [1, 99]) if plane.size else (0.0, 1.0)
    grey = np.clip((plane - lo) / max(float(hi - lo), 1e-6), 0, 1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    contour = mask & ~ndimage.binary_erosion(mask, border_value=0)
    # Thicken the contour so it survives the downscaling of large (512 x 512) slices.
    step = max(plane.shape[0] * spacing_j, plane.shape[1] * spacing_i) / max_size
    if step > 1.5 * min(spacing_i, spacing_j):
        contour = ndimage.binary_dilation(contour, iterations=int(step / min(spacing_i, spacing_j) / 2))
    rgb[contour] = (255, 40, 40)
    height_mm, width_mm = plane.shape[0] * spacing_j, plane.shape[1] * spacing_i
    scale = max_size / max(height_mm, width_mm)
    rows = np.clip((np.arange(max(1, round(height_mm * scale))) + 0.5) / scale / spacing_j, 0, plane.shape[0] - 1)
    cols = np.clip((np.arange(max(1, round(width_mm * scale))) + 0.5) / scale / spacing_i, 0, plane.shape[1] - 1)
    return rgb[rows.astype(int)][:, cols.astype(int)]


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB ``(H, W, 3)`` array as PNG bytes (zlib; no imaging library needed)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def flag_cases(cases: Sequence[CaseQC], thresholds: QCThresholds | None = None) -> list[CaseQC]:
    """Set each case's ``flags``: failed, empty, fragmented (components), volume outlier (vs the median)."""
    thresholds = thresholds or QCThresholds()
    volumes = [c.volume_ml for c in cases if c.status != "failed" and c.voxels > 0]
    median = float(np.median(volumes)) if len(volumes) >= thresholds.min_cohort else None
    for case in cases:
        case.flags = []
        if case.status == "failed":
            case.flags.append("failed")
            continue
        if case.not_measured:
            case.flags.append(f"not measured: {case.not_measured}")
            continue
        if case.voxels == 0:
            case.flags.append("empty mask")
            continue
        if case.components > thresholds.max_components:
            case.flags.append(f"{case.components} components")
        if median and not median / thresholds.volume_factor <= case.volume_ml <= median * thresholds.volume_factor:
            case.flags.append(f"volume {case.volume_ml / median:.2g}x the median")
    return list(cases)


def write_report(cases: Sequence[CaseQC], output_dir: str | os.PathLike, title: str = "MedFMSegment batch QC",
                 thresholds: QCThresholds | None = None) -> Path:
    """Flag the cases and write ``report.html`` and ``qc.csv`` in ``output_dir`` (atomically); return the page."""
    output_dir = Path(output_dir)
    cases = flag_cases(cases, thresholds)
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=QC_FIELDS)
    writer.writeheader()
    writer.writerows(c.row() for c in cases)
    atomic_write_text(output_dir / "qc.csv", buffer.getvalue())
    page = output_dir / "report.html"
    atomic_write_text(page, _html(cases, title))
    return page


def report_from_outputs(inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
                        thresholds: QCThresholds | None = None) -> Path:
    """The QC report of a finished single-process batch, from ``summary.csv`` and the outputs
    (re-reads each image); the cluster batch measures each case on its worker instead."""
    from ..batch import discover_cases
    from ..errors import InputError

    output_dir = Path(output_dir)
    with (output_dir / "summary.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    entries = []
    for case, row in zip(discover_cases(inputs), rows):
        entry = CaseQC(case.name)
        if row["status"] != "failed":
            try:
                entry = measure_output(case.read(), None, row["output"], case.name)
            except (InputError, RuntimeError, ValueError, OSError) as exc:
                entry.not_measured = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        entry.input, entry.output, entry.status = row["input"], row["output"], row["status"]
        entry.seconds = float(row["seconds"] or 0)
        entries.append(entry)
    return write_report(entries, output_dir, thresholds=thresholds)


def _html(cases: Sequence[CaseQC], title: str) -> str:
    esc = html.escape
    volumes = [c.volume_ml for c in cases if c.status != "failed" and c.voxels > 0]
    flagged = sum(bool(c.flags) for c in cases)
    rows = []
    for c in cases:
        image = (f'<img alt="{esc(c.case)}" src="data:image/png;base64,{base64.b64encode(c.thumbnail).decode()}">'
                 if c.thumbnail else "")
        flags = "".join(f'<span class="flag">{esc(f)}</span>' for f in c.flags)
        rows.append(f'<tr class="{"flagged" if c.flags else ""}"><td>{image}</td><td>{esc(c.case)}<br>'
                    f'<small>{esc(c.input)}</small></td><td>{esc(c.status)}</td><td>{c.volume_ml:.2f}</td>'
                    f'<td>{c.components}</td><td>{c.seconds:.1f}</td><td>{flags}</td></tr>')
    median = f"{np.median(volumes):.2f} ml" if volumes else "n/a"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:middle;text-align:left}}
tr.flagged{{background:#fff1f0}}.flag{{background:#c0392b;color:#fff;border-radius:3px;padding:1px 5px;
margin-right:4px;white-space:nowrap}}img{{display:block;image-rendering:pixelated}}</style></head>
<body><h1>{esc(title)}</h1>
<p>{len(cases)} cases, {sum(c.status == "failed" for c in cases)} failed, {flagged} flagged;
median volume {median}.</p>
<table><thead><tr><th>middle slice</th><th>case</th><th>status</th><th>volume (ml)</th><th>components</th>
<th>seconds</th><th>flags</th></tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
