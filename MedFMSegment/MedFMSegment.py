"""MedFMSegment: promptable and few-shot adapted SAM-family segmentation inside 3D Slicer.

The panel is glue: inference, fine-tuning and batch run in the MedFMSegment service (started by
the panel with Slicer's Python, or remote); prompts go through the library's Qt-free controller
(``MedFMSegmentLib.slicer_bridge.interaction``), and the Segment Editor effect "MedFMSegment"
(``SegmentEditorMedFMSegmentLib``) prompts in slice views with Segment Editor's undo. The module
imports and builds its panel without torch or any optional package.
"""

import logging
import os
import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from MedFMSegmentHelpers.logic import MedFMSegmentLogic
from MedFMSegmentHelpers.adaptation_section import AdaptationBatchMixin
from MedFMSegmentHelpers.setup_section import SetupSectionMixin
from MedFMSegmentHelpers.parameters import MedFMSegmentParameterNode  # noqa: F401 - saved with the scene
from MedFMSegmentHelpers.selftest import MedFMSegmentTest  # noqa: F401 - Slicer finds <Module>Test here
from MedFMSegmentHelpers.settings import automatic_refusal
from MedFMSegmentHelpers.tasks import AdaptationTask, AutomaticTask

EFFECT_SOURCE = os.path.join(os.path.dirname(__file__), "SegmentEditorMedFMSegmentLib", "SegmentEditorEffect.py")


