"""DICOM SEG output (highdicom): a binary Segmentation on the frames of the source CT/MR series.

The mask is a ``(K, J, I)`` array on the grid SimpleITK read from the series' files sorted by
GDCM (``find_dicom_series``), so slice ``k`` is file ``k``: frame ``k`` of the SEG references that
file's SOP instance and carries its Image Position. Reading back (:func:`read_dicom_seg`) places
each frame by its Image Position on the image's grid, independently of that order, so a SEG read
back lands on exactly the voxels of the NIfTI written from the same mask.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..geometry import VolumeGeometry

__all__ = ["check_dicom_inputs", "segment_codes", "write_dicom_seg", "read_dicom_seg"]

_POSITION_TOLERANCE_MM = 0.05
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def check_dicom_inputs(cases: Sequence[tuple[str, list[str] | None]]) -> None:
    """Raise :class:`InputError` unless every ``(source, dicom_files)`` case is a DICOM series."""
    for source, files in cases:
        if not files:
            raise InputError(f"--format dcm (DICOM SEG) needs DICOM series as inputs; {source} is not one")
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise InputError("--format dcm needs highdicom: pip install 'medfmsegment[cohort]'") from None


def segment_codes(segment_name: str, adapter_metadata: dict | None = None):
    """The segment's (category, type) codes: from the adapter's metadata, its label's SNOMED name, or generic.

    An adapter's ``metadata.json`` may give ``"segmented_property_category"`` and
    ``"segmented_property_type"`` as ``{"value", "scheme", "meaning"}``. Otherwise a label name
    that is a SNOMED CT concept pydicom knows (``liver``, ``left kidney``...) becomes an
    "Anatomical Structure" of that type; anything else is a generic "Tissue".
    """
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    metadata = adapter_metadata or {}

    def coded(key: str):
        value = metadata.get(key)
        if isinstance(value, dict) and {"value", "scheme", "meaning"} <= set(value):
            return CodedConcept(str(value["value"]), str(value["scheme"]), str(value["meaning"]))
        return None

    category, kind = coded("segmented_property_category"), coded("segmented_property_type")
    if kind is None:
        words = re.findall(r"[A-Za-z]+", segment_name)
        known = getattr(codes.SCT, "".join(w.capitalize() for w in words), None) if words else None
        kind = CodedConcept(known.value, known.scheme_designator, known.meaning) if known else None
        if kind is not None and category is None:
            category = CodedConcept("91723000", "SCT", "Anatomical Structure")
    if kind is None:
        kind = CodedConcept("85756007", "SCT", "Tissue")
    return category or CodedConcept("85756007", "SCT", "Tissue"), kind


def write_dicom_seg(mask: np.ndarray, geometry: VolumeGeometry, dicom_files: Sequence[str], path: str | os.PathLike,
                    *, segment_name: str = "Segment_1", adapter_metadata: dict | None = None,
                    automatic: bool | None = None) -> Path:
    """Write a ``(K, J, I)`` mask as a binary DICOM SEG referencing the series ``dicom_files``, atomically.

    Args:
        mask: Boolean ``(K, J, I)`` on ``geometry``.
        geometry: The grid read from ``dicom_files`` (in that order: slice k is file k).
        dicom_files: The series' files, sorted as :func:`MedFMSegmentLib.io.find_dicom_series` gives.
        path: Output ``.dcm`` path; written to a hidden sibling and renamed into place.
        segment_name: Segment label (the adapter's label name).
        adapter_metadata: An adapter's metadata: codes (see :func:`segment_codes`) and "automatic".
        automatic: Algorithm type AUTOMATIC (adapter) or SEMIAUTOMATIC (prompted); default from metadata.

    Raises:
        InputError: files that do not lie on ``geometry``, or a mask of another shape.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__
    from ..files import atomic_path

    path = Path(path)
    mask = np.asarray(mask).astype(bool)
    if mask.shape != geometry.shape:
        raise InputError(f"mask shape {mask.shape} does not match the series grid {geometry.shape}")
    sources = _source_datasets(dicom_files, geometry)
    if automatic is None:
        automatic = bool((adapter_metadata or {}).get("automatic", False))
    category, kind = segment_codes(segment_name, adapter_metadata)
    algorithm = hd.AlgorithmIdentificationSequence(name="MedFMSegment", version=__version__,
                                                   family=codes.DCM.ArtificialIntelligence)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=segment_name[:64], segmented_property_category=category,
        segmented_property_type=kind, algorithm_identification=algorithm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if automatic
        else hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MedFMSegment",
        manufacturer_model_name="MedFMSegment", software_versions=__version__, device_serial_number="0",
        series_description=f"MedFMSegment {segment_name}"[:64], content_label="MEDFMSEG",
        content_description=f"MedFMSegment {segment_name}"[:64], omit_empty_frames=bool(mask.any()))
    with atomic_path(path, extension=".dcm") as tmp:
        seg.save_as(tmp)
    return path


