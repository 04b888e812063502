"""Static checks of the Slicer extension that need no Slicer: UI names, signals and slots, CMake
lists, compilation, imports, threads, the effect's registration and the dependency lists."""

from __future__ import annotations

import ast
import py_compile
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MedFMSegment"
MODULE_FILE = MODULE_DIR / "MedFMSegment.py"
HELPERS = MODULE_DIR / "MedFMSegmentHelpers"
EFFECT_FILE = MODULE_DIR / "SegmentEditorMedFMSegmentLib" / "SegmentEditorEffect.py"
PARAMETERS_FILE = HELPERS / "parameters.py"
WIDGET_FILES = (MODULE_FILE, HELPERS / "setup_section.py", HELPERS / "adaptation_section.py")  # use the widget's self.ui
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedFMSegment.ui"
LIB_DIR = ROOT / "MedFMSegmentLib"
MODULE_SOURCES = sorted(p for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts)

# Signals (with their C++ signatures) and slots of the Qt / CTK / qMRML classes the module uses.
SIGNALS = {
    "QPushButton": {"clicked(bool)", "clicked()", "toggled(bool)"},
    "QCheckBox": {"toggled(bool)", "stateChanged(int)", "clicked(bool)"},
    "QComboBox": {"currentIndexChanged(int)", "currentTextChanged(QString)", "activated(int)"},
    "QLineEdit": {"textChanged(QString)", "editingFinished()"},
    "QSpinBox": {"valueChanged(int)"},
    "ctkPathLineEdit": {"currentPathChanged(QString)", "validInputChanged(bool)"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "nodeAdded(vtkMRMLNode*)",
                          "currentNodeIDChanged(QString)"},
    "qMRMLCheckableNodeComboBox": {"checkedNodesChanged()", "currentNodeChanged(vtkMRMLNode*)"},
    "QTimer": {"timeout()"},
    "QNetworkAccessManager": {"finished(QNetworkReply*)"},
    "QProcess": {"readyReadStandardOutput()", "readyReadStandardError()", "errorOccurred(QProcess::ProcessError)",
                 "finished(int,QProcess::ExitStatus)", "started()"},
}
SLOTS = {"qSlicerMarkupsPlaceWidget": {"setCurrentNode"}, "qMRMLNodeComboBox": {"setMRMLScene", "setCurrentNode"}}


@pytest.fixture(scope="module")
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_classes(root: ET.Element) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def cmake_text(path: Path) -> str:
    return re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))


def cmake_set(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return match.group(1).split()


def ui_attribute(node: ast.AST) -> str | None:
    """``NAME`` of ``self.ui.NAME`` or ``ui.NAME`` (the widget's local alias)."""
    if not isinstance(node, ast.Attribute):
        return None
    owner = node.value
    if isinstance(owner, ast.Attribute) and owner.attr == "ui" and isinstance(owner.value, ast.Name) \
            and owner.value.id == "self":
        return node.attr
    if isinstance(owner, ast.Name) and owner.id == "ui":
        return node.attr
    return None


# ---------------------------------------------------------------------------- the .ui
def test_ui_is_well_formed_with_qmrmlwidget_root(ui_root):
    top = ui_root.find("widget")
    assert ui_root.tag == "ui" and top is not None and top.get("class") == "qMRMLWidget"
    names = [w.get("name") for w in ui_root.iter("widget")]
    assert len(names) == len(set(names)), "widget objectNames must be unique"


def test_every_ui_name_used_exists(ui_root):
    names = ui_classes(ui_root)
    for path in WIDGET_FILES:
        used = {name for node in ast.walk(parse(path)) if (name := ui_attribute(node))}
        assert len(used) > 5
        missing = used - set(names)
        assert not missing, f"ui names used by {path.name} but missing from {UI_FILE.name}: {sorted(missing)}"


def connections(tree: ast.Module, ui_names: dict[str, str]) -> list[tuple[str, str, ast.AST]]:
    """``(class, signal, slot expression)`` of every ``X.connect("signal", slot)`` whose X's class
    is known: a .ui widget, or a name assigned ``qt.Class()`` in the same file."""
    assigned: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Attribute) and isinstance(node.value.func.value, ast.Name) and \
                node.value.func.value.id == "qt":
            for target in node.targets:
                key = ast.unparse(target)
                assigned[key] = node.value.func.attr
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect" \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            owner = node.func.value
            cls = ui_names.get(ui_attribute(owner) or "") or assigned.get(ast.unparse(owner))
            if cls is None and ast.unparse(owner) == "slicer.app":
                continue
            assert cls is not None, f"connect on an object of unknown class: {ast.unparse(owner)}"
            found.append((cls, node.args[0].value, node.args[1] if len(node.args) > 1 else None))
    return found


