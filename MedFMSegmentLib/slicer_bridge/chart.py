"""A live chart of fine-tuning (loss and validation Dice per step) as Slicer plot nodes.

A table node holds the columns ``step``, ``loss`` and ``val_dice``; two plot series draw loss and
validation Dice against the step in one chart node, which a plot view shows (the module switches
the layout to one with a plot view). Nodes are created once per fine-tuning run and can be
removed with :meth:`TrainingChart.remove`, so repeated runs leave no stray nodes.
"""

from __future__ import annotations

import slicer
import vtk

__all__ = ["TrainingChart"]


class TrainingChart:
    """Loss and validation Dice of one fine-tuning run.

    Args:
        scene: The MRML scene.
        name: Prefix of the node names.
    """

    COLUMNS = ("step", "loss", "val_dice")

    def __init__(self, scene, name: str = "MedFMSegment fine-tuning") -> None:
        self.scene = scene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} table")
        for column in self.COLUMNS:
            array = vtk.vtkFloatArray()
            array.SetName(column)
            self.table.AddColumn(array)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle(name)
        self.chart.SetXAxisTitle("step")
        self.series = []
        for column, color in (("loss", (0.85, 0.3, 0.2)), ("val_dice", (0.2, 0.5, 0.9))):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {column}")
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetColor(*color)
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
            self.series.append(series)
        self._last_step = None

    @property
    def nodes(self) -> list:
        return [self.table, self.chart, *self.series]

    def add(self, step: int, loss: float | None, val_dice: float | None = None) -> bool:
        """Append one row (a repeated step is ignored); a missing value is NaN (a gap in its curve)."""
        if step is None or step == self._last_step:
            return False
        self._last_step = step
        table = self.table.GetTable()
        row = table.InsertNextBlankRow()
        for column, value in zip(self.COLUMNS, (step, loss, val_dice)):
            table.SetValue(row, self.COLUMNS.index(column), vtk.vtkVariant(float("nan") if value is None
                                                                         else float(value)))
        table.Modified()
        return True

    def rows(self) -> list[tuple[float, float, float]]:
        """The table's rows as ``(step, loss, val_dice)``."""
        table = self.table.GetTable()
        return [tuple(table.GetValue(r, c).ToDouble() for c in range(3)) for r in range(table.GetNumberOfRows())]

    def remove(self) -> None:
        for node in self.nodes:
            if node.GetScene() is not None:
                self.scene.RemoveNode(node)

