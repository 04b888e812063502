"""Reading images and writing label maps with SimpleITK, atomically.

Everything is returned as a :class:`MedicalImage`: a ``(K, J, I)`` array and its
:class:`~MedFMSegmentLib.geometry.VolumeGeometry`. 2D images (PNG, JPEG, 2D NIfTI) become
one-slice volumes (K = 1), so the rest of the library only ever sees 3D.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError
from .files import atomic_path, new_sibling
from .geometry import VolumeGeometry, voxel_order
from .integrity import (check_image_file, check_orthonormal, check_slice_positions,
                        check_voxel_count, stray_dicom_files)

__all__ = ["IMAGE_2D_EXTENSIONS", "LABEL_EXTENSIONS", "MedicalImage", "array_to_sitk", "choose_series",
           "find_dicom_series", "label_format", "mask_to_sitk", "read_dicom_series", "read_image", "read_label",
           "write_image", "write_label", "write_sitk_image"]

#: Output extensions the writers understand, longest first so ``.seg.nrrd`` wins over ``.nrrd``.
LABEL_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png")
#: 2D image files read as one-slice volumes.
IMAGE_2D_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class MedicalImage:
    """A scalar image on a voxel grid.

    Attributes:
        array: Voxel values, shape ``(K, J, I)``.
        geometry: The grid (size, spacing, origin, direction in LPS).
        source: Where it was read from (for messages and batch summaries).
        is_2d: True for an image that was two-dimensional on disk.
        modality: DICOM modality (``"CT"``, ``"MR"``...) when known.
    """

    array: np.ndarray
    geometry: VolumeGeometry
    source: str = ""
    is_2d: bool = False
    modality: str | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"MedicalImage arrays are (K, J, I); got shape {self.array.shape}")
        if tuple(self.array.shape) != self.geometry.shape:
            raise ValueError(f"array shape {self.array.shape} does not match grid {self.geometry.shape}")

    @classmethod
    def from_array(cls, array: np.ndarray, spacing=(1.0, 1.0, 1.0), **kwargs) -> "MedicalImage":
        """Wrap a ``(K, J, I)`` or 2D ``(J, I)`` array on an axis-aligned grid."""
        array = np.asarray(array)
        is_2d = array.ndim == 2
        if is_2d:
            array = array[None]
        geometry = VolumeGeometry.identity(voxel_order(array.shape), spacing)
        return cls(array, geometry, is_2d=is_2d, **kwargs)


def label_format(path: str | os.PathLike) -> str:
    """The output format an output path asks for (its extension), or raise :class:`InputError`."""
    name = Path(path).name.lower()
    for ext in LABEL_EXTENSIONS:
        if name.endswith(ext):
            return ext
    raise InputError(f"unsupported output format for {path}: use one of {', '.join(LABEL_EXTENSIONS)}")


# ---------------------------------------------------------------------------- reading
def read_image(path: str | os.PathLike, series: str | None = None) -> MedicalImage:
    """Read an image file or a DICOM series folder.

    Args:
        path: NIfTI, NRRD, MHA, PNG/JPEG/TIFF file, or a folder holding one DICOM series.
        series: The series instance UID (or its unique ending) to read from a folder holding several.

    Returns:
        The image as float32 ``(K, J, I)`` with its geometry. RGB(A) 2D images are converted to
        grey (luminance).

    Raises:
        InputError: missing, unreadable, truncated or sheared files, 4D or vector-valued volumes,
            a folder with several series and none chosen, a series with a missing slice.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        return read_dicom_series(choose_series(path, series), source=str(path))
    if path.stat().st_size == 0:
        raise InputError(f"cannot read image {path}: the file is empty")
    try:
        check_image_file(path)
        with _quiet_itk():
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            check_voxel_count(reader.GetSize(), _bytes_per_voxel(reader), str(path))
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read image {path}: {_first_line(exc)}") from None
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return _from_sitk(image, str(path))


def _bytes_per_voxel(reader) -> int:
    """Bytes one voxel of the file's pixel type takes (all components)."""
    import SimpleITK as sitk

    try:
        probe = sitk.GetArrayViewFromImage(sitk.Image([1, 1], reader.GetPixelID()))
        return int(probe.dtype.itemsize * max(1, reader.GetNumberOfComponents()))
    except RuntimeError:
        return 8


def choose_series(folder: Path, series: str | None = None) -> list[str]:
    """The file list of the one DICOM series in ``folder`` (or of the series chosen by UID).

    Raises:
        InputError: no series, several and none chosen (the message names them), or slice files
            that belong to no readable series (a damaged slice).
    """
    found = find_dicom_series(folder)
    if not found:
        raise InputError(f"no DICOM series found in folder {folder}")
    if series is not None:
        chosen = [item for item in found if item[0] == series or item[0].endswith(series)]
        if len(chosen) != 1:
            raise InputError(f"series {series!r} {'is ambiguous' if chosen else 'not found'} in {folder}; "
                             f"it holds {_describe_series(found)}")
    elif len(found) > 1:
        raise InputError(f"folder {folder} holds {len(found)} DICOM series: {_describe_series(found)}; "
                         "choose one (--series UID)")
    else:
        chosen = found
    stray = stray_dicom_files(folder, [f for _, files in found for f in files])
    if stray:
        raise InputError(f"folder {folder} has {len(stray)} DICOM file(s) that cannot be read as part of a "
                         f"series (damaged?): {', '.join(Path(f).name for f in stray[:3])}")
    return chosen[0][1]


