"""Matrix rows about outputs: never onto an input, checked before the model, unique, resumable."""

from __future__ import annotations

import csv
import functools
import json
import os
from pathlib import Path

from reliability_rows_inputs import seg
from reliability_support import BOX, Expect, prompts_for, row, truncate, write_volume

RECORD = ".{}.medfmsegment.json"


def batch(inputs: list[Path], out: Path, prompts: Path, *extra: str) -> list[str]:
    """``batch`` arguments on the CPU with PyTorch."""
    return ["batch", *map(str, inputs), "-o", str(out), "--prompts", str(prompts), "--device", "cpu",
            "--backend", "torch", *extra]


def outputs(folder: str, names: list[str]) -> set[str]:
    """The entries a batch creates: the folder, summary.csv, each label and its resume record."""
    created = {folder, f"{folder}/summary.csv"}
    for name in names:
        created |= {f"{folder}/{name}", f"{folder}/{RECORD.format(name)}"}
    return created


def summary(tmp: Path, folder: str = "out") -> list[dict]:
    return list(csv.DictReader((tmp / folder / "summary.csv").open()))


@functools.lru_cache(maxsize=1)
def tiny_model():
    from MedFMSegmentLib.models import tiny_random_model_for_tests

    return tiny_random_model_for_tests()


def tiny_batch(inputs: list[Path], out: Path, prompts: dict, resume: bool = True):
    """``run_batch`` with the tiny random network (resume plumbing only, not accuracy)."""
    from MedFMSegmentLib.batch import BatchSettings, run_batch
    from MedFMSegmentLib.prompts import Prompts

    table = {str(k): Prompts.from_dict(v) for k, v in prompts.items()}
    settings = BatchSettings(device="cpu", resume=resume, prompts=table)
    return [r.status for r in run_batch(inputs, out, settings, model=tiny_model())]


# ---------------------------------------------------------------------------- 1, 2: never onto an input
def _study(tmp: Path) -> tuple[Path, Path]:
    image = write_volume(tmp / "in" / "a.nii.gz")
    return image, prompts_for(tmp / "p.json", {"a.nii.gz": {"box": BOX}})


@row("batch_output_is_input_folder", "1", "batch in/ -o in/ is refused (it replaced every input with its mask)")
def _(tmp: Path) -> Expect:
    _, prompts = _study(tmp)
    return Expect(batch([tmp / "in"], tmp / "in", prompts), message="is the input")


@row("batch_output_symlink_to_input", "1", "an output folder that is a symlink to the input folder is refused")
def _(tmp: Path) -> Expect:
    _, prompts = _study(tmp)
    os.symlink(tmp / "in", tmp / "link")
    return Expect(batch([tmp / "in"], tmp / "link", prompts), message="is the input")


@row("batch_output_inside_input", "1", "an output folder inside an input folder is refused")
def _(tmp: Path) -> Expect:
    _, prompts = _study(tmp)
    return Expect(batch([tmp / "in"], tmp / "in" / "masks", prompts), message="inside the input folder")


@row("batch_output_named_like_input", "1", "batch in/a.nii.gz -o in/ (the output would be the input file) is refused")
def _(tmp: Path) -> Expect:
    image, prompts = _study(tmp)
    return Expect(batch([image], tmp / "in", prompts), message="is the input")


@row("segment_output_is_input", "2", "segment a.nii.gz -o a.nii.gz is refused")
def _(tmp: Path) -> Expect:
    image = write_volume(tmp / "a.nii.gz")
    return Expect(seg(image, image), message="is the input")


@row("segment_output_symlink_to_input", "2", "an output path that is a symlink to the input is refused")
def _(tmp: Path) -> Expect:
    image = write_volume(tmp / "a.nii.gz")
    os.symlink(image, tmp / "b.nii.gz")
    return Expect(seg(image, tmp / "b.nii.gz"), message="is the input")


