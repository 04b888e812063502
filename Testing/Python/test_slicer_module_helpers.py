"""The module's Qt-free helpers (service process tools, dependencies, choices) and the bridge's
training cases and fine-tuning chart, on real processes and real MRML (slicer-core)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="MRML classes (pip package slicer-core) are not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes (install slicer-core)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "MedFMSegment"))

from MedFMSegmentHelpers import dependencies  # noqa: E402
from MedFMSegmentHelpers.process_tools import LineBuffer, kill_tree, parse_ready_line, serve_command  # noqa: E402
from MedFMSegmentHelpers.settings import model_availability, path_or_none  # noqa: E402
from MedFMSegmentHelpers.settings import adaptation_summary  # noqa: E402

from MedFMSegmentLib import slicer_bridge as bridge  # noqa: E402
from MedFMSegmentLib.errors import InputError  # noqa: E402
from MedFMSegmentLib.geometry import VolumeGeometry  # noqa: E402
from MedFMSegmentLib.io import MedicalImage  # noqa: E402
from MedFMSegmentLib.slicer_bridge.cases import add_result_segmentation, training_pair, training_volume_for  # noqa: E402
from MedFMSegmentLib.slicer_bridge.chart import TrainingChart  # noqa: E402


# ---------------------------------------------------------------------------- the service process
def test_line_buffer_hands_back_whole_lines_only():
    buffer = LineBuffer()
    ready = json.dumps({"url": "http://127.0.0.1:5555", "token_file": "/t", "pid": 42})
    assert buffer.feed("loading model...\n" + ready[:10]) == ["loading model..."]
    assert buffer.feed(ready[10:20]) == []
    lines = buffer.feed(ready[20:] + "\r\nnext")
    assert lines == [ready] and parse_ready_line(lines[0])["pid"] == 42
    assert buffer.flush() == ["next"] and buffer.flush() == []


def test_ready_line_parsing_ignores_other_output():
    assert parse_ready_line("INFO: started") is None
    assert parse_ready_line("{not json") is None
    assert parse_ready_line('{"url": 3, "pid": 1}') is None
    assert parse_ready_line('{"url": "http://127.0.0.1:1", "pid": 7}') == {"url": "http://127.0.0.1:1", "pid": 7}


def test_serve_command_is_loopback_with_parent_pid_and_models(tmp_path):
    """serve pairs the n-th --checkpoint with the n-th --model, so models with weights come first."""
    command = serve_command("/slicer/bin/PythonSlicer", 1234, tmp_path / "token", "/adapters", "cuda",
                            [("litemedsam", None), ("sam_vit_b", "/w/sam.pth")])
    assert command[:4] == ["/slicer/bin/PythonSlicer", "-m", "MedFMSegmentLib.cli", "serve"]
    text = " ".join(command)
    for part in ("--host 127.0.0.1", "--port 0", "--parent-pid 1234", "--adapter-dir /adapters", "--device cuda",
                 "--model sam_vit_b --checkpoint /w/sam.pth --model litemedsam", f"--token-file {tmp_path / 'token'}"):
        assert part in text


def test_kill_tree_ends_the_real_child_behind_a_launcher(tmp_path):
    """A launcher process that starts the real Python (as PythonSlicer does): killing the tree
    from the launcher's pid stops the child too; killing only the launcher would not."""
    child_pid_file = tmp_path / "child.pid"
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(child_pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n")])
    for _ in range(200):
        if child_pid_file.is_file() and child_pid_file.read_text(encoding="utf-8"):
            break
        time.sleep(0.05)
    child = int(child_pid_file.read_text(encoding="utf-8"))
    killed = kill_tree(launcher.pid, timeout=5)
    assert set(killed) >= {launcher.pid, child}
    launcher.wait(timeout=10)
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        try:  # a zombie child of the dead launcher is reaped by init; wait for it to vanish
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    else:
        pytest.fail("the child process survived kill_tree")


# ---------------------------------------------------------------------------- dependencies
def test_missing_requirements_and_constraints_keep_torch_and_bundled_packages():
    installed = {"numpy": "1.26.4", "scipy": "1.11.0", "monai": "1.5.0", "peft": "0.10.0", "torch": "2.5.1+cu121",
                 "simpleitk": "2.4.0", "fastapi": "0.164.0"}
    requirements = ["numpy>=2,<3", "scipy>=1.10", "monai>=1.4,<1.7", "peft>=0.13,<0.22", "openvino>=2025.0",
                    "fastapi==0.165.0"]
    missing = dependencies.missing_requirements(requirements, installed.get)
    # monai 1.5.0 (another extension's, say) is in range and kept; bundled numpy/scipy whatever their version
    assert missing == ["peft>=0.13,<0.22", "openvino>=2025.0", "fastapi==0.165.0"]
    tested = {"peft": "0.21.2", "openvino": "2026.4.1", "fastapi": "0.165.0"}
    assert dependencies.install_lines(missing, tested) == ["peft==0.21.2", "openvino==2026.4.1", "fastapi==0.165.0"]
    assert dependencies.install_lines(["peft>=0.13,<0.22"], {"peft": "0.30.0"}) == ["peft>=0.13,<0.22"]
    assert not dependencies.satisfies("not-a-version", "monai>=1.4") and dependencies.satisfies("9", "tqdm")
    assert dependencies.satisfies("2.14.1+cu130", "torch>=2.1,<=2.14.1") and dependencies.satisfies("1.2", "a[b]>=1")
    assert dependencies.install_lines(["uvicorn[standard]>=0.30"], {"uvicorn": "0.55.0"}) == ["uvicorn[standard]==0.55.0"]
    windows_only = 'pywin32>=300; sys_platform == "win32"'
    assert dependencies.missing_requirements([windows_only], {}.get) == ([windows_only] if sys.platform == "win32" else [])
    constraints = dependencies.constraints_for(installed.get)
    assert "torch==2.5.1+cu121" in constraints and "simpleitk==2.4.0" in constraints and "numpy==1.26.4" in constraints
    summary = dependencies.install_summary(missing, ("ok", "2.5.1"))
    assert all(line in summary for line in missing) and "PyTorch is kept" in summary
    assert "PyTorch (through the PyTorch extension" in dependencies.install_summary([], ("missing", ""))


def test_the_module_requirements_name_a_tested_version_in_each_range():
    path = Path(dependencies.__file__).parents[1] / "Resources" / "requirements.txt"
    lines, tested = dependencies.read_requirements(path), dependencies.read_tested_versions(path)
    assert {dependencies.requirement_name(line) for line in lines} == set(tested)
    assert all(dependencies.satisfies(tested[dependencies.requirement_name(line)], line) for line in lines)


def test_torch_status_from_metadata_without_importing_torch():
    before = "torch" in sys.modules
    status, detail = dependencies.torch_status()
    assert status == "ok" and detail == dependencies.installed_version("torch")
    assert ("torch" in sys.modules) == before


def test_requirements_generator_keeps_ranges_notes_the_locked_version_and_drops_torch():
    pyproject = 'dependencies = [\n    "torch>=2.1",\n    "SimpleITK>=2.3",\n    "monai>=1.4,<1.7",\n    "new-pkg>=1",\n]\n'
    lock = "monai==1.6.1\ntorch==2.14.1\n"
    assert dependencies.requirements_from_project(pyproject, lock) == ["monai>=1.4,<1.7  # tested: 1.6.1", "new-pkg>=1"]


# ---------------------------------------------------------------------------- panel choices
def test_unset_paths_and_models_without_weights(tmp_path):
    assert path_or_none(Path(".")) is None and path_or_none("") is None and path_or_none(None) is None
    assert path_or_none(tmp_path) == str(tmp_path)
    choices = {name: (enabled, reason) for name, _, enabled, reason in model_availability(Path("."))}
    assert choices["litemedsam"] == (True, "")
    assert not choices["sam_vit_b"][0] and "checkpoint" in choices["sam_vit_b"][1]
    weights = tmp_path / "sam.pth"
    weights.write_bytes(b"x")
    assert all(enabled for _, _, enabled, _ in model_availability(weights))


def test_adaptation_summary_shows_adapted_and_base_dice():
    result = {"adapter": "hippo", "metadata": {"validation_dice": 0.812, "base_validation_dice": 0.701,
                                                "training_cases": {"count": 3}}}
    assert adaptation_summary(result) == ("Adapter 'hippo' written; validation Dice adapted 0.812 vs base model "
                                          "0.701 on 3 training case(s).")
    assert "base model not measured" in adaptation_summary({"adapter": "a", "metadata": {"validation_dice": 0.5}})


def test_adapter_list_and_summary_show_the_side_by_side_figures():
    """The figures measured on the same slices and prompts win over the one training kept."""
    from MedFMSegmentHelpers.settings import adapter_details

    meta = {"base_model": {"name": "litemedsam"}, "label_name": "hippocampus", "validation_dice": 0.9,
            "adapted_validation_dice": 0.8, "base_validation_dice": 0.6, "steps": 5, "encoder": "frozen",
            "training_cases": {"count": 2}, "lineage": [{}], "date": "2026-12-02T18:00:00+00:00"}
    assert adapter_details(meta) == ("base: litemedsam; label: hippocampus; validation Dice 0.800 (base model 0.600); "
                                     "steps: 5; encoder: frozen; training cases: 2; updates: 1; "
                                     "date: 2026-12-02T18:00:00+00:00")
    assert "adapted 0.800 vs base model 0.600" in adaptation_summary({"adapter": "a", "metadata": meta})
    assert adapter_details({}) == ""
    assert "; box prompts: the base model's decoder; " in adapter_details({**meta, "box_prompts": "base"})
    assert "box prompts" not in adapter_details({**meta, "box_prompts": "adapted"})
    unet = {**meta, "automatic_net": {"kind": "monai_unet"},
            "automatic_engine": {"chosen": "unet", "unet_dice": 0.861, "adapter_dice": 0.802}}
    assert "; automatic mode: its U-Net (held-out Dice U-Net 0.861, adapter 0.802); " in adapter_details(unet)
    assert "U-Net" not in adapter_details({**meta, "automatic_engine": {"chosen": "adapter", "unet_dice": 0.7,
                                                                        "adapter_dice": 0.8}})


def test_training_line_shows_validation_dice_beside_the_base_models():
    from MedFMSegmentHelpers.settings import training_line

    metrics = {"step": 200, "loss": 0.3, "val_dice": 0.75, "base_val_dice": 0.5}
    assert training_line("training", 200, 800, metrics) == ("training: step 200 of 800; validation Dice 0.750 "
                                                            "(base model 0.500)")
    assert training_line("training", 50, 800, {"step": 50, "loss": 0.4}) == ""
    assert training_line("embedding", 3, 9, metrics) == ""
    assert training_line("automatic_net", 12, 300, {}) == "training a U-Net for automatic mode: 12 of 300 s"


# ---------------------------------------------------------------------------- cases and chart (real MRML)
@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def volume(scene, size=(20, 16, 8), spacing=(1.0, 1.0, 2.0), name="V"):
    geometry = VolumeGeometry(size, spacing, (0.0, 0.0, 0.0), np.eye(3))
    data = np.random.default_rng(0).normal(0, 1, geometry.shape).astype(np.float32)
    return bridge.image_to_volume_node(MedicalImage(data, geometry), scene, name)


def test_training_pair_from_a_segmentation_and_its_reference_volume(scene):
    v = volume(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Label")
    mask = np.zeros((8, 16, 20), bool)
    mask[2:5, 4:9, 6:12] = True
    bridge.mask_to_segment(mask, v, segmentation)
    assert training_volume_for(segmentation) is v
    image, label = training_pair(training_volume_for(segmentation), segmentation)
    assert np.array_equal(label.array > 0, mask) and label.geometry.same_grid(image.geometry)


def test_a_label_map_on_another_grid_is_refused_with_the_reason(scene):
    v = volume(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Coarse")
    labelmap.CopyOrientation(v)
    labelmap.SetSpacing(2.0, 2.0, 2.0)
    slicer.util.updateVolumeFromArray(labelmap, np.ones((8, 16, 20), np.uint8))
    with pytest.raises(InputError, match="not on the grid.*spacing"):
        training_pair(v, labelmap)
    labelmap.SetSpacing(1.0, 1.0, 2.0)
    image, label = training_pair(v, labelmap)
    assert label.array.all()
    slicer.util.updateVolumeFromArray(labelmap, np.zeros((8, 16, 20), np.uint8))
    with pytest.raises(InputError, match="empty"):
        training_pair(v, labelmap)


def test_batch_result_segmentation_is_voxel_exact(scene):
    v = volume(scene)
    mask = np.random.default_rng(2).random((8, 16, 20)) > 0.7
    segmentation = add_result_segmentation(scene, v, mask)
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    assert np.array_equal(bridge.segment_to_mask(segmentation, segment_id, v), mask)


def test_training_chart_rows_and_cleanup(scene):
    before = scene.GetNumberOfNodes()
    chart = TrainingChart(scene, "hippo")
    assert chart.add(1, 0.9) and not chart.add(1, 0.8), "a repeated step is one row"
    chart.add(10, 0.5, 0.62)
    rows = chart.rows()
    assert [r[0] for r in rows] == [1.0, 10.0] and np.isnan(rows[0][2]) and abs(rows[1][2] - 0.62) < 1e-6
    assert chart.chart.GetNumberOfPlotSeriesNodes() == 3
    chart.remove()
    assert scene.GetNumberOfNodes() == before


def test_training_chart_draws_the_base_model_dice_beside_the_adapted_and_ends_with_both(scene):
    """The job's metrics carry the base model's validation Dice (measured before training) with
    every step: a dashed third series on the same table, and the final figures side by side."""
    from MedFMSegmentHelpers.settings import validation_figures

    chart = TrainingChart(scene, "hippo")
    for step, loss, val, base in ((1, 0.9, None, 0.41), (10, 0.5, 0.62, 0.41), (20, 0.3, 0.78, 0.41)):
        chart.add(step, loss, val, base)
    series = [chart.chart.GetNthPlotSeriesNode(n) for n in range(chart.chart.GetNumberOfPlotSeriesNodes())]
    assert [s.GetYColumnName() for s in series] == ["loss", "val_dice", "base_dice"]
    assert all(s.GetTableNode() is chart.table and s.GetXColumnName() == "step" for s in series)
    assert series[2].GetLineStyle() == slicer.vtkMRMLPlotSeriesNode.LineStyleDash
    column = chart.table.GetTable().GetColumnByName("base_dice")
    assert [round(column.GetValue(r), 6) for r in range(column.GetNumberOfTuples())] == [0.41, 0.41, 0.41]
    assert [round(r[2], 2) for r in chart.rows()[1:]] == [0.62, 0.78]
    metadata = {"adapted_validation_dice": 0.8123, "base_validation_dice": 0.4071}
    title = chart.finish(*validation_figures(metadata))
    assert chart.chart.GetTitle() == title == "hippo: validation Dice adapted 0.812 vs base model 0.407"
    assert chart.finish(None, None).endswith("adapted not measured vs base model not measured")


def test_segment_reads_leave_no_nodes_behind(scene):
    """segment_to_mask used to export through a label map node, leaving a colour table and a display node."""
    v = volume(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S")
    segment_id = bridge.mask_to_segment(np.ones((8, 16, 20), bool), v, segmentation)
    count = scene.GetNumberOfNodes()
    for _ in range(3):
        bridge.segment_to_mask(segmentation, segment_id, v)
    assert scene.GetNumberOfNodes() == count
    assert scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == 0


def test_a_box_only_adapter_disables_automatic_segmentation_with_the_reason():
    from MedFMSegmentHelpers.settings import automatic_refusal

    assert "box prompts only" in automatic_refusal({"automatic": False})
    assert automatic_refusal({"automatic": True}) == ""
    assert automatic_refusal(None) == ""  # not listed (yet): the service still says why if it refuses
