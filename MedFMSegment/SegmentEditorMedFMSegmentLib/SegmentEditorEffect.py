"""Segment Editor effect "MedFMSegment": a box (drag) or +/- clicks in a slice view, segmented by the service.

Results go through ``scriptedEffect.saveStateForUndo()`` (once per prompt) and
``modifySelectedSegmentByLabelmap(..., ModificationModeSet)``, so Segment Editor's undo/redo,
editable area, overwrite mode and selected segment apply to AI edits as to any other effect. A box
drawn in a slice view stays on that slice (2D); "Propagate" segments it in 3D, and the 3D result
grows in the views as the service finishes slices.
"""

import os

import numpy as np
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

__all__ = ["SegmentEditorEffect", "EffectSegmentWriter"]

DRAG_PIXELS = 4  # a press and release further apart than this is a box, else a click


class EffectSegmentWriter:
    """Writes the controller's results into the selected segment through Segment Editor."""

    def __init__(self, scriptedEffect, volumeNode) -> None:
        self.scriptedEffect, self.volumeNode = scriptedEffect, volumeNode

    def begin(self) -> None:
        self.scriptedEffect.saveStateForUndo()  # one undo step per prompt

    def write(self, mask, region) -> None:
        from MedFMSegmentLib.slicer_bridge import labelmap_from_mask, merged_mask

        parameters = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameters.GetSegmentationNode()
        merged = merged_mask(mask, region, self.volumeNode, segmentationNode, parameters.GetSelectedSegmentID())
        labelmap = labelmap_from_mask(merged, self.volumeNode, segmentationNode)
        self.scriptedEffect.modifySelectedSegmentByLabelmap(
            labelmap, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)

    def end(self) -> None:
        pass


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Box and click prompts for LiteMedSAM / MedSAM / SAM in Segment Editor."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedFMSegment"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.controller = None
        self.view = None
        self._press = None
        self._bands = {}
        self._timer = None
        self._activeEffect = False

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "..", "Resources", "Icons", "MedFMSegment.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return ("<html>Segment with LiteMedSAM / MedSAM / SAM.<p>Drag in a slice view: a box on that slice. "
                "Click: a point on the structure; Ctrl+click: a point on background. <b>Propagate</b> segments the "
                "box in 3D. Undo with Ctrl+Z. Start the service in the MedFMSegment module first.</html>")

    # ------------------------------------------------------------------ options panel
    def setupOptionsFrame(self):
        self.propagateButton = qt.QPushButton("Propagate (3D)")
        self.propagateButton.toolTip = "Segment the current box in 3D; the result grows as slices finish"
        self.clearButton = qt.QPushButton("Clear prompts")
        self.cancelButton = qt.QPushButton("Cancel")
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        row = qt.QHBoxLayout()
        for button in (self.propagateButton, self.clearButton, self.cancelButton):
            row.addWidget(button)
        self.scriptedEffect.addOptionsWidget(row)
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.clearButton.connect("clicked()", self.onClear)
        self.cancelButton.connect("clicked()", self.onCancel)

    def setStatus(self, text: str) -> None:
        self.statusLabel.text = text

    # ------------------------------------------------------------------ activation
    def _logic(self):
        from MedFMSegmentHelpers.logic import MedFMSegmentLogic

        return MedFMSegmentLogic.shared()

    def activate(self):
        self._activeEffect = True
        self._logic().addListener(self._onServiceChanged)  # a service started later applies at once
        self._connect()

    def _connect(self) -> None:
        from MedFMSegmentLib.slicer_bridge.interaction import ViewPrompts

        logic = self._logic()
        volumeNode = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        self.view = ViewPrompts()
        self.controller = logic.newController(status=self.setStatus)
        if self.controller is None or volumeNode is None:
            self.controller = None
            self.setStatus("Start the service in the MedFMSegment module (Setup) and choose a source volume.")
            return
        logic.applyOptions(self.controller, logic.getParameterNode())
        self.controller.attach(volumeNode, EffectSegmentWriter(self.scriptedEffect, volumeNode))
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.controller.poll)
        self._timer.start()
        self.setStatus("Drag a box or click in a slice view.")

    def _disconnect(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self.controller is not None:
            self.controller.detach()
            self.controller = None

    def _onServiceChanged(self, text: str) -> None:
        self._disconnect()
        self._connect()

    def deactivate(self):
        self._activeEffect = False
        self._logic().removeListener(self._onServiceChanged)
        self._disconnect()
        for viewWidget, (actor, _) in list(self._bands.items()):
            self.scriptedEffect.removeActor2D(viewWidget, actor)
        self._bands = {}

    def sourceVolumeNodeChanged(self):
        """Prompts refer to the source volume: follow it."""
        if self._activeEffect:
            self._onServiceChanged("")

    # ------------------------------------------------------------------ prompts
    def _ijk(self, xy, viewWidget):
        """View xy -> the source volume's voxel (i, j, k), through world RAS and the volume's own
        geometry (``xyToIjk`` on ``sourceVolumeImageData()`` would give indices of the volume
        resampled to the segmentation's geometry, which differ when the two grids do)."""
        from MedFMSegmentLib.slicer_bridge import volume_geometry

        volumeNode = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        ras = np.array(self.xyToRas(xy, viewWidget), float).reshape(1, 3)
        return volume_geometry(volumeNode).ras_to_index(ras)[0]

    def _viewPlane(self, viewWidget):
        from MedFMSegmentLib.slicer_bridge import slice_view_voxel_slice

        volumeNode = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        sliceToRAS = slicer.util.arrayFromVTKMatrix(viewWidget.sliceLogic().GetSliceNode().GetSliceToRAS())
        return slice_view_voxel_slice(volumeNode, sliceToRAS)

    def _segmentSelected(self) -> bool:
        """Results go into the selected segment: with none selected, say so instead of prompting."""
        if self.scriptedEffect.parameterSetNode().GetSelectedSegmentID():
            return True
        self.setStatus("Add or select a segment first: the result goes into the selected segment.")
        return False

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if self.controller is None or viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.LeftButtonPressEvent and not self._segmentSelected():
            return True
        xy = callerInteractor.GetEventPosition()
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            self._press = xy
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent and self._press is not None:
            self._drawBand(viewWidget, self._press, xy)
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self._press is not None:
            start, self._press = self._press, None
            self._hideBand(viewWidget)
            plane = self._viewPlane(viewWidget)
            if plane is None:
                self.setStatus("This view is oblique to the volume: use an axial, coronal or sagittal view.")
                return True
            if max(abs(xy[0] - start[0]), abs(xy[1] - start[1])) > DRAG_PIXELS:
                self._addBox(self._ijk(start, viewWidget), self._ijk(xy, viewWidget), plane)
            else:
                self._addClick(self._ijk(xy, viewWidget), plane, negative=bool(callerInteractor.GetControlKey()))
            return True
        return False

    def _addBox(self, a, b, plane) -> None:
        self.controller.submit(self.view.box(a, b, plane), plane=self.view.plane)

    def _addClick(self, ijk, plane, negative: bool) -> None:
        self.controller.submit(self.view.click(ijk, plane, negative), plane=self.view.plane)

    def onPropagate(self) -> None:
        if self.controller is None or self.view.prompts is None:
            self.setStatus("Draw a box or click first.")
            return
        if not self._segmentSelected():
            return
        self.controller.submit(self.view.prompts, plane=self.view.plane, propagate=True)

    def onClear(self) -> None:
        self.view.clear()
        self.setStatus("Prompts cleared.")

    def onCancel(self) -> None:
        if self.controller is not None:
            self.controller.cancel()

    # ------------------------------------------------------------------ rubber band
    def _drawBand(self, viewWidget, a, b) -> None:
        if viewWidget not in self._bands:
            points = vtk.vtkPoints()
            points.SetNumberOfPoints(4)
            lines = vtk.vtkCellArray()
            lines.InsertNextCell(5, [0, 1, 2, 3, 0])
            polyData = vtk.vtkPolyData()
            polyData.SetPoints(points)
            polyData.SetLines(lines)
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(polyData)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(1.0, 0.85, 0.2)
            self.scriptedEffect.addActor2D(viewWidget, actor)
            self._bands[viewWidget] = (actor, polyData)
        actor, polyData = self._bands[viewWidget]
        for n, (x, y) in enumerate(((a[0], a[1]), (b[0], a[1]), (b[0], b[1]), (a[0], b[1]))):
            polyData.GetPoints().SetPoint(n, x, y, 0.0)
        polyData.GetPoints().Modified()
        actor.SetVisibility(True)
        viewWidget.sliceView().scheduleRender()

    def _hideBand(self, viewWidget) -> None:
        if viewWidget in self._bands:
            self._bands[viewWidget][0].SetVisibility(False)
            viewWidget.sliceView().scheduleRender()