# ---------------------------------------------------------------------------- 3: unique names
@row("batch_names_never_collide", "3", "a/img b/img c/img_2 get three distinct outputs and summary rows")
def _(tmp: Path) -> Expect:
    inputs = [write_volume(tmp / d / n, seed=s) for d, n, s in (("a", "img.nii.gz", 0), ("b", "img.nii.gz", 1),
                                                                ("c", "img_2.nii.gz", 2))]
    prompts = prompts_for(tmp / "p.json", {str(p): {"box": BOX} for p in inputs})
    names = ["img.nii.gz", "img_3.nii.gz", "img_2.nii.gz"]

    def check(tmp: Path, out: str) -> None:
        rows = summary(tmp)
        assert [Path(r["output"]).name for r in rows] == names
        assert [r["input"] for r in rows] == [str(p) for p in inputs]

    return Expect(batch(inputs, tmp / "out", prompts), code=0, message="3 of 3 cases done",
                  creates=outputs("out", names), check=check)


# ---------------------------------------------------------------------------- 6: one bad prompt, one failed case
@row("batch_malformed_prompts_fail_only_their_case", "6",
     "ROI without size, markups not a list, a 1e400 box: those cases fail, the last one runs")
def _(tmp: Path) -> Expect:
    inputs = [write_volume(tmp / "in" / f"{n}.nii.gz", seed=k) for k, n in enumerate("abcd")]
    (tmp / "roi.mrk.json").write_text(json.dumps({"markups": [{"type": "ROI", "center": [0, 0, 0]}]}))
    (tmp / "bad.mrk.json").write_text(json.dumps({"markups": {"type": "ROI"}}))
    (tmp / "p.json").write_text('{"a.nii.gz": "roi.mrk.json", "b.nii.gz": "bad.mrk.json", '
                                '"c.nii.gz": {"box": [1e400, 0, 0, 5, 5, 1]}, "d.nii.gz": {"box": %s}}'
                                % json.dumps(BOX))

    def check(tmp: Path, out: str) -> None:
        rows = summary(tmp)
        assert [r["status"] for r in rows] == ["failed", "failed", "failed", "ok"]
        assert "size" in rows[0]["error"] and "must be a list" in rows[1]["error"]
        assert "finite" in rows[2]["error"]

    return Expect(batch(inputs, tmp / "out", tmp / "p.json"), code=1, message="1 of 4 cases done",
                  creates=outputs("out", ["d.nii.gz"]), check=check)


# ---------------------------------------------------------------------------- 7: resume from records
@row("resume_reordered_inputs_rerun", "7", "--resume after reordering inputs whose names swap re-runs both")
def _(tmp: Path) -> Expect:
    x, y = write_volume(tmp / "x" / "img.nii.gz", seed=0), write_volume(tmp / "y" / "img.nii.gz", seed=1)
    prompts = {x: {"box": BOX}, y: {"box": BOX}}

    def call() -> int:
        assert tiny_batch([x, y], tmp / "out", prompts) == ["ok", "ok"]
        assert tiny_batch([x, y], tmp / "out", prompts) == ["skipped", "skipped"]
        assert tiny_batch([y, x], tmp / "out", prompts) == ["ok", "ok"]
        record = json.loads((tmp / "out" / RECORD.format("img.nii.gz")).read_text(encoding="utf-8"))
        assert record["provenance"]["input"][0]["path"] == os.path.realpath(y)
        return 0

    return Expect(call=call, code=0, creates=outputs("out", ["img.nii.gz", "img_2.nii.gz"]))


@row("resume_changed_prompts_or_damaged_output_rerun", "7",
     "--resume re-runs a case whose prompts changed or whose output was truncated; without its record it is left alone")