def _describe_series(found: list[tuple[str, list[str]]]) -> str:
    return ", ".join(f"{uid} ({len(files)} files)" for uid, files in found)


def find_dicom_series(folder: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """All DICOM series under a folder (recursively), as ``(series_uid, sorted_files)``.

    The file lists are sorted by GDCM along the slice normal, which is what the series reader
    needs to build a correct volume.
    """
    import SimpleITK as sitk

    found: list[tuple[str, list[str]]] = []
    for directory in sorted({str(p.parent) for p in Path(folder).rglob("*") if p.is_file()} | {str(folder)}):
        with _quiet_itk():
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory)
            for uid in uids:
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid)
                if files:
                    found.append((uid, list(files)))
    return found


def read_dicom_series(files: list[str], source: str = "") -> MedicalImage:
    """Read a DICOM series from its (GDCM-sorted) file list, including JPEG 2000 transfer syntaxes.

    Raises:
        InputError: unreadable slices, or slices not evenly spaced (a missing or damaged slice
            would otherwise stretch the spacing silently).
    """
    import SimpleITK as sitk

    source = source or str(Path(files[0]).parent)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read DICOM series {source}: {_first_line(exc)}") from None
    positions = []
    with contextlib.suppress(RuntimeError, ValueError):
        positions = [[float(v) for v in reader.GetMetaData(n, "0020|0032").split("\\")] for n in range(len(files))]
    if len(positions) == len(files) and image.GetDimension() == 3:
        normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
        check_slice_positions(np.array(positions), normal, files, source)
    modality = None
    with contextlib.suppress(RuntimeError):
        modality = reader.GetMetaData(0, "0008|0060").strip() or None
    result = _from_sitk(image, source)
    result.modality = modality
    with contextlib.suppress(RuntimeError):
        result.metadata["series_description"] = reader.GetMetaData(0, "0008|103e").strip()
    return result


def _from_sitk(image, source: str) -> MedicalImage:
    import SimpleITK as sitk

    dim = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    if dim == 4:
        raise InputError(f"{source} is a 4D image; give one 3D volume")
    if dim not in (2, 3):
        raise InputError(f"{source} is a {dim}D image; only 2D and 3D images are supported")
    if components > 1:
        if dim == 2 and components in (3, 4):
            image = _rgb_to_grey(image)
        else:
            raise InputError(f"{source} has {components} components per voxel; give a scalar image")
    # One pass: the view is converted into a new float32 array (never kept: it is SimpleITK's memory).
    array = sitk.GetArrayViewFromImage(image).astype(np.float32)
    try:
        geometry = VolumeGeometry.from_sitk(image)
    except ValueError as exc:
        raise InputError(f"{source} has an invalid grid: {exc}") from None
    check_orthonormal(geometry.direction, source, geometry.spacing, geometry.origin)
    if dim == 2:
        array = array[None]
    modality = None
    if image.HasMetaDataKey("0008|0060"):
        modality = image.GetMetaData("0008|0060").strip() or None
    return MedicalImage(array, geometry, source=source, is_2d=(dim == 2), modality=modality)


