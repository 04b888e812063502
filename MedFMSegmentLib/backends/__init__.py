"""Inference backends behind one small interface, and where a model gets one.

A backend is an object set as ``model.accelerator`` with a ``name``, a ``precision`` and
``encode(model, images)`` / ``decode(model, embedding, boxes, points, point_labels, mask_input)``
that return None for calls they do not cover (those run in PyTorch). PyTorch itself is no object:
``model.accelerator is None``. On CUDA, sessions embed through the float16 copy of the encoder
(:mod:`.cuda_half`), attached at load time.

* :data:`BACKENDS`, :data:`PRECISIONS`: the registries the command line and the Slicer module
  take their choices from.
* :func:`accelerate`: attach the backend a name means for a model (at load time; environment
  variables are read there, never per call).
* :mod:`.openvino` (CPU graphs), :mod:`.int8` (NNCF quantization), :mod:`.box_decoder` and
  :mod:`.fast_encoder` (graph rewrites), :mod:`.cuda_half` (the GPU half-precision encoder).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from .openvino_graphs import quiet_torch_threads
from .openvino import (CACHE_ENV, OpenVINOAccelerator, cache_dir, cpu_has_native_bf16, openvino_version,
                       weights_digest)

if TYPE_CHECKING:
    from ..models import PromptableModel

__all__ = ["AUTO_MODELS", "BACKENDS", "BACKEND_ENV", "CACHE_ENV", "PRECISIONS", "PRECISION_ENV", "accelerate",
           "available_backends", "cache_dir", "check_backend", "cpu_has_native_bf16", "default_backend", "default_precision",
           "describe_backends", "openvino_version", "quiet_torch_threads", "resolve_backend", "resolve_precision",
           "weights_digest"]

log = logging.getLogger(__name__)

#: Backend names: ``auto`` (OpenVINO for :data:`AUTO_MODELS` on a CPU when installed, else PyTorch).
BACKENDS = ("auto", "torch", "openvino")
#: OpenVINO compute precisions: ``auto`` is bf16 where the CPU computes bfloat16 natively
#: (AVX-512-BF16 or AMX), else f32; ``int8`` (explicit only) quantizes the encoder with NNCF.
PRECISIONS = ("auto", "f32", "bf16", "int8")
BACKEND_ENV = "MEDFMSEGMENT_BACKEND"
PRECISION_ENV = "MEDFMSEGMENT_PRECISION"
#: The models ``auto`` converts: those whose speed and accuracy ``python -m bench perf`` measures.
AUTO_MODELS = frozenset({"litemedsam"})


def available_backends() -> list[str]:
    """Backends usable in this process (``torch`` always)."""
    return ["torch"] + (["openvino"] if openvino_version() else [])


def default_backend() -> str:
    """``$MEDFMSEGMENT_BACKEND`` when set to a known backend, else ``auto``."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower()
    return value if value in BACKENDS else "auto"


def default_precision() -> str:
    """``$MEDFMSEGMENT_PRECISION`` when set to a known precision, else ``auto``."""
    value = os.environ.get(PRECISION_ENV, "auto").strip().lower()
    return value if value in PRECISIONS else "auto"


def resolve_precision(precision: str | None = None) -> str:
    """``f32``, ``bf16`` or ``int8``: what ``precision`` (None: ``$MEDFMSEGMENT_PRECISION``) means here.

    ``bf16`` asked for on a CPU without native bfloat16 gives ``f32``: OpenVINO would emulate it
    slowly, or ignore it.

    Raises:
        InputError: unknown precision name, or ``int8`` without NNCF installed.
    """
    precision = default_precision() if precision is None else precision
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "f32":
        return "f32"
    if precision == "int8":
        from .int8 import nncf_available

        if not nncf_available():
            raise InputError("precision int8 needs NNCF: pip install nncf")
        return "int8"
    return "bf16" if cpu_has_native_bf16() else "f32"


def check_backend(backend: str | None, precision: str | None = None) -> str:
    """The backend name asked for (None: ``$MEDFMSEGMENT_BACKEND``, else ``auto``), checked together
    with ``precision`` before anything is loaded.

    Raises:
        InputError: unknown backend or precision name, or ``int8`` without NNCF.
    """
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    resolve_precision(precision)
    return backend


def resolve_backend(backend: str, model: PromptableModel) -> str:
    """The backend ``backend`` means for this model, without converting anything.

    Raises:
        InputError: unknown backend name.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if model.device.type != "cpu":
        # On a GPU PyTorch is the fast path; OpenVINO here targets the CPU only.
        return "torch"
    if backend == "auto" and model.spec.name not in AUTO_MODELS:
        return "torch"
    return "openvino" if openvino_version() else "torch"


def describe_backends() -> dict:
    """Backend facts for ``medfmsegment info``, without loading or converting a model.

    ``in_use`` is what the default model gets on the default device (a failed conversion would
    still fall back to ``torch``, with a warning).
    """
    from ..models import DEFAULT_MODEL, resolve_device

    requested = default_backend()
    in_use = "torch"
    if requested != "torch" and resolve_device("auto").type == "cpu" and openvino_version():
        in_use = "openvino" if requested == "openvino" or DEFAULT_MODEL in AUTO_MODELS else "torch"
    from .int8 import nncf_version

    precision = "f32"
    if in_use == "openvino":
        try:
            precision = resolve_precision(default_precision())
        except InputError as exc:  # info reports the problem instead of failing on it
            precision = f"unavailable ({exc})"
    return {"requested": requested, "in_use": in_use, "available": available_backends(),
            "openvino": openvino_version(), "nncf": nncf_version(), "precision": precision,
            "cache_dir": str(cache_dir())}


# ---------------------------------------------------------------------------- public entry point
def accelerate(model: PromptableModel, backend: str = "auto", precision: str | None = None,
               parts: tuple[str, ...] = ("encoder", "decoder")) -> PromptableModel:
    """Attach a faster inference backend to ``model`` in place and return it.

    Never fails for runtime reasons: when the backend is not installed, the model is not on the
    CPU, or conversion or validation fails, a warning is logged and the model stays on PyTorch.

    Args:
        model: A loaded model in eval mode.
        backend: ``auto`` (OpenVINO for the benchmarked models on a CPU when installed, else
            PyTorch), ``torch`` (plain PyTorch), or ``openvino`` (try it for any model).
        precision: OpenVINO's compute precision, see :func:`resolve_precision` (None:
            ``$MEDFMSEGMENT_PRECISION``, else ``auto``). Ignored by PyTorch.
        parts: What to convert: ``("encoder", "decoder")`` or ``("encoder",)`` (the decoder
            stays in PyTorch, e.g. a fine-tuned decoder on the base encoder).

    Returns:
        The same model; ``model.backend`` tells which backend is active and
        ``model.accelerator.precision`` in which precision.

    Raises:
        InputError: unknown backend or precision name.
    """
    chosen = resolve_backend(backend, model)
    compute_precision = resolve_precision(precision)
    model.accelerator = None
    if chosen == "torch":
        if backend == "openvino":
            reason = "OpenVINO is not installed" if not openvino_version() else f"the device is {model.device}"
            log.warning("backend openvino not used: %s; running plain PyTorch", reason)
        return model
    try:
        model.accelerator = OpenVINOAccelerator.build(model, compute_precision, parts)
    except Exception as exc:  # noqa: BLE001 - any conversion problem means: stay on PyTorch
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        log.warning("OpenVINO acceleration failed (%s: %s); running plain PyTorch", type(exc).__name__, message)
        model.accelerator = None
    return model