@pytest.mark.parametrize("path", [MODULE_FILE, HELPERS / "service_process.py", HELPERS / "network.py", EFFECT_FILE],
                         ids=lambda p: p.name)
def test_every_signal_and_slot_exists_on_its_class(path, ui_root):
    names = ui_classes(ui_root) if path == MODULE_FILE else {}
    found = connections(parse(path), names)
    assert found, f"no connect() found in {path.name}"
    for cls, signal, slot in found:
        assert signal in SIGNALS.get(cls, set()), f"{path.name}: {cls} has no signal {signal}"
        if isinstance(slot, ast.Attribute) and (widget := ui_attribute(slot.value)):
            assert slot.attr in SLOTS.get(names[widget], set()), f"{names[widget]} has no slot {slot.attr}"


# QtNetwork names (Qt 5.15 and Qt 6 alike; setTransferTimeout since 5.15) and what PythonQt adds
# (``connect``; ``QByteArray.data()`` gives bytes). Each method the exchange calls must be listed here.
QT_NETWORK_API = {
    "QNetworkAccessManager": {"get", "head", "post", "connect"},
    "QNetworkRequest": {"setRawHeader", "setTransferTimeout", "setHeader", "attribute"},
    "QNetworkReply": {"attribute", "rawHeader", "readAll", "errorString", "error", "abort", "deleteLater"},
    "QByteArray": {"data"},
}
QT_NETWORK_NAMES = {"QNetworkAccessManager", "QNetworkRequest", "QUrl", "QNetworkRequest.HttpStatusCodeAttribute"}


