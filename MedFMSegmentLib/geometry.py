"""The one geometry convention of MedFMSegment, written once.

Conventions used everywhere in the library:

* Voxel arrays are indexed ``array[k, j, i]`` (shape ``(K, J, I)``), as SimpleITK's
  ``GetArrayFromImage`` and Slicer's ``arrayFromVolume`` return them.
* Prompts and voxel coordinates are ``(i, j, k)`` (column, row, slice), 0-based.
* Physical points are LPS (ITK, DICOM) or RAS (Slicer); ``RAS = diag(-1, -1, 1) @ LPS``.
* ``direction`` is the 3x3 LPS direction matrix whose *columns* are the unit vectors of the
  I, J and K voxel axes (ITK's ``GetDirection`` reshaped row-major).

Every conversion between these frames lives in this module and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

__all__ = ["LPS_RAS_FLIP", "ORIENTATIONS", "Orientation", "VolumeGeometry", "array_axis", "array_order", "axes_by_extent",
           "box_on_axis", "in_plane_axes", "lps_to_ras", "mirror_slice_columns", "plane_to_voxel_slice",
           "ras_lps_flip_4x4", "ras_to_lps", "roi_corners", "slice_from_volume", "slice_into_volume",
           "to_slice_coords", "voxel_axis_of", "voxel_order"]

#: Diagonal that flips between LPS and RAS (it is its own inverse).
LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0])

Orientation = Literal["axial", "coronal", "sagittal"]
ORIENTATIONS: tuple[str, ...] = ("axial", "coronal", "sagittal")
# The patient axis (in LPS, 0=L/R, 1=P/A, 2=S/I) that is normal to each slice orientation.
_NORMAL_PATIENT_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}


@dataclass(frozen=True)
class VolumeGeometry:
    """Voxel grid of an image: size, spacing, origin and direction, in ITK (LPS) terms.

    Attributes:
        size: Number of voxels along (I, J, K).
        spacing: Voxel size in mm along (I, J, K).
        origin: LPS position in mm of voxel (0, 0, 0).
        direction: 3x3 LPS direction matrix; column ``n`` is the unit vector of voxel axis ``n``.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray

    def __post_init__(self) -> None:
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError("size, spacing and origin must have three values (I, J, K)")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def identity(cls, size: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> "VolumeGeometry":
        """Axis-aligned grid at the origin (LPS identity direction)."""
        return cls(tuple(size), tuple(spacing), (0.0, 0.0, 0.0), np.eye(3))

    @classmethod
    def from_ijk_to_lps(cls, matrix: np.ndarray, size: Sequence[int]) -> "VolumeGeometry":
        """Build from a 4x4 homogeneous IJK -> LPS matrix."""
        matrix = np.asarray(matrix, dtype=float)
        linear = matrix[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if np.any(spacing <= 0):
            raise ValueError("IJK-to-LPS matrix has a zero-length axis")
        return cls(tuple(size), tuple(spacing), tuple(matrix[:3, 3]), linear / spacing)

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray, size: Sequence[int]) -> "VolumeGeometry":
        """Build from a 4x4 IJK -> RAS matrix as Slicer's ``GetIJKToRASMatrix`` gives it."""
        return cls.from_ijk_to_lps(ras_lps_flip_4x4() @ np.asarray(matrix, dtype=float), size)

    @classmethod
    def from_sitk(cls, image) -> "VolumeGeometry":
        """Read the grid of a 2D or 3D ``SimpleITK.Image`` (2D becomes a one-slice volume)."""
        dim = image.GetDimension()
        if dim == 3:
            return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(),
                       np.array(image.GetDirection()).reshape(3, 3))
        if dim == 2:
            direction = np.eye(3)
            direction[:2, :2] = np.array(image.GetDirection()).reshape(2, 2)
            return cls((*image.GetSize(), 1), (*image.GetSpacing(), 1.0), (*image.GetOrigin(), 0.0),
                       direction)
        raise ValueError(f"only 2D and 3D images have a volume geometry, got {dim}D")

    # ------------------------------------------------------------------ matrices
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(K, J, I)`` of a volume on this grid."""
        return array_order(self.size)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix taking homogeneous voxel indices (i, j, k, 1) to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        matrix[:3, 3] = self.origin
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix taking voxel indices to Slicer RAS mm (Slicer's ``IJKToRAS``)."""
        return ras_lps_flip_4x4() @ self.ijk_to_lps()

    @property
    def is_left_handed(self) -> bool:
        """True when the voxel axes form a left-handed frame (negative determinant)."""
        return bool(np.linalg.det(self.direction) < 0)

    # ------------------------------------------------------------------ points
    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel coordinates ``(..., 3)`` in (i, j, k) -> LPS points ``(..., 3)``."""
        return _apply(self.ijk_to_lps(), ijk)

    def lps_to_index(self, points: np.ndarray) -> np.ndarray:
        """LPS points ``(..., 3)`` -> continuous voxel coordinates (i, j, k)."""
        return _apply(np.linalg.inv(self.ijk_to_lps()), points)

    def index_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel coordinates (i, j, k) -> RAS points."""
        return _apply(self.ijk_to_ras(), ijk)

    def ras_to_index(self, points: np.ndarray) -> np.ndarray:
        """RAS points ``(..., 3)`` -> continuous voxel coordinates (i, j, k)."""
        return _apply(np.linalg.inv(self.ijk_to_ras()), points)

    def contains_index(self, ijk: Sequence[float]) -> bool:
        """Whether a voxel coordinate (i, j, k) lies inside the grid."""
        return all(0 <= float(v) <= n - 1 for v, n in zip(ijk, self.size))

    # ------------------------------------------------------------------ slicing axes
    def voxel_axis_for(self, orientation: str) -> int:
        """The voxel axis (0=I, 1=J, 2=K) closest to the normal of an anatomical slice orientation.

        For an oblique volume this is the voxel axis whose direction has the largest component
        along the patient axis normal to the requested slices (S for axial, A for coronal,
        L for sagittal), so that "axial" means "the stack of voxel planes nearest to axial".
        """
        if orientation not in _NORMAL_PATIENT_AXIS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        patient_axis = _NORMAL_PATIENT_AXIS[orientation]
        return int(np.argmax(np.abs(self.direction[patient_axis, :])))

    def same_grid(self, other: "VolumeGeometry", tolerance: float = 1e-4) -> bool:
        """Whether two grids are the same voxel for voxel (size exact, the rest within tolerance)."""
        return (self.size == other.size
                and np.allclose(self.spacing, other.spacing, atol=tolerance, rtol=tolerance)
                and np.allclose(self.origin, other.origin, atol=tolerance * max(1.0, *map(abs, self.origin)))
                and np.allclose(self.direction, other.direction, atol=tolerance))

    def describe_difference(self, other: "VolumeGeometry") -> str:
        """A short human-readable reason why two grids differ (empty when they match)."""
        for name in ("size", "spacing", "origin"):
            a, b = getattr(self, name), getattr(other, name)
            if not np.allclose(a, b, atol=1e-4, rtol=1e-4):
                return f"{name} {tuple(round(v, 4) for v in a)} != {tuple(round(v, 4) for v in b)}"
        if not np.allclose(self.direction, other.direction, atol=1e-4):
            return "direction matrices differ"
        return ""


