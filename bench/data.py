"""The benchmark data and every case-selection rule, each written once.

The images live in ``../shared/data`` (or ``$MEDFMSEGMENT_DATA``), outside the repository:

* MSD hippocampus MRI (``msd_hippocampus_mri``): 3D volumes, label > 0 is the whole hippocampus;
* HC18 fetal-head ultrasound (``hc18_fetal_head_us``): 2D images ``NNN_HC.png`` with masks, several
  images per subject (the prefix before the first ``_``);
* the TotalSegmentator example CT (``ct_dicom_totalsegmentator``): a DICOM series and its label map.

Boxes are voxel indices ``(I0, J0, K0, I1, J1, K1)`` with inclusive corners; arrays are (K, J, I).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["DATA_DIR", "HC18", "HIPPOCAMPUS", "CT", "CT_VOLUME", "require_data", "bbox3d", "hippocampus_names",
           "hippocampus_case", "hippocampus_split", "hippocampus_largest", "hc18_names", "hc18_case",
           "hc18_split", "ct_case", "ct_series_classes"]

DATA_DIR = Path(os.environ.get("MEDFMSEGMENT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HIPPOCAMPUS = DATA_DIR / "msd_hippocampus_mri"
HC18 = DATA_DIR / "hc18_fetal_head_us"
CT = DATA_DIR / "ct_dicom_totalsegmentator"
CT_VOLUME = CT / "example_ct.nii.gz"  # the same CT as one NIfTI file


def require_data() -> None:
    """Exit with one line when the data folder is missing (benchmarks need real images)."""
    if not DATA_DIR.is_dir():
        sys.exit(f"data folder {DATA_DIR} not found (set MEDFMSEGMENT_DATA)")


def bbox3d(mask: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """Inclusive voxel box ``(I0, J0, K0, I1, J1, K1)`` of a non-empty (K, J, I) mask."""
    k, j, i = np.nonzero(mask)
    return tuple(int(v) for v in (i.min(), j.min(), k.min(), i.max(), j.max(), k.max()))


def hippocampus_names(count: int, offset: int = 0) -> list[str]:
    """The evaluation cases: every N-th volume by name (N = cases // count), from ``offset``.

    Another offset gives other cases of the same spread (the held-out check).
    """
    names = sorted(p.name for p in (HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))
    return names[offset::max(1, len(names) // max(count, 1))][:count]


def hippocampus_case(name: str):
    """``(MedicalImage, truth)`` of one hippocampus volume; truth is the (K, J, I) bool label > 0."""
    from MedFMSegmentLib.io import read_image

    return read_image(HIPPOCAMPUS / "imagesTr" / name), read_image(HIPPOCAMPUS / "labelsTr" / name).array > 0


def hippocampus_split(n_train: int, n_test: int):
    """Fine-tuning split: ``(train, test)`` lists of (image, label), the first ``n_train`` cases by
    name, then the next ``n_test``."""
    from MedFMSegmentLib.io import read_image, read_label

    names = sorted(p.name for p in (HIPPOCAMPUS / "labelsTr").glob("hippocampus_*.nii.gz"))
    pairs = [(read_image(HIPPOCAMPUS / "imagesTr" / n), read_label(HIPPOCAMPUS / "labelsTr" / n))
             for n in names[: n_train + n_test]]
    return pairs[:n_train], pairs[n_train:]


def hippocampus_largest(count: int) -> list[Path]:
    """The ``count`` largest hippocampus volumes (by voxel count), largest first: the batch cases."""
    from MedFMSegmentLib.io import read_image

    images = sorted((HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"), key=lambda p: -int(np.prod(read_image(p).array.shape)))
    return images[:count]


def hc18_names(count: int) -> list[str]:
    """The first ``count`` HC18 images by name (without ``.png``)."""
    return sorted(p.name[:-4] for p in (HC18 / "images").glob("*_HC.png"))[:count]


def hc18_case(name: str):
    """``(MedicalImage, truth)`` of one HC18 image; truth is the (J, I) bool mask."""
    from MedFMSegmentLib.io import read_image

    return read_image(HC18 / "images" / f"{name}.png"), read_image(HC18 / "masks" / f"{name}_mask.png").array[0] > 0


def hc18_split(n_train: int, n_test: int):
    """Fine-tuning split by subject prefix: ``(train, test)`` lists of (image, label), ``n_train``
    images of the first ``n_train`` prefixes and ``n_test`` images of the others (no subject in both)."""
    from MedFMSegmentLib.io import read_image, read_label

    images = sorted((HC18 / "images").glob("*_HC.png"))
    train_prefixes = set(sorted({p.name.split("_")[0] for p in images})[:n_train])

    def pair(p):
        return read_image(p), read_label(HC18 / "masks" / p.name.replace("_HC.png", "_HC_mask.png"))

    return ([pair(p) for p in images if p.name.split("_")[0] in train_prefixes][:n_train],
            [pair(p) for p in images if p.name.split("_")[0] not in train_prefixes][:n_test])


def ct_case():
    """``(dicom_folder, box)`` for the CT series: the box of its largest labelled structure, or None
    when the series is absent."""
    from MedFMSegmentLib.io import read_image

    folder = CT / "example_ct_dicom"
    if not folder.is_dir():
        return None
    seg = read_image(CT / "example_seg_dicom.nii.gz").array.astype(int)
    labels, counts = np.unique(seg[seg > 0], return_counts=True)
    return folder, bbox3d(seg == labels[np.argmax(counts)])


def ct_series_classes():
    """``(MedicalImage, classes)`` of the CT series: TotalSegmentator's class map (v2 ids, a model's
    output, a rough reference only) resampled onto the series' grid; None when absent."""
    import SimpleITK as sitk

    from MedFMSegmentLib.io import find_dicom_series, mask_to_sitk, read_dicom_series

    folder = CT / "example_ct_dicom"
    if not folder.is_dir():
        return None
    (_, files), = find_dicom_series(folder)
    image = read_dicom_series(files, source=str(folder))
    grid = mask_to_sitk(np.zeros(image.geometry.shape, bool), image.geometry)
    seg = sitk.ReadImage(str(CT / "example_seg_dicom.nii.gz"))
    return image, sitk.GetArrayFromImage(sitk.Resample(seg, grid, sitk.Transform(), sitk.sitkNearestNeighbor))
