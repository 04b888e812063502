"""The QC report: volumes, components, thumbnails and flags on constructed cases."""

from __future__ import annotations

import csv
import re
import struct
import zlib

import numpy as np

from conftest import ellipsoid_mask
from MedFMSegmentLib.cohort.qc_report import (CaseQC, QCThresholds, flag_cases, measure, measure_output, png_bytes,
                                             write_report)
from MedFMSegmentLib.io import MedicalImage

SPACING = (0.8, 0.8, 2.0)  # (I, J, K) mm


def _decode_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGB, filter-0 PNG (what :func:`png_bytes` writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = {}, 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        assert struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])[0] == zlib.crc32(kind + body)
        chunks.setdefault(kind, b"")
        chunks[kind] += body
        offset += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
    assert not raw[:, 0].any()
    return raw[:, 1:].reshape(height, width, 3)


def test_png_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    assert np.array_equal(_decode_png(png_bytes(rgb)), rgb)


def _image(shape=(12, 60, 70), seed=0) -> MedicalImage:
    rng = np.random.default_rng(seed)
    return MedicalImage.from_array((100 + 20 * rng.standard_normal(shape)).astype(np.float32), spacing=SPACING)


def _case(name: str, mask: np.ndarray) -> CaseQC:
    entry = measure(_image(mask.shape), mask, name)
    entry.input, entry.output = f"{name}.nii.gz", f"out/{name}.nii.gz"
    return entry


def test_measure_volume_components_and_thumbnail():
    mask = ellipsoid_mask((12, 60, 70), (6, 30, 35), (3, 12, 15))
    mask[1:3, 2:6, 2:6] = True  # a second component, far from the first
    entry = measure(_image(), mask, "two")
    assert entry.voxels == int(mask.sum())
    assert np.isclose(entry.volume_ml, mask.sum() * 0.8 * 0.8 * 2.0 / 1000)
    assert entry.components == 2
    thumb = _decode_png(entry.thumbnail)
    assert max(thumb.shape[:2]) == 192 and abs(thumb.shape[1] / thumb.shape[0] - 70 / 60) < 0.05
    red = (thumb[..., 0] == 255) & (thumb[..., 1] == 40)
    assert red.any() and not red[thumb.shape[0] // 2, thumb.shape[1] // 2]  # the contour, not a filled blob


def test_flags_on_constructed_cases(tmp_path):
    shape = (12, 60, 70)
    normal = [ellipsoid_mask(shape, (6, 30, 35), (3, 10 + d, 12 + d)) for d in range(4)]
    blobs = np.zeros(shape, bool)
    for n in range(5):
        blobs[5:7, 5 + 10 * n:9 + 10 * n, 10:14] = True
    blobs |= normal[0]
    huge = ellipsoid_mask(shape, (6, 30, 35), (6, 29, 34))
    tiny = ellipsoid_mask(shape, (6, 30, 35), (1, 3, 3))
    cases = [_case(f"normal{n}", m) for n, m in enumerate(normal)]
    cases += [_case("empty", np.zeros(shape, bool)), _case("blobs", blobs), _case("huge", huge), _case("tiny", tiny)]
    cases.append(CaseQC("broken", input="broken.nii.gz", status="failed"))
    flags = {c.case: c.flags for c in flag_cases(cases, QCThresholds(max_components=3, volume_factor=3.0))}
    assert all(flags[f"normal{n}"] == [] for n in range(4))
    assert flags["empty"] == ["empty mask"]
    assert flags["blobs"] == ["6 components"]
    assert len(flags["huge"]) == 1 and flags["huge"][0].startswith("volume") and "x the median" in flags["huge"][0]
    assert len(flags["tiny"]) == 1 and flags["tiny"][0].startswith("volume")
    assert flags["broken"] == ["failed"]

    page = write_report(cases, tmp_path)
    text = page.read_text(encoding="utf-8")
    assert text.count('src="data:image/png;base64,') == 8  # every case with a mask, not the failed one
    assert not re.search(r'(src|href)="(?!data:)', text) and "http" not in text  # no external assets
    assert text.count('class="flagged"') == 5
    rows = list(csv.DictReader((tmp_path / "qc.csv").open()))
    assert [r["case"] for r in rows] == [c.case for c in cases]
    assert rows[5]["flags"] == "6 components" and float(rows[0]["volume_ml"]) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qc.csv", "report.html"]  # no temporaries left


def test_no_volume_flags_without_a_cohort():
    cases = [_case("a", ellipsoid_mask((12, 60, 70), (6, 30, 35), (3, 10, 12))),
             _case("b", ellipsoid_mask((12, 60, 70), (6, 30, 35), (6, 29, 34)))]
    assert [c.flags for c in flag_cases(cases)] == [[], []]  # two cases have no meaningful median


def test_an_output_that_cannot_be_measured_is_flagged_not_failed(tmp_path):
    from MedFMSegmentLib.io import write_label

    image = _image()
    good = write_label(ellipsoid_mask(image.geometry.shape, (6, 30, 35), (3, 10, 12)), image.geometry,
                       tmp_path / "good.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"truncated")
    measured = measure_output(image, None, good, "good")
    assert measured.voxels > 0 and not measured.not_measured
    broken = measure_output(image, None, tmp_path / "bad.nii.gz", "bad")
    assert broken.not_measured and broken.voxels == 0
    flags = flag_cases([measured, broken])
    assert flags[0].flags == [] and flags[1].flags[0].startswith("not measured: ")