def plane_to_voxel_slice(ijk_to_world: np.ndarray, size: Sequence[int], plane_to_world: np.ndarray,
                         max_tilt_degrees: float = 10.0) -> tuple[int, int] | None:
    """The voxel slice ``(voxel_axis, index)`` that a viewed plane shows, or None.

    Args:
        ijk_to_world: 4x4 voxel-index-to-world matrix of the volume (Slicer's IJKToRAS with any
            parent transform applied; any world frame works if both matrices use it).
        size: ``(I, J, K)`` voxel counts.
        plane_to_world: 4x4 matrix of the plane (Slicer's ``SliceToRAS``): column 2 is its
            normal, column 3 a point on it (the view's centre).
        max_tilt_degrees: A plane tilted further than this from every voxel plane shows no single
            voxel slice (None).

    Returns:
        The voxel axis the plane is normal to and the nearest slice index there, or None when the
        plane is oblique to the grid or its centre lies outside the volume along that axis.
    """
    ijk_to_world = np.asarray(ijk_to_world, dtype=float)
    plane_to_world = np.asarray(plane_to_world, dtype=float)
    normal = plane_to_world[:3, 2] / np.linalg.norm(plane_to_world[:3, 2])
    # A voxel plane's normal is along the inverse-transpose of the grid matrix, not the axis itself
    # (they differ on sheared grids); normalised rows of the inverse give those normals.
    world_to_ijk = np.linalg.inv(ijk_to_world)
    plane_normals = world_to_ijk[:3, :3] / np.linalg.norm(world_to_ijk[:3, :3], axis=1, keepdims=True)
    cosines = np.abs(plane_normals @ normal)
    voxel_axis = int(np.argmax(cosines))
    if cosines[voxel_axis] < np.cos(np.radians(max_tilt_degrees)):
        return None
    centre = world_to_ijk @ np.append(plane_to_world[:3, 3], 1.0)
    index = int(np.floor(centre[voxel_axis] + 0.5))
    if not 0 <= index < int(size[voxel_axis]):
        return None
    return voxel_axis, index


def ras_lps_flip_4x4() -> np.ndarray:
    """4x4 homogeneous form of :data:`LPS_RAS_FLIP`."""
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_RAS_FLIP
    return matrix


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """RAS points ``(..., 3)`` -> LPS (and, being an involution, LPS -> RAS)."""
    return np.asarray(points, dtype=float) @ LPS_RAS_FLIP


lps_to_ras = ras_to_lps


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