def test_network_exchange_calls_only_qt_network_api_that_exists():
    """The QNetworkAccessManager exchange cannot run here: every Qt name and method it uses is checked
    against the Qt API (objects typed from what they are assigned, the finished slot's ``reply``)."""
    tree = parse(HELPERS / "network.py")
    qt_names = {ast.unparse(n)[3:] for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and ast.unparse(n).startswith("qt.")}
    assert qt_names and qt_names <= QT_NETWORK_NAMES, f"unchecked Qt names: {sorted(qt_names - QT_NETWORK_NAMES)}"
    kinds = {"reply": "QNetworkReply"}  # the finished(QNetworkReply*) slot's argument
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            called = ast.unparse(node.value.func)
            kind = called[3:] if called.startswith("qt.") else \
                "QNetworkReply" if called.startswith("self.manager.") else None
            for target in node.targets:
                if kind:
                    kinds[ast.unparse(target)] = kind
    assert kinds.get("self.manager") == "QNetworkAccessManager" and "QNetworkRequest" in kinds.values()
    calls = [(ast.unparse(n.func.value), n.func.attr) for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    for owner, method in calls:
        if owner.endswith(".data") or owner in ("self", "self._waiting", "request.method") or owner.startswith("f"):
            continue
        if owner.endswith(")") and owner.split(".")[-1].split("(")[0] in ("rawHeader", "readAll"):
            kind = "QByteArray"
        else:
            kind = kinds.get(owner)
        if kind is None:
            continue
        assert method in QT_NETWORK_API[kind], f"{kind} has no method {method}"
    checked = {(kinds.get(o), m) for o, m in calls}
    assert {("QNetworkAccessManager", "post"), ("QNetworkReply", "readAll"), ("QNetworkReply", "deleteLater")} <= checked


def test_mrml_widgets_get_the_scene(ui_root):
    mrml = {"qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "qSlicerMarkupsPlaceWidget"}
    needing = {n for n, c in ui_classes(ui_root).items() if c in mrml}
    connected = {c.findtext("receiver") for c in ui_root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert needing <= connected, f"not connected to mrmlSceneChanged: {sorted(needing - connected)}"


def parameter_fields() -> dict[str, ast.AnnAssign]:
    for node in parse(PARAMETERS_FILE).body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", "") == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {s.target.id: s for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class")


def test_ui_bindings_name_parameter_fields_and_choices_match(ui_root):
    fields = parameter_fields()
    bound = {}
    for widget in ui_root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget
    assert bound.keys() <= fields.keys(), f"bound to no parameter: {sorted(bound.keys() - fields.keys())}"
    for name, widget in bound.items():
        if widget.get("class") == "QComboBox":
            items = [i.findtext("property/string") for i in widget.findall("item")]
            choice = re.search(r"Choice\((\[.*?\])\)", ast.unparse(fields[name].annotation))
            assert choice and ast.literal_eval(choice.group(1)) == items, f"{name}: combo items != Choice"
            assert ast.literal_eval(fields[name].value) == items[0], f"{name}: default is not the first item"


def library_choices() -> dict[str, tuple[tuple, object]]:
    """Parameter node field -> (the library registry its choices are, the library's default)."""
    from MedFMSegmentLib.finetune.trainer import FinetuneConfig
    from MedFMSegmentLib.inference import AXES, BOX3D_STRATEGIES, PredictorSettings
    from MedFMSegmentLib.inference.settings import DEFAULT_AXIS
    from MedFMSegmentLib.models import DEFAULT_DEVICE, DEFAULT_MODEL, DEVICES

    return {"axis": (AXES, DEFAULT_AXIS), "box3dStrategy": (BOX3D_STRATEGIES, PredictorSettings().box3d_strategy),
            "device": (DEVICES, DEFAULT_DEVICE), "modelName": (None, DEFAULT_MODEL),
            "rank": (None, FinetuneConfig().lora_rank)}


@pytest.mark.parametrize("name", ["axis", "box3dStrategy", "device", "modelName", "rank"])
def test_parameter_node_choices_and_combo_boxes_are_the_librarys_registries(name, ui_root):
    """The panel offers what the library (and so the command line) accepts, with the same default."""
    registry, default = library_choices()[name]
    field = parameter_fields()[name]
    assert ast.literal_eval(field.value) == default
    choice = re.search(r"Choice\((\[.*?\])\)", ast.unparse(field.annotation))
    if registry is None:
        assert choice is None
        return
    assert choice and ast.literal_eval(choice.group(1)) == list(registry)
    combos = [w for w in ui_root.iter("widget") if w.get("class") == "QComboBox" and any(
        p.get("name") == "SlicerParameterName" and p.findtext("string") == name for p in w.findall("property"))]
    assert len(combos) == 1
    assert [item.findtext("property/string") for item in combos[0].findall("item")] == list(registry)


# ---------------------------------------------------------------------------- Python sources
@pytest.mark.parametrize("path", MODULE_SOURCES, ids=lambda p: p.relative_to(MODULE_DIR).as_posix())
def test_module_sources_compile_use_no_threads_and_no_heavy_top_level_imports(path, tmp_path):
    py_compile.compile(str(path), doraise=True, cfile=str(tmp_path / "x.pyc"))
    tree = parse(path)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"threading", "concurrent", "multiprocessing", "_thread"}, \
        f"{path.name}: no Python thread in Slicer (PythonQt holds the GIL while Qt idles)"
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    heavy = top & {"torch", "SimpleITK", "scipy", "MedFMSegmentLib", "segment_anything", "monai", "peft"}
    assert not heavy, f"{path.name} imports {sorted(heavy)} at module level: the panel must build without them"


def test_parameter_annotations_are_evaluated():
    """``@parameterNodeWrapper`` reads real annotations: postponed (string) annotations would break it."""
    futures = {a.name for n in parse(PARAMETERS_FILE).body if isinstance(n, ast.ImportFrom)
               and n.module == "__future__" for a in n.names}
    assert "annotations" not in futures


def classes_of(path: Path) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in parse(path).body if isinstance(node, ast.ClassDef)}


def test_module_classes_effect_and_its_registration():
    module = classes_of(MODULE_FILE)
    assert [b.id for b in module["MedFMSegment"].bases] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in [getattr(b, "id", "") for b in module["MedFMSegmentWidget"].bases]
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert 'slicer.app.connect("startupCompleted()", registerEffect)' in source
    assert "import MedFMSegmentTest" in source and "import MedFMSegmentLogic" in source
    effect = classes_of(EFFECT_FILE)["SegmentEditorEffect"]
    assert [b.id for b in effect.bases] == ["AbstractScriptedSegmentEditorEffect"]
    methods = {n.name for n in effect.body if isinstance(n, ast.FunctionDef)}
    assert {"clone", "icon", "helpText", "setupOptionsFrame", "activate", "deactivate",
            "processInteractionEvents"} <= methods
    effect_source = EFFECT_FILE.read_text(encoding="utf-8")
    assert "saveStateForUndo()" in effect_source and "modifySelectedSegmentByLabelmap(" in effect_source
    assert "xyToRas(" in effect_source and "volume_geometry(" in effect_source  # view xy -> the volume's own voxels
    assert classes_of(HELPERS / "selftest.py")["MedFMSegmentTest"].bases[0].id == "ScriptedLoadableModuleTest"


