"""The panel's Setup section: the service (local or remote), the model, the adapter, the dependencies.

A mixin of ``MedFMSegmentWidget`` (it uses the widget's ``self.ui``, ``self.logic`` and parameter
node); kept apart so each file stays small.
"""

from slicer.i18n import tr as _

from . import dependencies
from .settings import adapter_details, model_availability, path_or_none

__all__ = ["SetupSectionMixin"]


class SetupSectionMixin:
    """Service, model and adapter choices, and dependency installation."""

    # ------------------------------------------------------------------ service
    def onStartService(self) -> None:
        p = self._parameterNode
        if p.serviceMode == "remote":
            try:
                self.logic.connectRemote(p.serviceUrl, self.ui.serviceTokenLineEdit.text)
            except Exception as exc:  # noqa: BLE001 - shown as the status
                self.onServiceChanged(_("Could not connect: {error}").format(error=exc))
            return
        status, detail = dependencies.torch_status()
        if status != "ok" or self._missingPackages():
            self.onServiceChanged(_("Install the dependencies first (PyTorch: {status}).").format(status=status))
            return
        model = p.modelName
        checkpoint = path_or_none(p.checkpointPath)
        models = ((model, checkpoint), ("litemedsam", None)) if model != "litemedsam" else ()
        self.logic.startLocalService(path_or_none(p.adapterFolder), p.device, models)

    def onStopService(self) -> None:
        self._detachController()
        self.logic.stopService()
        self.onServiceChanged(_("Stopped."))

    def onTestConnection(self) -> None:
        self.ui.serviceStatusLabel.text = self.logic.testConnection()

    def onServiceChanged(self, text: str) -> None:
        self.ui.serviceStatusLabel.text = text
        self.ui.stopServiceButton.enabled = self.logic.process is not None or self.logic.client is not None
        self._detachController()
        if self.logic.client is not None:
            self.updateAdapterList()
        self.onParameterNodeModified()

    # ------------------------------------------------------------------ model and adapters
    def updateModelChoices(self, *args) -> None:
        combo = self.ui.modelComboBox
        current = self._parameterNode.modelName if self._parameterNode else "litemedsam"
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name, label, enabled, reason in model_availability(self.ui.checkpointPathLineEdit.currentPath):
            combo.addItem(label if enabled else f"{label} ({reason})", name)
            item = combo.model().item(combo.count - 1)
            item.setEnabled(enabled)
            item.setToolTip(reason or label)
            if name == current and enabled:
                combo.currentIndex = combo.count - 1
        combo.blockSignals(wasBlocked)
        self.onModelChanged(combo.currentIndex)

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.modelName = self.ui.modelComboBox.itemData(index)

    def updateAdapterList(self, *args) -> None:
        combo = self.ui.adapterComboBox
        current = self._parameterNode.adapterName if self._parameterNode else ""
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("(none: the base model)"), "")
        self._adapters = {a.get("name", ""): a for a in self.logic.adapters()}
        for name in sorted(self._adapters):
            combo.addItem(name, name)
            if name == current:
                combo.currentIndex = combo.count - 1
        combo.blockSignals(wasBlocked)
        self.onAdapterChanged(combo.currentIndex)

    def onAdapterChanged(self, index: int) -> None:
        name = self.ui.adapterComboBox.itemData(index) if index >= 0 else ""
        if self._parameterNode is not None:
            self._parameterNode.adapterName = name or ""
        meta = (getattr(self, "_adapters", {}).get(name) or {}).get("metadata", {}) or {}
        self.ui.adapterInfoLabel.text = adapter_details(meta)

    # ------------------------------------------------------------------ dependencies
    def _missingPackages(self) -> list:
        return dependencies.missing_requirements(dependencies.read_requirements(self.resourcePath("requirements.txt")))

    def updateDependencyStatus(self) -> None:
        torch, detail = dependencies.torch_status()
        missing = self._missingPackages()
        if torch == "broken":
            text = _("PyTorch is broken ({detail}); reinstall it with the PyTorch extension.").format(detail=detail)
        elif torch == "missing" or missing:
            names = ([_("PyTorch")] if torch == "missing" else []) + missing
            text = _("Missing: {names}.").format(names=", ".join(names))
        else:
            text = _("All dependencies are installed (PyTorch {version}).").format(version=detail)
        self.ui.dependencyStatusLabel.text = text

    def onInstallDependencies(self) -> None:
        from MedFMSegmentHelpers.installer import installDependencies

        installDependencies(self.resourcePath("requirements.txt"), self.ui.dependencyStatusLabel)
        self.updateDependencyStatus()
