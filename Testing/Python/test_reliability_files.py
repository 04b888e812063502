"""The shared file helpers: unique names, overlap checks, leftover sweeping, resume records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.files import (atomic_write_text, check_output_folder, is_own_temporary, new_sibling,
                                   refuse_overlap, safe_name, sweep_leftovers, temporary_name, unique_names)
from MedFMSegmentLib.records import record_matches, record_path, write_record


def test_unique_names_skip_suffixes_other_inputs_use():
    assert unique_names(["img", "img", "img_2"]) == ["img", "img_3", "img_2"]
    assert unique_names(["A", "a", "a_2", "a"]) == ["A", "a_3", "a_2", "a_4"]  # case-insensitive file systems


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["img", "img_2", "img_3", "IMG", "case", "case_2"]), max_size=12))
def test_unique_names_are_unique_and_deterministic(names):
    result = unique_names(names)
    assert len({n.lower() for n in result}) == len(result)
    assert result == unique_names(list(names))
    for index, name in enumerate(names):  # the first of each name keeps it
        if name.lower() not in {n.lower() for n in names[:index]}:
            assert result[index] == name


def test_safe_name_is_never_hidden_or_empty():
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("...") == "case" and safe_name("ünïcode name") == "n_code_name"


def test_refuse_overlap_resolves_symlinks(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.nii.gz").write_bytes(b"x")
    os.symlink(tmp_path / "in", tmp_path / "link")
    for output in (tmp_path / "in", tmp_path / "link", tmp_path / "link" / "sub" / "x.nii.gz"):
        with pytest.raises(InputError):
            refuse_overlap([output], [tmp_path / "in"])
    with pytest.raises(InputError, match="is the input"):
        refuse_overlap([tmp_path / "link" / "a.nii.gz"], [tmp_path / "in" / "a.nii.gz"])
    refuse_overlap([tmp_path / "out", tmp_path / "in.nii.gz"], [tmp_path / "in"])  # beside is fine


def test_check_output_folder(tmp_path):
    assert check_output_folder(tmp_path / "new" / "deeper").is_dir()
    (tmp_path / "file").write_text("mine")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(InputError, match="is a file"):
            check_output_folder(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "new"]
    assert list((tmp_path / "new" / "deeper").iterdir()) == []  # the write probe is removed


def test_temporary_names_give_back_their_target_writer_and_suffix(tmp_path):
    made = new_sibling(tmp_path / "case.1.nii.gz", suffix=".adapter-new", directory=True)
    assert temporary_name(made.name) == ("case.1.nii.gz", os.getpid(), ".adapter-new")
    for other in ("case.nii.gz", ".case.nii.gz.partial", ".case.12-0123456789a", ".case.x-0123456789ab"):
        assert temporary_name(other) is None, other


def test_sweep_removes_only_dead_writers_temporaries(tmp_path):
    live = new_sibling(tmp_path / "a.nii.gz", suffix=".partial.nii.gz")
    dead_file = tmp_path / f".b.nii.gz.{2 ** 22 + 7}-0123456789ab.partial.nii.gz"
    dead_dir = tmp_path / f".adapter.{2 ** 22 + 7}-0123456789ab"
    dead_file.write_bytes(b"")
    dead_dir.mkdir()
    kept = [tmp_path / ".b.nii.gz.partial", tmp_path / "notes.txt", tmp_path / ".x.123-nothex.partial"]
    for path in kept:
        path.write_text("not the tool's")
    assert is_own_temporary(live) and is_own_temporary(dead_file) and not any(map(is_own_temporary, kept))
    assert sweep_leftovers(tmp_path, ["other.nii.gz"]) == []
    assert sorted(sweep_leftovers(tmp_path)) == sorted([dead_file, dead_dir])
    assert live.exists() and all(p.exists() for p in kept)


def test_record_matches_only_the_same_provenance_and_intact_output(tmp_path):
    output = atomic_write_text(tmp_path / "case.nii.gz", "label")
    provenance = {"input": [{"path": "/x", "size": 3}], "prompts": {"box": (1, 2, 3, 4, 5, 6)}}
    write_record(output, provenance)
    assert record_path(output).name == ".case.nii.gz.medfmsegment.json"
    assert record_matches(output, provenance)
    assert not record_matches(output, {**provenance, "prompts": {"box": (1, 2, 3, 4, 5, 7)}})
    output.write_text("label, rewritten")
    assert not record_matches(output, provenance)
    record_path(output).write_text("{not json")
    assert not record_matches(output, provenance)
    assert not record_matches(Path(tmp_path / "missing.nii.gz"), provenance)