def registerEffect() -> None:
    """Register the Segment Editor effect (at ``startupCompleted()``, as Slicer's extra effects do)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(EFFECT_SOURCE.replace("\\", "/"))
    instance.self().register()


class MedFMSegment(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedFMSegment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedFMSegment developers"]
        self.parent.helpText = _(
            "Segment structures from a box and clicks with LiteMedSAM, MedSAM or SAM (Segment Editor effect "
            "'MedFMSegment', or markups in this panel); adapt the model to a new structure from a few labelled "
            "volumes and segment volumes automatically. Inference runs in a separate service process.")
        self.parent.acknowledgementText = _(
            "MedFMSegment uses LiteMedSAM and MedSAM: J. Ma et al., 'Segment anything in medical images', Nature "
            "Communications 15, 654 (2024); and Segment Anything: A. Kirillov et al., ICCV 2023.")
        slicer.app.connect("startupCompleted()", registerEffect)


class MedFMSegmentWidget(SetupSectionMixin, AdaptationBatchMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: Setup (service, model, adapter, dependencies), Segment, Adaptation and Batch."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.controller = None
        self.writer = None
        self._attached = ()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedFMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedFMSegmentLogic.shared()
        self.logic.addListener(self.onServiceChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.adaptation = AdaptationTask(self.logic, self.ui.adaptationProgressBar, self.ui.adaptationCancelButton,
                                         self.setStatus)
        self.automatic = AutomaticTask(self.logic, self.ui.segmentProgressBar, self.ui.cancelSegmentButton,
                                       self.setStatus)
        self.batch = AutomaticTask(self.logic, self.ui.batchProgressBar, self.ui.batchCancelButton, self.setStatus)

        ui = self.ui
        ui.startServiceButton.connect("clicked(bool)", self.onStartService)
        ui.stopServiceButton.connect("clicked(bool)", self.onStopService)
        ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.updateModelChoices)
        ui.adapterComboBox.connect("currentIndexChanged(int)", self.onAdapterChanged)
        ui.refreshAdaptersButton.connect("clicked(bool)", self.updateAdapterList)
        ui.openEffectButton.connect("clicked(bool)", self.onOpenEffect)
        ui.segmentButton.connect("clicked(bool)", lambda: self.onSegment(False))
        ui.propagateButton.connect("clicked(bool)", lambda: self.onSegment(True))
        ui.undoButton.connect("clicked(bool)", self.onUndo)
        ui.automaticButton.connect("clicked(bool)", self.onAutomatic)
        ui.cancelSegmentButton.connect("clicked(bool)", self.onCancelSegment)
        ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        ui.updateAdapterButton.connect("clicked(bool)", self.onUpdateAdapter)
        ui.adaptationCancelButton.connect("clicked(bool)", self.adaptation.cancel)
        ui.batchButton.connect("clicked(bool)", self.onBatch)
        ui.batchCancelButton.connect("clicked(bool)", self.batch.cancel)
        ui.positivePointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", ui.positivePlaceWidget.setCurrentNode)
        ui.negativePointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", ui.negativePlaceWidget.setCurrentNode)

        self.pending = None  # cases added for the next adapter update (PendingCases)
        self._fillBatchFormats()
        self.pollTimer = qt.QTimer()  # drives the prompt controller; no Python thread in Slicer
        self.pollTimer.setInterval(100)
        self.pollTimer.connect("timeout()", self.onPoll)
        self.pollTimer.start()
        self._observeSliceViews()
        self.updateDependencyStatus()
        self.initializeParameterNode()
        self.updateModelChoices()
        self.onServiceChanged("Not started." if self.logic.client is None else self.logic.describeInfo())

    def cleanup(self) -> None:
        self.pollTimer.stop()
        self.removeObservers()
        self._detachController()
        self.logic.removeListener(self.onServiceChanged)
        self.logic.stopService()

    def enter(self) -> None:
        self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload the library's and the helpers' modules too, so edits apply without restarting Slicer."""
        import importlib
        import sys

        prefixes = ("MedFMSegmentLib", "MedFMSegmentHelpers", "SegmentEditorMedFMSegmentLib")
        for name in sorted((n for n in sys.modules if n.split(".")[0] in prefixes), key=len, reverse=True):
            try:
                importlib.reload(sys.modules[name])
            except Exception as exc:  # noqa: BLE001 - a broken submodule must not stop the reload
                logging.warning(f"MedFMSegment: could not reload {name}: {exc}")
        ScriptedLoadableModuleWidget.onReload(self)

    def exit(self) -> None:
        self._detachController()  # observers never outlive the panel's use
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._detachController()
        self.writer, self.pending = None, None  # their undo snapshots and cases belong to the closed scene
        self.automatic.drop()  # their results would land in nodes of the closed scene
        self.batch.drop()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

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
        connected = self.logic.client is not None
        remote = bool(p and p.serviceMode == "remote")
        self.ui.serviceUrlLineEdit.enabled = remote
        self.ui.serviceTokenLineEdit.enabled = remote
        hasVolume = bool(p and p.inputVolume)
        for button in (self.ui.segmentButton, self.ui.propagateButton, self.ui.openEffectButton):
            button.enabled = connected and hasVolume
        adapter = bool(p and p.adapterName)
        known = (getattr(self, "_adapters", None) or {}).get(p.adapterName) if adapter else None
        reason = automatic_refusal((known or {}).get("metadata")) if adapter else \
            _("Choose an adapter to use (Setup) first.")
        self.ui.automaticButton.enabled = connected and hasVolume and adapter and not reason
        self.ui.automaticButton.toolTip = reason or _("Segment the volume without prompts, with the adapter.")
        self.ui.batchButton.enabled = connected and adapter and not reason
        self.ui.batchButton.toolTip = reason or _("Segment each checked volume automatically with the adapter.")
        self.ui.finetuneButton.enabled = connected
        self.ui.addCaseButton.enabled = hasVolume and bool(p and p.segmentation)
        self.ui.updateAdapterButton.enabled = connected and adapter and bool(self.pending)
        self.ui.undoButton.enabled = bool(self.writer is not None and self.writer.undo.can_undo)
        self._attachController()

    # ------------------------------------------------------------------ prompts (markups)
    def _attachController(self) -> None:
        """Observe the panel's prompt nodes (compared as objects, never by ID)."""
        from MedFMSegmentHelpers.segment_editor import ensureSegmentation
        from MedFMSegmentHelpers.settings import ensure_library_on_path

        p = self._parameterNode
        if p is None or self.logic.client is None or not p.inputVolume or not self.parent.isEntered:
            return
        ensureSegmentation(p)
        wanted = (p.inputVolume, p.segmentation, p.roiNode, p.positivePoints, p.negativePoints)
        if self.controller is None:
            self.controller = self.logic.newController(status=self.setStatus)
        self.logic.applyOptions(self.controller, p)
        if len(wanted) == len(self._attached) and all(a is b for a, b in zip(wanted, self._attached)):
            return
        ensure_library_on_path()
        from MedFMSegmentLib.slicer_bridge.interaction import LibrarySegmentWriter

        self.writer = LibrarySegmentWriter(p.inputVolume, p.segmentation)
        self.controller.attach(p.inputVolume, self.writer, p.roiNode, p.positivePoints, p.negativePoints)
        self._attached = wanted

    def _detachController(self) -> None:
        if self.controller is not None:
            self.controller.detach()
        self.controller, self._attached = None, ()

    def _observeSliceViews(self) -> None:
        layoutManager = slicer.app.layoutManager()
        for viewName in (layoutManager.sliceViewNames() if layoutManager else []):
            sliceNode = layoutManager.sliceWidget(viewName).mrmlSliceNode()
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceViewModified)

    def onSliceViewModified(self, caller, event) -> None:
        if self.controller is not None and self.controller.volume_node is not None:
            self.controller.set_view_from_slice_to_ras(slicer.util.arrayFromVTKMatrix(caller.GetSliceToRAS()))

    def onPoll(self) -> None:
        if self.controller is not None:
            self.controller.options.auto_update = self.ui.autoUpdateCheckBox.checked
            self.controller.poll()
            self.ui.cancelSegmentButton.enabled = self.controller.busy or self.automatic.running
            self.ui.undoButton.enabled = bool(self.writer is not None and self.writer.undo.can_undo)

    def onSegment(self, propagate: bool) -> None:
        if self.controller is not None:
            self.controller.request(propagate=propagate)
            self.controller.poll()

    def onUndo(self) -> None:
        from MedFMSegmentLib.errors import InputError

        try:
            self.writer.undo.undo()
            self.setStatus(_("Undone."))
        except InputError as exc:
            self.setStatus(str(exc))
        self.onParameterNodeModified()

    def onCancelSegment(self) -> None:
        if self.controller is not None:
            self.controller.cancel()
        self.automatic.cancel()

    def onOpenEffect(self) -> None:
        from MedFMSegmentHelpers.segment_editor import ensureSegmentation, openEffect

        p = self._parameterNode
        openEffect(p.inputVolume, ensureSegmentation(p))

    def onAutomatic(self) -> None:
        from MedFMSegmentLib.slicer_bridge import mask_to_segment

        p = self._parameterNode
        segmentation = p.segmentation

        def write(volume, mask) -> None:
            mask_to_segment(mask, volume, segmentation, segment_name=p.adapterName)

        self._runTask(self.automatic, lambda: self.automatic.start([p.inputVolume], p.adapterName, write))

    def _runTask(self, task, start) -> None:
        """Start a service task; a refused request (bad label grid, name taken, ...) is a status line."""
        if task.running:
            self.setStatus(_("That task is still running; cancel it first."))
            return
        try:
            start()
        except Exception as exc:  # noqa: BLE001 - InputError / ServiceError: one line, no dialog
            logging.info(f"MedFMSegment: task not started: {exc}")
            self.setStatus(_("Not started: {error}").format(error=exc))