def test_no_class_or_module_is_too_long():
    for path in MODULE_SOURCES + sorted((LIB_DIR / "slicer_bridge").glob("*.py")):
        lines = path.read_text(encoding="utf-8").count("\n")
        assert lines < 500, f"{path.name}: {lines} lines"
        for node in parse(path).body:
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno < 300, f"{path.name}: class {node.name} is too long"


# ---------------------------------------------------------------------------- CMake
def test_cmake_lists_every_module_and_library_file():
    text = cmake_text(MODULE_DIR / "CMakeLists.txt")
    scripts = {s.replace("${MODULE_NAME}", "MedFMSegment") for s in cmake_set(text, "MODULE_PYTHON_SCRIPTS")}
    module_files = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_SOURCES}
    assert not module_files - scripts, f"module files missing from MODULE_PYTHON_SCRIPTS: {sorted(module_files - scripts)}"
    assert not scripts - module_files, f"MODULE_PYTHON_SCRIPTS lists missing files: {sorted(scripts - module_files)}"
    for entry in cmake_set(text, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE_DIR / entry.replace("${MODULE_NAME}", "MedFMSegment")).is_file(), f"resource {entry} missing"
    listed = set(cmake_set(text, "LIB_PYTHON_SCRIPTS"))
    library = {p.relative_to(LIB_DIR).as_posix() for p in LIB_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert not library - listed, f"library files missing from LIB_PYTHON_SCRIPTS: {sorted(library - listed)}"
    assert not listed - library, f"LIB_PYTHON_SCRIPTS lists missing files: {sorted(listed - library)}"


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


def test_only_bridge_paths_import_slicer():
    for path in LIB_DIR.rglob("*.py"):
        tree = parse(path)
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        relative = path.relative_to(LIB_DIR).as_posix()
        assert not names & {"qt", "ctk"}, f"{relative} imports Qt"
        if "bridge" not in relative:
            assert not names & {"slicer", "vtk", "vtkmodules"}, f"{relative} imports slicer/vtk; only bridge paths may"


# ---------------------------------------------------------------------------- dependencies
sys.path.insert(0, str(MODULE_DIR))
from MedFMSegmentHelpers import dependencies  # noqa: E402


def test_requirements_file_is_derived_from_pyproject_and_the_lock():
    expected = dependencies.requirements_from_project((ROOT / "pyproject.toml").read_text(encoding="utf-8"),
                                                      (ROOT / "requirements-lock.txt").read_text(encoding="utf-8"))
    actual = (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    actual = [line for line in actual if line and not line.startswith("#")]
    assert actual == expected, ("Resources/requirements.txt is out of date: run "
                                "python MedFMSegment/MedFMSegmentHelpers/dependencies.py --write")
    actual = dependencies.read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    names = {dependencies.requirement_name(line) for line in actual}
    assert not names & {"torch", "simpleitk", "torchvision"}
    assert names <= dependencies.IMPORT_NAMES.keys(), f"no import name for {sorted(names - dependencies.IMPORT_NAMES.keys())}"
    locked = {dependencies.requirement_name(x) for x in (ROOT / "requirements-lock.txt").read_text(encoding="utf-8").splitlines()}
    assert names & locked <= dependencies.read_tested_versions(MODULE_DIR / "Resources" / "requirements.txt").keys()


def test_model_choices_are_the_registry_and_checkpoint_needs_match():
    from MedFMSegmentHelpers.settings import MODEL_CHOICES
    from MedFMSegmentLib.models import MODEL_SPECS

    assert [c[0] for c in MODEL_CHOICES] == list(MODEL_SPECS)
    for name, _, needs in MODEL_CHOICES:
        assert needs == (MODEL_SPECS[name].sam_variant is not None), name


def test_no_modal_error_dialogs_in_normal_use():
    """Problems become status lines; the one dialog is the install consent (pip shows its own errors)."""
    for path in MODULE_SOURCES:
        source = path.read_text(encoding="utf-8")
        for call in ("errorDisplay(", "warningDisplay(", "infoDisplay(", "tryWithErrorDisplay(", "QMessageBox"):
            assert call not in source, f"{path.name} uses {call}"
    consent = [p.name for p in MODULE_SOURCES if "confirmOkCancelDisplay(" in p.read_text(encoding="utf-8")]
    assert consent == ["installer.py"]


def test_batch_outputs_come_from_the_librarys_registry(ui_root):
    """The panel fills its batch output combo from slicer_bridge.outputs.output_choices (the scene,
    then batch.OUTPUT_FORMATS); the .ui holds no items of its own that could drift from the library."""
    from MedFMSegmentLib.batch import OUTPUT_FORMATS
    from MedFMSegmentLib.slicer_bridge.outputs import output_choices

    combo = next(w for w in ui_root.iter("widget") if w.get("name") == "batchFormatComboBox")
    assert combo.get("class") == "QComboBox" and not combo.findall("item")
    assert "output_choices()" in (HELPERS / "adaptation_section.py").read_text(encoding="utf-8")
    assert [name for name, _ in output_choices()][1:] == list(OUTPUT_FORMATS) and "dcm" in OUTPUT_FORMATS


def test_add_case_and_update_adapter_are_wired_to_the_library_helper(ui_root):
    names = ui_classes(ui_root)
    assert names["addCaseButton"] == names["updateAdapterButton"] == "QPushButton"
    source = (HELPERS / "adaptation_section.py").read_text(encoding="utf-8")
    assert "slicer_bridge.updates import PendingCases" in source and "self.adaptation.update(" in source
    tasks = (HELPERS / "tasks.py").read_text(encoding="utf-8")
    assert "pending.request(" in tasks and "finetune_job(" in tasks
    # service jobs go through the non-blocking transport: no call of the blocking client in the tasks
    assert "client." not in tasks and "self.logic.transport" in tasks


# ---------------------------------------------------------------------------- Qt-only behaviour, read from the code
def method_calls(path: Path, cls: str, method: str) -> set[str]:
    """``ast.unparse`` of each call's function inside ``cls.method`` of ``path``."""
    node = next(n for n in classes_of(path)[cls].body if isinstance(n, ast.FunctionDef) and n.name == method)
    return {ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}


def test_no_event_loop_reentry_and_no_temp_files_with_patient_data():
    """No ``processEvents`` in the panel, logic or effect (it let scene close or undo run mid-segment):
    only the installer (its status line before pip blocks) and the self-test (waiting) pump events.
    No temp folder in module code but the installer's requirement files (removed in ``finally``):
    volumes and labels travel to the service as arrays."""
    for path in MODULE_SOURCES:
        source = path.read_text(encoding="utf-8")
        if path.name not in ("installer.py", "selftest.py"):
            assert "processEvents" not in source, f"{path.name} re-enters the event loop"
            assert "tempfile" not in source and "mkdtemp" not in source, f"{path.name} writes temp files"
    installer = (HELPERS / "installer.py").read_text(encoding="utf-8")
    assert "finally:\n        shutil.rmtree(folder" in installer


def test_a_failed_service_start_and_every_exit_are_handled():
    """A QProcess that fails to start emits errorOccurred and no finished: both are connected and
    FailedToStart ends the start; leaving the panel, closing it and deactivating the effect drop
    the prompt observers (node IDs are reused after a scene close)."""
    found = connections(parse(HELPERS / "service_process.py"), {})
    assert {("QProcess", "errorOccurred(QProcess::ProcessError)"), ("QProcess", "finished(int,QProcess::ExitStatus)")} \
        <= {(cls, signal) for cls, signal, _ in found}
    assert "qt.QProcess.FailedToStart" in (HELPERS / "service_process.py").read_text(encoding="utf-8")
    for method in ("exit", "cleanup", "onSceneStartClose"):
        assert "self._detachController" in method_calls(MODULE_FILE, "MedFMSegmentWidget", method), method
    assert "self._disconnect" in method_calls(EFFECT_FILE, "SegmentEditorEffect", "deactivate")
    assert "self.controller.detach" in method_calls(EFFECT_FILE, "SegmentEditorEffect", "_disconnect")


def test_a_batch_notes_a_failed_volume_and_goes_on_to_the_next():
    """The automatic batch gives every job's failure to its tally and runs the next volume (a
    volume without image data too), stopping only on Cancel or a service that stopped answering;
    its last line is the tally's summary (tested in test_slicer_service)."""
    calls = method_calls(HELPERS / "tasks.py", "AutomaticTask", "_next")
    assert {"self.tally.fail", "self.tally.done", "self.tally.summary", "self._follow", "qt.QTimer.singleShot"} <= calls
    source = ast.unparse(next(n for n in classes_of(HELPERS / "tasks.py")["AutomaticTask"].body
                              if isinstance(n, ast.FunctionDef) and n.name == "_next"))
    # the next volume starts from the event loop, after this job's end is handled (never inside it)
    assert "on_failed=on_failed" in source and source.count("qt.QTimer.singleShot(0, self._next)") == 2
    assert "self._next()" not in source
    assert "self.tally.cancelled = True" in ast.unparse(next(
        n for n in classes_of(HELPERS / "tasks.py")["AutomaticTask"].body if isinstance(n, ast.FunctionDef) and n.name == "cancel"))