def _(tmp: Path) -> Expect:
    image = write_volume(tmp / "a.nii.gz")
    other = [BOX[0] + 2, *BOX[1:]]

    def call() -> int:
        out = tmp / "out"
        assert tiny_batch([image], out, {image: {"box": BOX}}) == ["ok"]
        assert tiny_batch([image], out, {image: {"box": other}}) == ["ok"]
        assert tiny_batch([image], out, {image: {"box": other}}) == ["skipped"]
        truncate(out / "a.nii.gz")
        assert tiny_batch([image], out, {image: {"box": other}}) == ["ok"]
        assert tiny_batch([image], out, {image: {"box": other}}) == ["skipped"]
        from MedFMSegmentLib.io import read_label

        assert read_label(out / "a.nii.gz").array.shape == (3, 40, 48)
        before = (out / "a.nii.gz").read_bytes()
        (out / RECORD.format("a.nii.gz")).unlink()  # now nothing says this file is the tool's
        assert tiny_batch([image], out, {image: {"box": other}}) == ["failed"]
        assert (out / "a.nii.gz").read_bytes() == before
        return 0

    return Expect(call=call, code=0, creates=outputs("out", ["a.nii.gz"]) - {f"out/{RECORD.format('a.nii.gz')}"})


# ---------------------------------------------------------------------------- 10: output checks first
@row("output_is_a_folder", "10", "an output path that is a folder is refused before the model loads")
def _(tmp: Path) -> Expect:
    (tmp / "out.nii.gz").mkdir()
    # sam_vit_b without --checkpoint would fail in loading: the output check must come first.
    return Expect(seg(write_volume(tmp / "in.nii.gz"), tmp / "out.nii.gz", "--model", "sam_vit_b"),
                  message="is a folder")


@row("output_parent_is_a_file", "10", "an output whose parent is a file is refused before the model loads")
def _(tmp: Path) -> Expect:
    (tmp / "notes.txt").write_text("mine")
    return Expect(seg(write_volume(tmp / "in.nii.gz"), tmp / "notes.txt" / "out.nii.gz", "--model", "sam_vit_b"),
                  message="is a file")


@row("batch_output_is_a_file", "10", "batch -o FILE is refused before the model loads")
def _(tmp: Path) -> Expect:
    image, prompts = _study(tmp)
    (tmp / "notes.txt").write_text("mine")
    return Expect(batch([image], tmp / "notes.txt", prompts, "--model", "sam_vit_b"), message="is a file")


@row("demo_output_is_a_file", "10", "demo -o FILE is refused with one line")
def _(tmp: Path) -> Expect:
    (tmp / "notes.txt").write_text("mine")
    return Expect(["demo", "-o", str(tmp / "notes.txt"), "--device", "cpu"], message="is a file")


# ---------------------------------------------------------------------------- 11, 12: what a run leaves
@row("mhd_output_leaves_no_hidden_raw", "11", ".mhd output: exactly NAME.mhd and NAME.raw, no hidden .partial.raw")
def _(tmp: Path) -> Expect:
    image = write_volume(tmp / "in.nii.gz")

    def check(tmp: Path, out: str) -> None:
        from MedFMSegmentLib.io import read_image, read_label

        label = read_label(tmp / "out.mhd")
        assert label.geometry.same_grid(read_image(image).geometry) and label.array[1].any()
        assert "ElementDataFile = out.raw" in (tmp / "out.mhd").read_text(encoding="utf-8")

    return Expect(seg(image, tmp / "out.mhd"), code=0, message="wrote", creates={"out.mhd", "out.raw"}, check=check)


@row("killed_run_leftovers_swept", "12",
     "a dead writer's temporaries (0-byte or not) are swept; live writers' and other files are kept")
def _(tmp: Path) -> Expect:
    image = write_volume(tmp / "a.nii.gz")
    out = tmp / "out"
    out.mkdir()
    dead = 2 ** 22 + 4321  # above Linux's largest pid: no such process
    (out / f".a.nii.gz.{dead}-0123456789ab.partial.nii.gz").write_bytes(b"")
    (out / f".summary.csv.{dead}-abcdefabcdef.partial").write_text("input,output\nhalf")
    (out / f".b.nii.gz.{os.getpid()}-00000000aaaa.partial.nii.gz").write_bytes(b"live")
    (out / "notes.txt").write_text("the user's")
    (out / ".mine.partial").write_text("the user's")
    swept = {f"out/.a.nii.gz.{dead}-0123456789ab.partial.nii.gz", f"out/.summary.csv.{dead}-abcdefabcdef.partial"}

    def call() -> int:
        assert tiny_batch([image], out, {image: {"box": BOX}}) == ["ok"]
        return 0

    def check(tmp: Path, _: str) -> None:
        assert not any((tmp / p).exists() for p in swept)

    return Expect(call=call, code=0, changes=swept, check=check,
                  creates=outputs("out", ["a.nii.gz"]) - {"out"})


