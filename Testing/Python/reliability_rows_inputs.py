"""Matrix rows about inputs: damaged, truncated, sheared, non-finite, DICOM, prompts, payloads."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from reliability_support import BOX, Expect, row, truncate, volume_image, write_series, write_volume


def seg(image: Path, out: Path, *extra: str, box=BOX) -> list[str]:
    """``segment`` arguments on the CPU with PyTorch and a one-slice box."""
    return ["segment", str(image), "-o", str(out), "--device", "cpu", "--backend", "torch",
            *(["--box", *map(str, box)] if box else []), *extra]


# ---------------------------------------------------------------------------- 4: truncated NIfTI
@row("truncated_nii_gz", "4", "a .nii.gz cut short is refused (SimpleITK would read the rest as zeros)")
def _(tmp: Path) -> Expect:
    return Expect(seg(truncate(write_volume(tmp / "in.nii.gz")), tmp / "out.nii.gz"), message="truncated")


@row("truncated_nii", "4", "an uncompressed .nii shorter than its header says is refused")
def _(tmp: Path) -> Expect:
    return Expect(seg(truncate(write_volume(tmp / "in.nii"), 0.8), tmp / "out.nii.gz"), message="truncated")


@row("damaged_gzip_stream", "4", "a .nii.gz with one byte changed inside the stream (CRC) is refused")
def _(tmp: Path) -> Expect:
    path = write_volume(tmp / "in.nii.gz")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return Expect(seg(path, tmp / "out.nii.gz"), message="damaged")


@row("evaluate_truncated_label", "4", "evaluate refuses a truncated label or prediction")
def _(tmp: Path) -> Expect:
    good = write_volume(tmp / "pred.nii.gz")
    bad = truncate(write_volume(tmp / "label.nii.gz"))
    return Expect(["evaluate", "--prediction", str(good), "--label", str(bad)], message="truncated")


# ---------------------------------------------------------------------------- 5: DICOM
@row("dicom_corrupt_middle_slice", "5", "a series with one unreadable slice is refused, naming the file")
def _(tmp: Path) -> Expect:
    folder = write_series(tmp / "series")
    (folder / "IM0004.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    return Expect(seg(folder, tmp / "out.nii.gz"), message="IM0004.dcm")


@row("dicom_corrupt_last_slice", "5", "an unreadable end slice is refused too (spacing alone cannot show it)")
def _(tmp: Path) -> Expect:
    folder = write_series(tmp / "series")
    (folder / "IM0007.dcm").write_bytes(b"")
    return Expect(seg(folder, tmp / "out.nii.gz"), message="cannot be read as part of a series")


@row("dicom_missing_slice", "5", "a series with a slice missing (unevenly spaced) is refused, not stretched")
def _(tmp: Path) -> Expect:
    folder = write_series(tmp / "series")
    (folder / "IM0003.dcm").unlink()
    return Expect(seg(folder, tmp / "out.nii.gz"), message="not evenly spaced")


@row("dicom_two_series", "5", "a folder holding two series is an error naming both")
def _(tmp: Path) -> Expect:
    write_series(tmp / "study", uid="1.2.3.4.100", prefix="A")
    write_series(tmp / "study", uid="1.2.3.4.200", prefix="B", depth=6, spacing=3.0)
    return Expect(seg(tmp / "study", tmp / "out.nii.gz"), message="1.2.3.4.200")


@row("dicom_series_chosen", "5", "--series picks one of two series; the label lies on that series' grid")
def _(tmp: Path) -> Expect:
    write_series(tmp / "study", uid="1.2.3.4.100", prefix="A")
    write_series(tmp / "study", uid="1.2.3.4.200", prefix="B", depth=6, spacing=3.0)

    def check(tmp: Path, out: str) -> None:
        from MedFMSegmentLib.io import read_image, read_label

        label, image = read_label(tmp / "out.nii.gz"), read_image(tmp / "study", series="200")
        assert label.geometry.same_grid(image.geometry, 1e-4) and label.array.shape == (6, 40, 48)
        assert label.array[1].any()

    return Expect(seg(tmp / "study", tmp / "out.nii.gz", "--series", "1.2.3.4.200"), code=0, message="wrote",
                  creates={"out.nii.gz"}, check=check)


# ---------------------------------------------------------------------------- 9: directions
@row("non_orthonormal_direction", "9", "a sheared (non-orthonormal) direction is refused with a clear line")
def _(tmp: Path) -> Expect:
    path = write_volume(tmp / "in.mha", direction=[[1, 0.2, 0], [0, 1, 0], [0, 0, 1]])
    return Expect(seg(path, tmp / "out.nii.gz"), message="non-orthonormal")


@row("sheared_nifti_sform", "9", "a NIfTI whose sform is sheared (ITK would coerce it) is refused")
def _(tmp: Path) -> Expect:
    path = write_volume(tmp / "in.nii")
    data = bytearray(path.read_bytes())
    data[254:256] = struct.pack("<h", 1)
    data[280:328] = struct.pack("<12f", 0.9, 0.3, 0, -10, 0, 0.9, 0, 5, 0, 0, 2.0, 2)
    path.write_bytes(bytes(data))
    return Expect(seg(path, tmp / "out.nii.gz"), message="non-orthonormal")


# ---------------------------------------------------------------------------- 10 / 12: numbers
@row("nan_box", "10", "NaN in --box is refused before anything is read")
def _(tmp: Path) -> Expect:
    return Expect(seg(write_volume(tmp / "in.nii.gz"), tmp / "out.nii.gz", box=["nan", 0, 0, 5, 5, 1]),
                  message="finite")


@row("inf_box", "10", "an infinite --box corner (1e400) is refused")
def _(tmp: Path) -> Expect:
    return Expect(seg(write_volume(tmp / "in.nii.gz"), tmp / "out.nii.gz", box=[0, 0, 0, "1e400", 5, 1]),
                  message="finite")


def _image_with(tmp: Path, value: float) -> Path:
    image = volume_image()
    array = sitk.GetArrayFromImage(image)
    array[1, 3, 4] = value
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(tmp / "in.nrrd"))  # ITK's NIfTI writer drops NaN; NRRD keeps it
    return tmp / "in.nrrd"


@row("nan_image", "12", "an image holding NaN voxels is refused")
def _(tmp: Path) -> Expect:
    return Expect(seg(_image_with(tmp, np.nan), tmp / "out.nii.gz"), message="NaN")


@row("inf_image", "12", "an image holding infinite voxels is refused")
def _(tmp: Path) -> Expect:
    return Expect(seg(_image_with(tmp, np.inf), tmp / "out.nii.gz"), message="NaN or infinite")


# ---------------------------------------------------------------------------- cases that held
@row("missing_file", "holds", "a missing input")
def _(tmp: Path) -> Expect:
    return Expect(seg(tmp / "missing.nii.gz", tmp / "out.nii.gz"), message="input not found")


@row("empty_file", "holds", "an empty (0-byte) input")
def _(tmp: Path) -> Expect:
    (tmp / "in.nii.gz").write_bytes(b"")
    return Expect(seg(tmp / "in.nii.gz", tmp / "out.nii.gz"), message="empty")


@row("random_bytes_nii_gz", "holds", "random bytes named .nii.gz")
def _(tmp: Path) -> Expect:
    (tmp / "in.nii.gz").write_bytes(np.random.default_rng(1).bytes(5000))
    return Expect(seg(tmp / "in.nii.gz", tmp / "out.nii.gz"), message="cannot read")


@row("random_bytes_nrrd", "holds", "random bytes named .nrrd")
def _(tmp: Path) -> Expect:
    (tmp / "in.nrrd").write_bytes(np.random.default_rng(2).bytes(5000))
    return Expect(seg(tmp / "in.nrrd", tmp / "out.nii.gz"), message="cannot read")


@row("four_d_image", "holds", "a 4D image")
def _(tmp: Path) -> Expect:
    sitk.WriteImage(sitk.Image([4, 4, 4, 2], sitk.sitkFloat32), str(tmp / "in.nii.gz"))
    return Expect(seg(tmp / "in.nii.gz", tmp / "out.nii.gz"), message="4D")


@row("vector_image", "holds", "a vector-valued volume")
def _(tmp: Path) -> Expect:
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorFloat32, 3), str(tmp / "in.nrrd"))
    return Expect(seg(tmp / "in.nrrd", tmp / "out.nii.gz"), message="components")


@row("huge_nifti_header", "holds", "a NIfTI header claiming 10^15 voxels is refused before any allocation")
def _(tmp: Path) -> Expect:
    path = write_volume(tmp / "in.nii")
    data = bytearray(path.read_bytes())
    data[40:56] = struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)
    path.write_bytes(bytes(data))
    return Expect(seg(path, tmp / "out.nii.gz"), message="truncated")


@row("huge_mha_header", "holds", "an MHA header claiming 10^15 voxels is refused before any allocation")
def _(tmp: Path) -> Expect:
    header = ("ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_FLOAT\n"
              "ElementDataFile = LOCAL\n")
    (tmp / "in.mha").write_bytes(header.encode() + bytes(64))
    return Expect(seg(tmp / "in.mha", tmp / "out.nii.gz"), message="claims")


@row("box_outside", "holds", "a box outside the image")
def _(tmp: Path) -> Expect:
    return Expect(seg(write_volume(tmp / "in.nii.gz"), tmp / "out.nii.gz", box=[0, 0, 0, 200, 5, 1]),
                  message="outside the image")


@row("box_inverted", "holds", "an inverted box")
def _(tmp: Path) -> Expect:
    return Expect(seg(write_volume(tmp / "in.nii.gz"), tmp / "out.nii.gz", box=[20, 0, 0, 5, 5, 1]),
                  message="inverted box")


@row("click_outside", "holds", "a click outside the image")
def _(tmp: Path) -> Expect:
    return Expect(seg(write_volume(tmp / "in.nii.gz"), tmp / "out.nii.gz", "--point", "1", "1", "9", box=None),
                  message="outside the image")


@row("unsupported_output_format", "holds", "an output extension no writer knows")
def _(tmp: Path) -> Expect:
    return Expect(seg(write_volume(tmp / "in.nii.gz"), tmp / "out.txt"), message="unsupported output format")


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@row("checkpoint_pickle_payload", "holds", "a --checkpoint holding a pickle payload is refused; it never runs")
def _(tmp: Path) -> Expect:
    (tmp / "evil.pth").write_bytes(pickle.dumps({"model": _Payload(tmp / "pwned")}, protocol=2))

    def check(tmp: Path, out: str) -> None:
        assert not (tmp / "pwned").exists()

    return Expect(seg(write_volume(tmp / "in.nii.gz"), tmp / "out.nii.gz", "--checkpoint", str(tmp / "evil.pth")),
                  message="cannot load checkpoint", check=check)


@row("adapter_pickle_payload", "holds", "an adapter whose weights file is a pickle payload: it never runs")
def _(tmp: Path) -> Expect:
    import json

    from MedFMSegmentLib.models import file_sha256, litemedsam_weights_path

    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter.safetensors").write_bytes(pickle.dumps(_Payload(tmp / "pwned"), protocol=2))
    (adapter / "metadata.json").write_text(json.dumps(
        {"base_model": {"name": "litemedsam", "sha256": file_sha256(litemedsam_weights_path())}, "lora": None}))

    def check(tmp: Path, out: str) -> None:
        assert not (tmp / "pwned").exists()

    return Expect(seg(write_volume(tmp / "in.nii.gz"), tmp / "out.nii.gz", "--adapter", str(adapter)),
                  code=(1, 2), check=check)


@row("prompts_file_not_an_object", "holds", "a --prompts file that is not a JSON object")
def _(tmp: Path) -> Expect:
    write_volume(tmp / "in.nii.gz")
    (tmp / "p.json").write_text("[1, 2]")
    return Expect(["batch", str(tmp / "in.nii.gz"), "-o", str(tmp / "out"), "--prompts", str(tmp / "p.json")],
                  message="must hold a JSON object")