# ---------------------------------------------------------------------- array <-> slice views
def slice_from_volume(volume: np.ndarray, voxel_axis: int, index: int) -> np.ndarray:
    """One 2D slice of a ``(K, J, I)`` array, taken normal to a voxel axis.

    Args:
        volume: Array of shape ``(K, J, I)``.
        voxel_axis: 0 (I), 1 (J) or 2 (K): the axis the slice is normal to.
        index: Position along that axis.

    Returns:
        A 2D view with rows/columns ``(J, I)`` for K, ``(K, I)`` for J and ``(K, J)`` for I.
    """
    return volume[_slicer_tuple(voxel_axis, index)]


def slice_into_volume(volume: np.ndarray, voxel_axis: int, index: int, plane: np.ndarray) -> None:
    """Write a 2D plane (in :func:`slice_from_volume`'s layout) into a ``(K, J, I)`` array."""
    volume[_slicer_tuple(voxel_axis, index)] = plane


def _slicer_tuple(voxel_axis: int, index: int) -> tuple:
    key: list = [slice(None)] * 3
    key[array_axis(voxel_axis)] = index
    return tuple(key)


def in_plane_axes(voxel_axis: int) -> tuple[int, int]:
    """The voxel axes ``(row_axis, column_axis)`` of a slice normal to ``voxel_axis``."""
    return {2: (1, 0), 1: (2, 0), 0: (2, 1)}[voxel_axis]


def to_slice_coords(ijk: Sequence[float], voxel_axis: int) -> tuple[float, float, float]:
    """Voxel (i, j, k) -> ``(column, row, slice_index)`` for slices normal to ``voxel_axis``."""
    row_axis, col_axis = in_plane_axes(voxel_axis)
    return (ijk[col_axis], ijk[row_axis], ijk[voxel_axis])


def array_axis(voxel_axis: int) -> int:
    """The numpy axis of a ``(K, J, I)`` array that runs along ``voxel_axis`` (I is array axis 2)."""
    return 2 - voxel_axis


def voxel_axis_of(array_axis: int) -> int:
    """The voxel axis (0 = I) that numpy axis ``array_axis`` of a ``(K, J, I)`` array runs along."""
    return 2 - array_axis


def array_order(values: Sequence) -> tuple:
    """Values given per voxel axis, ``(I, J, K)`` (a size, a spacing), in numpy-axis order
    ``(K, J, I)``; two values ``(I, J)`` become ``(J, I)``."""
    return tuple(values)[::-1]


def voxel_order(values: Sequence) -> tuple:
    """Values given per numpy axis, ``(K, J, I)`` (an array's shape), in voxel-axis order ``(I, J, K)``."""
    return tuple(values)[::-1]


def mirror_slice_columns(array: np.ndarray, voxel_axis: int) -> np.ndarray:
    """A ``(K, J, I)`` array with the columns of every slice normal to ``voxel_axis`` reversed
    (a left-right flip within the slices; the grid is unchanged), as a contiguous copy."""
    _, column_axis = in_plane_axes(voxel_axis)
    return np.ascontiguousarray(np.flip(np.asarray(array), axis=array_axis(column_axis)))


def box_on_axis(box: Sequence[float], voxel_axis: int) -> tuple[tuple[float, float, float, float], int, int]:
    """A voxel box ``(i0, j0, k0, i1, j1, k1)`` seen along ``voxel_axis``: its in-plane rectangle
    ``(col0, row0, col1, row1)`` and its first and last slice index."""
    lower, upper = to_slice_coords(box[:3], voxel_axis), to_slice_coords(box[3:], voxel_axis)
    return (lower[0], lower[1], upper[0], upper[1]), int(lower[2]), int(upper[2])


def axes_by_extent(box: Sequence[float], spacing: Sequence[float]) -> tuple[int, int, int]:
    """Voxel axes of a 3D ``box`` (i0, j0, k0, i1, j1, k1) from its shortest to its longest physical
    side; equal sides (to 1e-6 mm) put the higher axis first."""
    extent = (np.asarray(box[3:], float) - np.asarray(box[:3], float) + 1) * np.asarray(spacing, float)
    shortest, middle, longest = sorted((2, 1, 0), key=lambda a: (round(float(extent[a]), 6), -a))
    return shortest, middle, longest


# ---------------------------------------------------------------------- regions of interest
def roi_corners(center: Sequence[float], size: Sequence[float], axes: np.ndarray | None = None) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of a box region of interest, in the frame of ``center``.

    Args:
        center: The box centre (3,).
        size: Its edge lengths (3,) along its own axes.
        axes: 3x3 matrix whose columns are the box's unit axes in that frame (a Slicer markups
            ROI's ``orientation``, read row-major); identity when None.
    """
    center = np.asarray(center, dtype=float).reshape(3)
    size = np.asarray(size, dtype=float).reshape(3)
    axes = np.eye(3) if axes is None else np.asarray(axes, dtype=float).reshape(3, 3)
    signs = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
    return center + (signs * size) @ axes.T