def _rgb_to_grey(image):
    import SimpleITK as sitk

    rgb = sitk.GetArrayFromImage(image).astype(np.float32)[..., :3]
    grey = sitk.GetImageFromArray(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    grey.CopyInformation(image)
    return grey


# ---------------------------------------------------------------------------- writing
def array_to_sitk(array: np.ndarray, geometry: VolumeGeometry, is_2d: bool = False):
    """A ``(K, J, I)`` array as a ``SimpleITK.Image`` of its dtype on ``geometry`` (2D when ``is_2d``)."""
    import SimpleITK as sitk

    array = np.asarray(array)
    if array.shape != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match grid {geometry.shape}")
    if is_2d:
        image = sitk.GetImageFromArray(array[0])
        image.SetSpacing(geometry.spacing[:2])
        image.SetOrigin(geometry.origin[:2])
        image.SetDirection(tuple(geometry.direction[:2, :2].ravel()))
    else:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(geometry.spacing)
        image.SetOrigin(geometry.origin)
        image.SetDirection(tuple(geometry.direction.ravel()))
    return image


def mask_to_sitk(mask: np.ndarray, geometry: VolumeGeometry, is_2d: bool = False):
    """A ``(K, J, I)`` mask as a uint8 ``SimpleITK.Image`` on ``geometry`` (2D when ``is_2d``)."""
    return array_to_sitk(np.asarray(mask).astype(np.uint8), geometry, is_2d)


def write_image(image: MedicalImage, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a :class:`MedicalImage` (its voxels, dtype kept, on its grid) atomically."""
    return write_sitk_image(array_to_sitk(image.array, image.geometry, image.is_2d), path, compress)


def write_label(mask: np.ndarray, geometry: VolumeGeometry, path: str | os.PathLike, *,
                is_2d: bool = False, segment_name: str = "Segment_1", label_value: int = 1,
                color: tuple[float, float, float] = (0.9, 0.3, 0.2)) -> Path:
    """Write a binary mask as a label map on the input's exact grid, atomically.

    The file appears complete or not at all: it is written to a temporary name in the same
    folder and renamed into place.

    Args:
        mask: ``(K, J, I)`` array; non-zero voxels become ``label_value``, others 0.
        geometry: The grid of the image the mask belongs to.
        path: Output path; its extension picks the format (see :data:`LABEL_EXTENSIONS`).
        is_2d: Write a 2D image (required for ``.png``; the mask must have K = 1).
        segment_name: Segment name for ``.seg.nrrd``.
        label_value: Value written for the structure.
        color: Segment colour (RGB in 0..1) for ``.seg.nrrd``.

    Returns:
        The written path.
    """
    import SimpleITK as sitk

    path = Path(path)
    fmt = label_format(path)
    if fmt == ".png" and (geometry.size[2] != 1):
        raise InputError(f"PNG output needs a 2D image; {geometry.size[2]} slices given: use .nii.gz or .nrrd")
    if not path.parent.exists():
        raise InputError(f"output folder does not exist: {path.parent}")
    mask = np.asarray(mask)
    if mask.dtype == bool and label_value == 1:
        values = mask.view(np.uint8)  # no copy: a 300-slice 512 x 512 mask is 79 MB
    else:
        values = (mask > 0).astype(np.uint8) * np.uint8(label_value)
    if fmt in (".nii", ".nii.gz"):
        check_orthonormal(geometry.direction, f"the grid of {path.name}")  # NIfTI would coerce it
    if fmt == ".seg.nrrd":
        with atomic_path(path, fmt) as tmp:
            _write_seg_nrrd(values, geometry, tmp, segment_name, label_value, color)
    else:
        image = mask_to_sitk(values, geometry, is_2d=is_2d or fmt == ".png")
        write_sitk_image(image, path, compress=fmt in (".nii.gz", ".nrrd", ".mha"))
    return path


def write_sitk_image(image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a ``SimpleITK.Image`` with its geometry, atomically (the one image writer).

    ``.mhd`` keeps its pixels in a second file: both are written into a hidden temporary folder
    beside the target under their final names (the header names the data file), then moved in,
    data first, so no temporary name is ever referenced or left behind.
    """
    import SimpleITK as sitk

    path = Path(path)
    fmt = label_format(path) if path.suffix else ""
    if fmt != ".mhd":
        with atomic_path(path, fmt) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        return path
    folder = new_sibling(path, suffix=".partial", directory=True)
    try:
        sitk.WriteImage(image, str(folder / path.name), useCompression=False)
        for item in sorted(folder.iterdir(), key=lambda p: p.name == path.name):  # header last
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def _write_seg_nrrd(values: np.ndarray, geometry: VolumeGeometry, path: Path, name: str,
                    label_value: int, color: tuple[float, float, float]) -> None:
    import slicerio

    segmentation = {
        "voxels": np.ascontiguousarray(values.transpose(2, 1, 0)),  # slicerio stores (I, J, K)
        "ijkToLPS": geometry.ijk_to_lps(),
        "encoding": "gzip",
        "segments": [{
            "id": "Segment_1", "labelValue": int(label_value), "layer": 0, "name": name,
            "color": list(color),
        }],
    }
    slicerio.write_segmentation(str(path), segmentation)


def read_label(path: str | os.PathLike) -> MedicalImage:
    """Read a label map or ``.seg.nrrd`` (its first layer, label values kept)."""
    path = Path(path)
    if path.name.lower().endswith(".seg.nrrd"):
        import slicerio

        if not path.exists():
            raise InputError(f"label not found: {path}")
        try:
            seg = slicerio.read_segmentation(str(path))
        except Exception as exc:  # noqa: BLE001 - slicerio/pynrrd raise many types for damaged files
            raise InputError(f"cannot read segmentation {path}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
        voxels = np.asarray(seg["voxels"])
        if voxels.ndim == 4:
            voxels = voxels[..., 0]
        geometry = VolumeGeometry.from_ijk_to_lps(np.asarray(seg["ijkToLPS"]), voxels.shape)
        return MedicalImage(np.ascontiguousarray(voxels.transpose(2, 1, 0)), geometry, source=str(path))
    return read_image(path)


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # ITK messages start with file/line noise; the useful part is usually the last line.
    return lines[-1] if lines else type(exc).__name__
