"""The panel's Adaptation and Batch sections: fine-tuning, "Add this case" / "Update adapter", and
batch outputs (the scene, or files in each format of the library's batch).

A mixin of ``MedFMSegmentWidget`` (it uses the widget's ``self.ui``, parameter node, tasks and
``_runTask``); the logic lives in the library (``slicer_bridge.updates``, ``slicer_bridge.outputs``).
"""

import logging

from slicer.i18n import tr as _

__all__ = ["AdaptationBatchMixin"]


class AdaptationBatchMixin:
    """Fine-tuning, continual updates of an adapter, and batch segmentation."""

    def onFinetune(self) -> None:
        p = self._parameterNode
        labels = list(self.ui.trainingLabelsSelector.checkedNodes())
        if not labels or not p.newAdapterName.strip():
            self.setStatus(_("Check at least one training case and name the new adapter."))
            return
        config = {"name": p.newAdapterName.strip(), "model": p.modelName, "rank": int(p.rank)}
        if int(p.steps) > 0:
            config["steps"] = int(p.steps)

        def finished(result: dict) -> None:
            self.ui.adaptationResultLabel.text = self.ui.statusLabel.text
            self.updateAdapterList()

        self._runTask(self.adaptation, lambda: self.adaptation.start(labels, p.inputVolume, config, finished))

    def onAddCase(self) -> None:
        """Add the input volume and its (corrected) segment to the cases of the next adapter update."""
        p = self._parameterNode
        try:
            if self.pending is None:
                from MedFMSegmentLib.slicer_bridge.updates import PendingCases

                self.pending = PendingCases()
            self.ui.pendingCasesLabel.text = self.pending.add(p.inputVolume, p.segmentation, p.adapterName)
        except Exception as exc:  # noqa: BLE001 - InputError: one status line
            self.setStatus(_("Not added: {error}").format(error=exc))
        self.onParameterNodeModified()

    def onUpdateAdapter(self) -> None:
        """Continue the adapter in use with the added cases (and the checked training cases)."""
        p = self._parameterNode
        if not self.pending:
            self.setStatus(_("Add at least one corrected case first (Add this case)."))
            return
        labels = list(self.ui.trainingLabelsSelector.checkedNodes())
        cases = self.pending  # the scene may close (and the panel drop them) before the job ends

        def finished(result: dict) -> None:
            cases.clear()
            self.ui.pendingCasesLabel.text = ""
            self.ui.adaptationResultLabel.text = self.ui.statusLabel.text
            self.updateAdapterList()

        self._runTask(self.adaptation, lambda: self.adaptation.update(
            self.pending, p.adapterName, labels, p.inputVolume, int(p.steps), finished))

    def _fillBatchFormats(self) -> None:
        """Batch outputs: the scene, or files in each format of the library's batch."""
        combo = self.ui.batchFormatComboBox
        try:
            from MedFMSegmentHelpers.settings import ensure_library_on_path

            ensure_library_on_path()
            from MedFMSegmentLib.slicer_bridge.outputs import output_choices

            choices = output_choices()
        except Exception as exc:  # noqa: BLE001 - a broken install still offers the scene
            logging.warning(f"MedFMSegment: batch file formats unavailable: {exc}")
            choices = [("scene", _("segmentations in the scene"))]
        combo.clear()
        for name, label in choices:
            combo.addItem(label, name)

    def onBatch(self) -> None:
        volumes = list(self.ui.batchVolumesSelector.checkedNodes())
        if not volumes:
            self.setStatus(_("Check at least one volume."))
            return
        adapter = self._parameterNode.adapterName
        fmt = self.ui.batchFormatComboBox.itemData(self.ui.batchFormatComboBox.currentIndex) or "scene"
        self._runTask(self.batch, lambda: self.batch.start(volumes, adapter, self._batchTarget(volumes, fmt)))

    def _batchTarget(self, volumes: list, fmt: str):
        """None (a segmentation per volume in the scene) or a writer of each volume's file."""
        if fmt == "scene":
            return None
        from MedFMSegmentHelpers.settings import path_or_none
        from MedFMSegmentLib.slicer_bridge.outputs import dicom_files_of, output_paths, write_output

        paths = dict(zip(volumes, output_paths(volumes, path_or_none(self.ui.batchOutputPathLineEdit.currentPath), fmt)))
        if fmt == "dcm":
            for volume in volumes:  # before anything is sent: every volume must come from DICOM
                dicom_files_of(volume)
        adapter = self._parameterNode.adapterName
        metadata = (getattr(self, "_adapters", {}).get(adapter) or {}).get("metadata") or {}
        name = metadata.get("label_name") or adapter or "Segment_1"

        def write(volume, mask) -> None:
            written = write_output(mask, volume, paths[volume], fmt, segment_name=name, adapter_metadata=metadata)
            self.setStatus(_("Wrote {path}").format(path=written))

        return write