@row("output_folder_not_writable", "10", "an output folder nobody may write in (even root: /sys) is refused first")
def _(tmp: Path) -> Expect:
    target = Path("/sys") if os.path.isdir("/sys") else Path("/proc")
    return Expect(seg(write_volume(tmp / "in.nii.gz"), target / "out.nii.gz", "--model", "sam_vit_b"),
                  message="cannot write in output folder")


@row("batch_never_replaces_a_file_it_did_not_write", "principle",
     "a file in the output folder that no batch run wrote (no record) is never replaced; only its case fails")
def _(tmp: Path) -> Expect:
    image = write_volume(tmp / "in" / "a.nii.gz")
    second = write_volume(tmp / "in" / "b.nii.gz", seed=3)
    (tmp / "out").mkdir()
    (tmp / "out" / "a.nii.gz").write_bytes(b"the user's own a.nii.gz")
    results: list[str] = []

    def call() -> int:
        results.extend(tiny_batch([image, second], tmp / "out", {image: {"box": BOX}, second: {"box": BOX}},
                                  resume=False))
        return 0

    def check(tmp: Path, out: str) -> None:
        assert results == ["failed", "ok"]
        assert "not written by a batch run" in summary(tmp)[0]["error"]

    return Expect(call=call, code=0, check=check, creates=outputs("out", ["b.nii.gz"]) - {"out"})


@row("resume_other_model_reruns", "7", "--resume re-runs every case when the model's weights differ from the record's")
def _(tmp: Path) -> Expect:
    from MedFMSegmentLib.batch import BatchSettings, run_batch
    from MedFMSegmentLib.models import tiny_random_model_for_tests
    from MedFMSegmentLib.prompts import Prompts

    image = write_volume(tmp / "a.nii.gz")
    settings = BatchSettings(device="cpu", resume=True, prompts={str(image): Prompts(box=tuple(BOX))})

    def call() -> int:
        first, second = tiny_random_model_for_tests(seed=0), tiny_random_model_for_tests(seed=1)
        first.weights_sha256, second.weights_sha256 = "a" * 64, "b" * 64  # as load_model records them
        assert [r.status for r in run_batch([image], tmp / "out", settings, model=first)] == ["ok"]
        assert [r.status for r in run_batch([image], tmp / "out", settings, model=first)] == ["skipped"]
        assert [r.status for r in run_batch([image], tmp / "out", settings, model=second)] == ["ok"]
        return 0

    return Expect(call=call, code=0, creates=outputs("out", ["a.nii.gz"]))


@row("batch_damaged_dicom_series_fails_only_its_case", "5",
     "in a batch, a DICOM series with a damaged slice fails its own row; the other cases run")
def _(tmp: Path) -> Expect:
    from reliability_support import write_series

    image = write_volume(tmp / "in" / "a.nii.gz")
    series = write_series(tmp / "in" / "series")
    (series / "IM0002.dcm").write_bytes(b"\x00" * 200)
    results: list[str] = []

    def call() -> int:
        results.extend(tiny_batch([image, series], tmp / "out", {image: {"box": BOX}, series: {"box": BOX}}))
        return 0

    def check(tmp: Path, out: str) -> None:
        assert results == ["ok", "failed"]
        assert "IM0002.dcm" in summary(tmp)[1]["error"]

    return Expect(call=call, code=0, check=check, creates=outputs("out", ["a.nii.gz"]))