def _source_datasets(files: Sequence[str], geometry: VolumeGeometry) -> list:
    """The series' headers in slice order, checked against ``geometry``; empty UIDs filled in.

    Anonymised series sometimes blank their UIDs (the SOP instance UID then survives in the file
    meta): the SOP class/instance come from there; a blank study/series/frame-of-reference UID
    becomes one derived from the instance UIDs, the same on every run. A blank slice thickness
    becomes the slice spacing. Only these in-memory copies change, never the files.
    """
    import pydicom
    from pydicom.uid import generate_uid

    if len(files) != geometry.size[2]:
        raise InputError(f"the series has {len(files)} files but the image {geometry.size[2]} slices")
    datasets = []
    for k, file in enumerate(files):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise InputError(f"cannot read DICOM file {file}: {exc}") from None
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPInstanceUID") and meta is not None:
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        if not ds.get("SOPClassUID") and meta is not None:
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        expected = geometry.index_to_lps(np.array([0.0, 0.0, float(k)]))
        position = np.asarray([float(v) for v in ds.get("ImagePositionPatient", [np.nan] * 3)])
        if not np.allclose(position, expected, atol=_POSITION_TOLERANCE_MM) or \
                (int(ds.Rows), int(ds.Columns)) != (geometry.size[1], geometry.size[0]):
            raise InputError(f"DICOM file {file} does not lie on slice {k} of the series grid")
        if not ds.get("SliceThickness"):  # type 2, often blank; highdicom needs one for the SEG's pixel measures
            ds.SliceThickness = geometry.spacing[2]
        datasets.append(ds)
    seed = [str(ds.SOPInstanceUID) for ds in datasets]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        derived = generate_uid(entropy_srcs=[keyword, *seed])
        for ds in datasets:
            if not ds.get(keyword):
                setattr(ds, keyword, derived)
    return datasets


def read_dicom_seg(path: str | os.PathLike, geometry: VolumeGeometry) -> np.ndarray:
    """Read a binary/fractional DICOM SEG onto ``geometry``: a ``(K, J, I)`` bool mask (all segments).

    Each frame is placed by its Image Position (Patient); a frame off the grid, or an orientation
    or pixel size other than the grid's, raises :class:`InputError`.
    """
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"cannot read DICOM SEG {path}: {exc}") from None
    if ds.get("SOPClassUID") != _SEG_SOP_CLASS:
        raise InputError(f"{path} is not a DICOM Segmentation")
    if (int(ds.Rows), int(ds.Columns)) != (geometry.size[1], geometry.size[0]):
        raise InputError(f"{path}: frames of {ds.Rows} x {ds.Columns} do not match the grid")
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]  # (row step, column step)
    direction = np.asarray(geometry.direction)
    if not (np.allclose(orientation[:3], direction[:, 0], atol=1e-4) and np.allclose(orientation[3:], direction[:, 1], atol=1e-4)
            and np.allclose(spacing, [geometry.spacing[1], geometry.spacing[0]], atol=1e-4)):
        raise InputError(f"{path}: orientation or pixel spacing differs from the image's")
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    mask = np.zeros(geometry.shape, dtype=bool)
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        position = np.asarray([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        i, j, k = geometry.lps_to_index(position)
        index = int(round(k))
        if abs(i) > 1e-3 or abs(j) > 1e-3 or abs(k - index) > 1e-3 or not 0 <= index < geometry.size[2]:
            raise InputError(f"{path}: a frame at {position.tolist()} is off the image's grid")
        mask[index] |= frame > 0
    return mask

