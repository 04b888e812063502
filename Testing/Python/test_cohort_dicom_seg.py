"""DICOM SEG output: the real CT series (JPEG 2000, anonymised UIDs) and an oblique series with shuffled names.

A SEG read back (by its frames' positions, by highdicom per source instance, and by pydicom
through each frame's referenced instance) must land on exactly the voxels of the NIfTI written
from the same mask.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import dice, ellipsoid_mask, oblique_geometry, write_dicom_series
from MedFMSegmentLib.cli import main
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.io import find_dicom_series, mask_to_sitk, read_dicom_series, read_label, write_label

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from MedFMSegmentLib.cohort.dicom_seg import read_dicom_seg, segment_codes, write_dicom_seg  # noqa: E402

LIVER = 5  # TotalSegmentator v2 class id


@pytest.fixture(scope="module")
def ct(data_dir):
    """The real CT series, its GDCM-sorted files and TotalSegmentator's liver resampled onto its grid."""
    folder = data_dir / "ct_dicom_totalsegmentator" / "example_ct_dicom"
    (_, files), = find_dicom_series(folder)
    image = read_dicom_series(files, source=str(folder))
    reference = mask_to_sitk(np.zeros(image.geometry.shape, bool), image.geometry)
    seg = sitk.ReadImage(str(data_dir / "ct_dicom_totalsegmentator" / "example_seg_dicom.nii.gz"))
    classes = sitk.GetArrayFromImage(sitk.Resample(seg, reference, sitk.Transform(), sitk.sitkNearestNeighbor))
    return folder, files, image, classes == LIVER


def _instance_uids(files):
    return [str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID) for f in files]


def _by_referenced_instance(path, files) -> np.ndarray:
    """The SEG's frames placed through the SOP instance each one references (pydicom only)."""
    ds = pydicom.dcmread(path)
    uids = _instance_uids(files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    mask = np.zeros((len(files), first.Rows, first.Columns), bool)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        mask[uids.index(uid)] |= frame > 0
    return mask


def test_seg_of_the_real_ct_reads_back_onto_the_nifti_voxels(ct, tmp_path):
    _, files, image, liver = ct
    assert liver.sum() > 100_000 and len(np.flatnonzero(liver.any(axis=(1, 2)))) == 20
    nifti = read_label(write_label(liver, image.geometry, tmp_path / "liver.nii.gz")).array > 0
    path = write_dicom_seg(liver, image.geometry, files, tmp_path / "liver.dcm", segment_name="liver")
    assert np.array_equal(read_dicom_seg(path, image.geometry), nifti)
    assert np.array_equal(_by_referenced_instance(path, files), nifti)
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=_instance_uids(files), segment_numbers=[1])
    assert np.array_equal(pixels[..., 0] > 0, nifti)
    description = seg.SegmentSequence[0]
    assert description.SegmentLabel == "liver"
    assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED CT liver
    assert description.SegmentAlgorithmType == "SEMIAUTOMATIC"
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(_instance_uids(files))  # the source instances (their UIDs live in the file meta)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    again = write_dicom_seg(liver, image.geometry, files, tmp_path / "again.dcm", segment_name="liver")
    assert pydicom.dcmread(again).ReferencedSeriesSequence[0].SeriesInstanceUID == \
        seg.ReferencedSeriesSequence[0].SeriesInstanceUID  # blank source UIDs are filled the same way each run
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_oblique_series_with_shuffled_file_names(tmp_path):
    geometry = oblique_geometry(size=(40, 34, 7), spacing=(0.8, 0.9, 2.5), left_handed=False)
    truth = ellipsoid_mask(geometry.shape, (3, 15, 22), (2.2, 8, 11))
    truth[0, :4, :5] = True  # asymmetric: a misplaced slice or a flipped axis shows
    volume = mask_to_sitk(truth, geometry)
    write_dicom_series(sitk.Cast(volume, sitk.sitkInt16) * 300, tmp_path / "series", shuffle_names=True)
    (_, files), = find_dicom_series(tmp_path / "series")
    image = read_dicom_series(files)
    assert image.geometry.same_grid(geometry, tolerance=1e-3)
    path = write_dicom_seg(truth, image.geometry, files, tmp_path / "seg.dcm", segment_name="Segment_1",
                           adapter_metadata={"automatic": True, "segmented_property_type": {
                               "value": "5366008", "scheme": "SCT", "meaning": "Hippocampus"}})
    assert np.array_equal(read_dicom_seg(path, image.geometry), truth)
    assert np.array_equal(_by_referenced_instance(path, files), truth)
    seg = hd.seg.segread(path)
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Hippocampus"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    shifted = dataclasses.replace(image.geometry, origin=tuple(np.asarray(image.geometry.origin) + 1.0))
    with pytest.raises(InputError, match="off the image's grid|differs"):
        read_dicom_seg(path, shifted)
    with pytest.raises(InputError, match="does not lie on slice"):
        write_dicom_seg(truth, shifted, files, tmp_path / "bad.dcm")
    assert not (tmp_path / "bad.dcm").exists()


def test_generic_and_named_codes():
    category, kind = segment_codes("Segment_1")
    assert (category.meaning, kind.meaning) == ("Tissue", "Tissue")
    category, kind = segment_codes("spleen")
    assert (category.meaning, kind.value) == ("Anatomical Structure", "78961009")


def _box_prompts(ct, tmp_path):
    folder, _, _, liver = ct
    k = 10
    j, i = np.nonzero(liver[k])
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({folder.name: {"box": [int(i.min()), int(j.min()), k, int(i.max()), int(j.max()), k]}}))
    return path


def test_batch_format_dcm_matches_the_nifti_batch_and_resumes(ct, tmp_path, capsys):
    folder, _, image, liver = ct
    prompts = _box_prompts(ct, tmp_path)
    common = [str(folder), "--prompts", str(prompts), "--device", "cpu"]
    assert main(["batch", *common, "-o", str(tmp_path / "nii")]) == 0
    assert main(["batch", *common, "-o", str(tmp_path / "dcm"), "--format", "dcm", "--report"]) == 0
    nifti = read_label(tmp_path / "nii" / f"{folder.name}.nii.gz").array > 0
    seg_path = tmp_path / "dcm" / f"{folder.name}.dcm"
    dcm = read_dicom_seg(seg_path, image.geometry)
    assert nifti[10].sum() > 1000 and np.array_equal(dcm, nifti)
    assert dice(dcm[10], liver[10]) > 0.8  # the liver, roughly as TotalSegmentator has it
    report = (tmp_path / "dcm" / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in report and folder.name in report
    before = seg_path.stat().st_mtime_ns
    assert main(["batch", *common, "-o", str(tmp_path / "dcm"), "--format", "dcm", "--resume"]) == 0
    assert [r["status"] for r in csv.DictReader((tmp_path / "dcm" / "summary.csv").open())] == ["skipped"]
    assert seg_path.stat().st_mtime_ns == before


def test_format_dcm_refuses_other_inputs_before_the_model_loads(data_dir, tmp_path, capsys):
    nifti = sorted((data_dir / "msd_hippocampus_mri" / "imagesTr").glob("*.nii.gz"))[0]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({nifti.name: {"box": [5, 5, 10, 20, 20, 10]}}))
    code = main(["batch", str(nifti), "-o", str(tmp_path / "out"), "--prompts", str(prompts), "--format", "dcm",
                 "--checkpoint", str(tmp_path / "no_such_checkpoint.pth")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs DICOM series" in err[0] and nifti.name in err[0]  # not the checkpoint
    assert not (tmp_path / "out").exists()
