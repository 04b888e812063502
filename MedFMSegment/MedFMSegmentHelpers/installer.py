"""Install the service's Python packages into Slicer's Python, asking first, never touching torch.

torch comes from the PyTorch extension (it picks the CUDA build); what is missing or outside its
range in the module's requirements file is installed at its tested version, under a pip
constraints file that pins the installed torch, SimpleITK, numpy and scipy, so no dependency can
replace them. Failures end in one status line that says
what to do (``slicer.util.pip_install`` shows its own error dialog in newer Slicer versions).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import slicer

from . import dependencies

__all__ = ["installDependencies"]


def installDependencies(requirementsPath: str, statusLabel) -> bool:
    """Ask, then install what is missing; returns True when everything is installed afterwards."""
    torch = dependencies.torch_status()
    missing = dependencies.missing_requirements(dependencies.read_requirements(requirementsPath))
    if torch[0] == "broken":
        statusLabel.text = (f"PyTorch is broken ({torch[1]}). Reinstall it from the PyTorch module "
                            "(PyTorch extension), restart Slicer, then click Install again.")
        return False
    if torch[0] == "ok" and not missing:
        statusLabel.text = "All dependencies are installed."
        return True
    if not slicer.util.confirmOkCancelDisplay(dependencies.install_summary(missing, torch) +
                                              "\n\nThis downloads several hundred MB and can take minutes.",
                                              windowTitle="MedFMSegment: install dependencies"):
        statusLabel.text = "Installation cancelled."
        return False
    folder = Path(tempfile.mkdtemp(prefix="MedFMSegment-install-"))
    try:
        if torch[0] == "missing":
            statusLabel.text = "Installing PyTorch through the PyTorch extension..."
            slicer.app.processEvents()
            try:
                import PyTorchUtils
            except ImportError:
                statusLabel.text = ("Install the PyTorch extension from the Extensions Manager, restart Slicer, "
                                    "then click Install again.")
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                raise RuntimeError("the PyTorch extension could not install PyTorch")
        if missing:
            statusLabel.text = f"Installing {len(missing)} package(s); the Python console shows pip's progress..."
            slicer.app.processEvents()
            requirements = folder / "requirements.txt"
            tested = dependencies.read_tested_versions(requirementsPath)
            requirements.write_text("\n".join(dependencies.install_lines(missing, tested)) + "\n", encoding="utf-8")
            constraints = folder / "constraints.txt"
            constraints.write_text("\n".join(dependencies.constraints_for()) + "\n", encoding="utf-8")
            slicer.util.pip_install(["-r", str(requirements), "-c", str(constraints)])
    except Exception as exc:  # noqa: BLE001 - the panel stays usable; one line says what to do
        logging.exception("MedFMSegment: installing dependencies failed")
        statusLabel.text = (f"Installing failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
                            "Check the network connection and pip's output in the Python console, then click "
                            "Install again; PyTorch was left as it was.")
        return False
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    statusLabel.text = "Dependencies installed."
    return True
