"""The panel's batch outputs: each volume's result in the scene, or as a file in one of the
library batch's formats (:data:`MedFMSegmentLib.batch.OUTPUT_FORMATS`, DICOM SEG included).

Files are written atomically by the library's writers; an existing file is never replaced (the
paths are checked before any volume is sent). DICOM SEG needs the volume's own DICOM series:
Slicer's DICOM loader names its instances in the node attribute ``DICOM.instanceUIDs`` and the
DICOM database gives their files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import slicer

from ..errors import InputError
from .nodes import volume_geometry

__all__ = ["SCENE", "FORMAT_LABELS", "output_choices", "output_paths", "dicom_files_of", "write_output"]

SCENE = "scene"
#: What the panel shows for each output (a format without a label shows its extension).
FORMAT_LABELS = {SCENE: "segmentations in the scene", "nii.gz": "NIfTI label map (.nii.gz)",
                 "nrrd": "NRRD label map (.nrrd)", "seg.nrrd": "Slicer segmentation (.seg.nrrd)",
                 "dcm": "DICOM SEG (.dcm; volumes loaded from DICOM)"}


def output_choices() -> list[tuple[str, str]]:
    """``(format, label)`` of every batch output: the scene, then the library batch's formats."""
    from ..batch import OUTPUT_FORMATS

    return [(name, FORMAT_LABELS.get(name, f".{name}")) for name in (SCENE, *OUTPUT_FORMATS)]


def dicom_files_of(volume_node, lookup: Callable[[str], str] | None = None) -> list[str]:
    """The DICOM files of a volume loaded from DICOM, in the library's series order.

    ``lookup(instance_uid) -> file`` defaults to Slicer's DICOM database. Raises
    :class:`InputError` when the volume does not come from one whole DICOM series on disk.
    """
    from ..io import find_dicom_series

    name = volume_node.GetName()
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        raise InputError(f"DICOM SEG needs volumes loaded from DICOM; '{name}' is not one (choose another format)")
    if lookup is None:
        database = getattr(slicer, "dicomDatabase", None)
        if database is None:
            raise InputError("Slicer's DICOM database is not open: DICOM SEG cannot find the source files")
        lookup = database.fileForInstance
    files = {os.path.abspath(lookup(uid) or "") for uid in uids}
    if not all(os.path.isfile(f) for f in files):
        raise InputError(f"the DICOM files of '{name}' are no longer on disk (DICOM SEG needs them)")
    folders = sorted({os.path.dirname(f) for f in files})
    for folder in folders:
        for _, series in find_dicom_series(folder):
            if {os.path.abspath(f) for f in series} == files:
                return [os.path.abspath(f) for f in series]
    raise InputError(f"the DICOM files of '{name}' are not one series in one folder (DICOM SEG needs that)")


def output_paths(volume_nodes: Sequence, folder: str | os.PathLike | None, fmt: str) -> list[Path]:
    """One file per volume in ``folder``, named after the volume (unique, file-system safe);
    InputError for an unknown format, a missing folder or an existing file."""
    from ..batch import OUTPUT_FORMATS
    from ..files import safe_name, unique_names

    if fmt not in OUTPUT_FORMATS:
        raise InputError(f"unknown output format {fmt!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    if not folder or not Path(folder).is_dir():
        raise InputError("choose an existing output folder for the batch files")
    names = unique_names([safe_name(node.GetName() or "volume", "volume") for node in volume_nodes])
    paths = [Path(folder) / f"{name}.{fmt}" for name in names]
    existing = [p.name for p in paths if p.exists()]
    if existing:
        raise InputError(f"{existing[0]} exists in the output folder; choose another folder (nothing is replaced)")
    return paths


def write_output(mask: np.ndarray, volume_node, path: str | os.PathLike, fmt: str, segment_name: str = "Segment_1",
                 adapter_metadata: dict | None = None, dicom_lookup: Callable[[str], str] | None = None) -> Path:
    """Write one volume's ``(K, J, I)`` result as ``path`` in format ``fmt``, atomically, never
    over an existing file."""
    path = Path(path)
    if path.exists():
        raise InputError(f"{path.name} exists; nothing is replaced")
    geometry = volume_geometry(volume_node)
    mask = np.asarray(mask) > 0
    if fmt == "dcm":
        from ..cohort.dicom_seg import check_dicom_inputs, write_dicom_seg

        files = dicom_files_of(volume_node, dicom_lookup)
        check_dicom_inputs([(volume_node.GetName(), files)])
        return write_dicom_seg(mask, geometry, files, path, segment_name=segment_name,
                               adapter_metadata=adapter_metadata, automatic=True)
    from ..io import write_label

    return write_label(mask, geometry, path, segment_name=segment_name)
