"""The panel's batch outputs on real MRML (slicer-core): every format of the library's batch,
DICOM SEG of a real CT series included, read back voxel for voxel."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="MRML classes (pip package slicer-core) are not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes (install slicer-core)", allow_module_level=True)

from MedFMSegmentLib import slicer_bridge as bridge  # noqa: E402
from MedFMSegmentLib.batch import OUTPUT_FORMATS  # noqa: E402
from MedFMSegmentLib.errors import InputError  # noqa: E402
from MedFMSegmentLib.io import find_dicom_series, read_dicom_series, read_image, read_label  # noqa: E402
from MedFMSegmentLib.slicer_bridge.outputs import (SCENE, dicom_files_of, output_choices, output_paths,  # noqa: E402
                                                   write_output)


def test_the_panel_offers_every_batch_format_of_the_library():
    choices = output_choices()
    assert [name for name, _ in choices] == [SCENE, *OUTPUT_FORMATS] and "dcm" in OUTPUT_FORMATS
    assert all(label for _, label in choices)


@pytest.fixture()
def hippo_node(data_dir):
    name = "hippocampus_001.nii.gz"
    image = read_image(data_dir / "msd_hippocampus_mri" / "imagesTr" / name)
    label = read_label(data_dir / "msd_hippocampus_mri" / "labelsTr" / name).array > 0
    scene = slicer.vtkMRMLScene()
    return scene, bridge.image_to_volume_node(image, scene, "hippo 1"), label


@pytest.mark.parametrize("fmt", [f for f in OUTPUT_FORMATS if f != "dcm"])
def test_label_map_formats_read_back_on_the_volume_grid(hippo_node, tmp_path, fmt):
    scene, volume, label = hippo_node
    twin = bridge.image_to_volume_node(bridge.volume_node_to_image(volume), scene, "hippo 1")
    paths = output_paths([volume, twin], tmp_path, fmt)
    assert [p.name for p in paths] == [f"hippo_1.{fmt}", f"hippo_1_2.{fmt}"]
    write_output(label, volume, paths[0], fmt, segment_name="hippocampus")
    back = read_label(paths[0])
    np.testing.assert_array_equal(back.array > 0, label)
    assert back.geometry.same_grid(bridge.volume_geometry(volume))
    with pytest.raises(InputError, match="exists"):
        output_paths([volume], tmp_path, fmt)
    before = paths[0].read_bytes()
    with pytest.raises(InputError, match="exists"):
        write_output(~label, volume, paths[0], fmt)
    assert paths[0].read_bytes() == before
    with pytest.raises(InputError, match="output folder"):
        output_paths([volume], tmp_path / "missing", fmt)


def test_dicom_seg_of_a_volume_loaded_from_dicom(data_dir, tmp_path):
    """The volume node carries its instance UIDs as Slicer's DICOM loader sets them; the lookup
    from UID to file (Slicer's DICOM database in the module) is built from the real files here."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from MedFMSegmentLib.cohort.dicom_seg import read_dicom_seg

    folder = data_dir / "ct_dicom_totalsegmentator" / "example_ct_dicom"
    (_, files), = find_dicom_series(folder)
    image = read_dicom_series(files, source=str(folder))
    scene = slicer.vtkMRMLScene()
    volume = bridge.image_to_volume_node(image, scene, "CT")
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID): f for f in files}
    with pytest.raises(InputError, match="loaded from DICOM"):
        dicom_files_of(volume, uids.get)
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(reversed(list(uids))))
    assert dicom_files_of(volume, uids.get) == [str(f) for f in files]  # the series order, whatever the UIDs' order
    mask = np.asarray(image.array) > 100
    path = output_paths([volume], tmp_path, "dcm")[0]
    write_output(mask, volume, path, "dcm", segment_name="bone", dicom_lookup=uids.get)
    np.testing.assert_array_equal(read_dicom_seg(path, image.geometry), mask)
    missing = dict(uids)
    missing[next(iter(missing))] = str(tmp_path / "gone.dcm")
    with pytest.raises(InputError, match="no longer on disk"):
        dicom_files_of(volume, missing.get)
