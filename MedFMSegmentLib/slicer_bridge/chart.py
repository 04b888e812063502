"""A live chart of fine-tuning (loss, validation Dice and the base model's Dice per step) as Slicer plot nodes.

A table node holds the columns ``step``, ``loss``, ``val_dice`` and ``base_dice``; three plot
series draw them against the step in one chart node, which a plot view shows (the module switches
the layout to one with a plot view). The base model's Dice on the same validation slices is
measured once before training, so its dashed line is the level the adapted curve is compared
with; :meth:`TrainingChart.finish` puts the final adapted and base figures side by side in the
title. Nodes are created once per fine-tuning run and can be removed with
:meth:`TrainingChart.remove`, so repeated runs leave no stray nodes.
"""

from __future__ import annotations

import slicer
import vtk

__all__ = ["TrainingChart"]


class TrainingChart:
    """Loss, validation Dice and the base model's validation Dice of one fine-tuning run.

    Args:
        scene: The MRML scene.
        name: Prefix of the node names.
    """

    COLUMNS = ("step", "loss", "val_dice", "base_dice")
    SERIES = (("loss", "loss", (0.85, 0.3, 0.2)), ("val_dice", "validation Dice", (0.2, 0.5, 0.9)),
              ("base_dice", "base model Dice", (0.45, 0.45, 0.45)))

    def __init__(self, scene, name: str = "MedFMSegment fine-tuning") -> None:
        self.scene = scene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} table")
        for column in self.COLUMNS:
            array = vtk.vtkFloatArray()
            array.SetName(column)
            self.table.AddColumn(array)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self.name = name
        self.chart.SetTitle(name)
        self.chart.SetXAxisTitle("step")
        self.series = []
        for column, label, color in self.SERIES:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {label}")
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetColor(*color)
            if column == "base_dice":
                series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
                series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
            self.series.append(series)
        self._last_step = None

    @property
    def nodes(self) -> list:
        return [self.table, self.chart, *self.series]

    def add(self, step: int, loss: float | None, val_dice: float | None = None, base_dice: float | None = None) -> bool:
        """Append one row (a repeated step is ignored); a missing value is NaN (a gap in its curve)."""
        if step is None or step == self._last_step:
            return False
        self._last_step = step
        table = self.table.GetTable()
        row = table.InsertNextBlankRow()
        for column, value in zip(self.COLUMNS, (step, loss, val_dice, base_dice)):
            table.SetValue(row, self.COLUMNS.index(column), vtk.vtkVariant(float("nan") if value is None
                                                                         else float(value)))
        table.Modified()
        return True

    def rows(self) -> list[tuple[float, float, float, float]]:
        """The table's rows as ``(step, loss, val_dice, base_dice)``."""
        table = self.table.GetTable()
        return [tuple(table.GetValue(r, c).ToDouble() for c in range(len(self.COLUMNS)))
                for r in range(table.GetNumberOfRows())]

    def finish(self, adapted: float | None, base: float | None) -> str:
        """Show the final validation Dice of the adapter and of the base model side by side (title)."""
        def figure(value: float | None) -> str:
            return "not measured" if value is None else f"{value:.3f}"

        title = f"{self.name}: validation Dice adapted {figure(adapted)} vs base model {figure(base)}"
        self.chart.SetTitle(title)
        return title

    def remove(self) -> None:
        for node in self.nodes:
            if node.GetScene() is not None:
                self.scene.RemoveNode(node)

