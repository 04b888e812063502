"""OpenVINO graphs: conversion from PyTorch, validation against it, the disk cache, compilation.

Conversion costs some seconds, so converted graphs are kept on disk in a user cache folder
(``~/.cache/medfmsegment``, or ``$MEDFMSEGMENT_CACHE``), keyed by a SHA-256 of the weights that
are actually in memory (fine-tuning and adapters change them) and by the OpenVINO and PyTorch
versions. A graph is written only after its outputs were checked against PyTorch, so a cached
graph is a validated one. Compiled graphs are shared in the process by every model with the
same weights. The PyTorch module a graph comes from is made only when converting (a
:class:`Source`). The runtime that calls them is :mod:`.openvino`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..files import atomic_write_text, new_sibling, safe_name

if TYPE_CHECKING:
    from ..models import PromptableModel

__all__ = ["CACHE_ENV", "DECODER_PART", "Source", "cache_dir", "compile_int8_encoder", "compile_part", "compute_threads",
           "cpu_has_native_bf16", "example_images", "fingerprint", "openvino_version", "quiet_torch_threads",
           "weights_digest"]

log = logging.getLogger(__name__)

CACHE_ENV = "MEDFMSEGMENT_CACHE"
# A bf16 graph is checked against the f32 one on the example input by relative L2 error: bf16
# keeps 8 bits of mantissa (a few per cent on the embedding), a broken kernel gives 100 % or NaN.
_BF16_MAX_RELATIVE_ERROR = 0.15
# INT8 moves the embedding more (see int8.py); a broken graph gives 1 or NaN.
_INT8_MAX_RELATIVE_ERROR = 0.5
# Bump when the conversion below changes, so old cache entries are not reused.
_CONVERSION_VERSION = 1
# The decoder graph's part name, also its cache key: renamed whenever the graph's arithmetic
# changes, so that old entries are never reused.
DECODER_PART = "box_decoder_reassociated"

Inputs = tuple[torch.Tensor, ...]
_process_cache: dict[tuple, Any] = {}
# Re-entrant: compiling one part may compile another (the decoder check needs an encoder output).
_process_lock = threading.RLock()
_core = None


def openvino_version() -> str | None:
    """Installed OpenVINO version, or None when it is missing or broken."""
    try:
        import openvino
    except Exception:  # noqa: BLE001 - a broken native install must not break the library
        return None
    return openvino.get_version().split("-")[0] if hasattr(openvino, "get_version") else openvino.__version__


def cpu_has_native_bf16() -> bool:
    """Whether OpenVINO reports bfloat16 compute on this CPU (AVX-512-BF16 or AMX)."""
    if not openvino_version():
        return False
    try:
        return "BF16" in _get_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - an unreadable property means: do not rely on bf16
        return False


_quiet = threading.local()  # per thread: the count its open quiet_torch_threads block put aside


def compute_threads() -> int:
    """This thread's PyTorch thread count as configured, also inside :func:`quiet_torch_threads`
    (where it is 1 for a moment): what OpenVINO graphs compile with and what their cache keys
    name, so a graph first used inside such a block still runs on every thread."""
    return getattr(_quiet, "threads", None) or torch.get_num_threads()


@contextmanager
def quiet_torch_threads(model: PromptableModel) -> Iterator[None]:
    """Run the PyTorch work between a model's OpenVINO calls on one thread.

    After a parallel PyTorch operation, PyTorch's OpenMP threads keep spinning for some
    milliseconds, and an OpenVINO graph started then shares the cores with them and runs
    measurably slower. So the small PyTorch steps of a prompt (upsampling, thresholding,
    statistics) run single-threaded when ``model`` runs on OpenVINO; elsewhere this does nothing.
    The count (PyTorch keeps it per thread) is restored on exit.
    """
    accelerator = getattr(model, "accelerator", None)
    threads = torch.get_num_threads()
    if getattr(accelerator, "name", None) != "openvino" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    _quiet.threads = threads
    try:
        yield
    finally:
        _quiet.threads = None
        torch.set_num_threads(threads)


def cache_dir() -> Path:
    """Folder of converted models: ``$MEDFMSEGMENT_CACHE``, else ``$XDG_CACHE_HOME/medfmsegment``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medfmsegment"



def weights_digest(*modules: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and values of the modules' parameters and buffers.

    Hashes what is in memory, so merged adapters, fine-tuned or replaced weights get their own key.
    """
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
            array = tensor.detach().cpu().contiguous()
            digest.update(f"{index}:{name}:{array.dtype}:{tuple(array.shape)};".encode())
            if array.dtype == torch.bfloat16:
                array = array.view(torch.int16)
            digest.update(array.numpy().tobytes() if array.numel() else b"")
    return digest.hexdigest()


def fingerprint(*modules: nn.Module) -> tuple | None:
    """Cheap identity of the weights: which tensors, and their in-place version counters.

    Loading a state dict, an optimiser step or injecting LoRA layers all change it, so a converted
    graph is never used for weights it was not converted from. None when it cannot be read.
    """
    try:
        return tuple((index, name, id(p), p._version) for index, module in enumerate(modules)
                     for name, p in module.named_parameters())
    except RuntimeError:  # inference tensors carry no version counter
        return None


@dataclass
class Source:
    """What a graph is converted from: ``make()`` builds the PyTorch module (called only when
    converting), ``digest`` is the :func:`weights_digest` of the weights it computes with (the
    cache key)."""

    make: Callable[[], nn.Module]
    digest: str
    _module: nn.Module | None = field(default=None, repr=False)

    @classmethod
    def of(cls, module: nn.Module) -> "Source":
        """A module already built, keyed by its own weights."""
        return cls(lambda: module, weights_digest(module), module)

    def module(self) -> nn.Module:
        if self._module is None:
            self._module = self.make()
        return self._module


def _get_core():
    global _core
    if _core is None:
        import openvino as ov

        _core = ov.Core()
    return _core


def example_images(size: int) -> torch.Tensor:
    """Deterministic image-like input in [0, 1] for conversion checks: smooth shapes plus noise."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = ((xx / 0.6) ** 2 + (yy / 0.4) ** 2 <= 1).float() * 0.5 + 0.25 * (xx + 1)
    image = (blob + 0.05 * torch.rand(size, size, generator=generator)).clamp(0, 1)
    return image.expand(1, 3, size, size).contiguous()


def _convert(module: nn.Module, example: tuple[torch.Tensor, ...]):
    """PyTorch module -> static-shape OpenVINO model.

    ``torch.export`` first (a plain ``torch.jit.trace`` when export fails): either converts several
    times faster than ``openvino.convert_model`` on the module itself.
    """
    import openvino as ov

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python asserts on shapes
        try:
            converted = ov.convert_model(torch.export.export(module, example))
        except Exception as exc:  # noqa: BLE001 - some graphs only trace
            log.debug("torch.export conversion failed (%s); tracing instead", exc)
            traced = torch.jit.trace(module, example, check_trace=False)
            converted = ov.convert_model(traced, example_input=example)
    converted.reshape({converted.input(i): ov.PartialShape(list(t.shape)) for i, t in enumerate(example)})
    return converted


def _check_close(name: str, got: np.ndarray, expected: torch.Tensor, rel: float = 1e-3) -> float:
    """Maximum absolute difference; raises when above ``rel`` of the reference's range."""
    expected_np = expected.detach().float().numpy()
    error = float(np.abs(got - expected_np).max())
    limit = rel * max(1.0, float(np.abs(expected_np).max()))
    if not np.isfinite(error) or error > limit:
        raise RuntimeError(f"converted {name} differs from PyTorch by {error:.3g} (limit {limit:.3g})")
    return error


def _check_relative(name: str, got: np.ndarray, expected: np.ndarray, limit: float) -> float:
    """Relative L2 error ``|got - expected| / |expected|``; raises when above ``limit`` or not finite."""
    error = float(np.linalg.norm((got - expected).ravel()) / max(float(np.linalg.norm(expected.ravel())), 1e-12))
    if not np.isfinite(error) or error > limit:
        raise RuntimeError(f"{name} differs from f32 by a relative error of {error:.3g} (limit {limit:.3g})")
    return error


def _cache_folder(part: str, model: PromptableModel, digest: str) -> Path:
    key = f"{model.spec.name}-{part}-{digest[:24]}-ov{openvino_version()}-pt{torch.__version__}-v{_CONVERSION_VERSION}"
    return cache_dir() / "openvino" / safe_name(key)


def _precision_check_file(part: str, model: PromptableModel, digest: str, precision: str) -> Path:
    """Marker that ``precision`` passed its check for these weights on this CPU model."""
    try:
        cpu = _get_core().get_property("CPU", "FULL_DEVICE_NAME")
    except Exception:  # noqa: BLE001
        cpu = "unknown"
    cpu_key = hashlib.sha256(f"{cpu}|{compute_threads()}".encode()).hexdigest()[:16]
    return _cache_folder(part, model, digest) / f"check-{precision}-{cpu_key}.json"


def _read_cached(folder: Path):
    """The OpenVINO model saved in ``folder``, or None when absent (a damaged entry is removed)."""
    xml = folder / "model.xml"
    if not (xml.is_file() and (folder / "model.bin").is_file() and (folder / "meta.json").is_file()):
        return None
    try:
        loaded = _get_core().read_model(str(xml))
        log.debug("OpenVINO model loaded from %s", folder)
        return loaded
    except Exception as exc:  # noqa: BLE001 - a damaged entry is replaced by the caller
        log.warning("cached OpenVINO model %s is unreadable (%s); making it again", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _load_or_convert(part: str, model: PromptableModel, source: Source, example_fn: Callable[[], Inputs]):
    """OpenVINO model of ``source`` from the disk cache, or converted, validated and cached.

    ``example_fn`` gives the example inputs; it is called only when converting (it may be costly).
    """
    digest = source.digest
    folder = _cache_folder(part, model, digest)
    loaded = _read_cached(folder)
    if loaded is not None:
        return loaded
    log.info("converting %s %s for OpenVINO (once per weights; cached in %s)", model.spec.name, part, folder.parent)
    example = example_fn()
    module = source.module()
    converted = _convert(module, example)
    # Validate before caching: only graphs that reproduce PyTorch are ever written or used.
    with torch.inference_mode():
        reference = module(*example)
    reference = reference if isinstance(reference, tuple) else (reference,)
    request = _compile(converted, part).create_infer_request()
    outputs = request.infer({i: t.numpy() for i, t in enumerate(example)})
    errors = [_check_close(f"{part} output {i}", outputs[i], ref) for i, ref in enumerate(reference)]
    meta = {"model": model.spec.name, "part": part, "weights_digest": digest, "weights_file_sha256": model.weights_sha256,
            "openvino": openvino_version(), "torch": torch.__version__, "max_abs_error_vs_torch": errors,
            "inputs": [list(t.shape) for t in example]}
    try:
        _save_atomically(converted, folder, meta)
    except OSError as exc:  # a read-only home must not stop acceleration in this process
        log.warning("cannot write the OpenVINO cache in %s (%s)", folder.parent, exc)
    return converted


def _write_marker(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _save_atomically(converted, folder: Path, meta: dict) -> None:
    """Write model.xml/.bin + meta.json into a temporary folder beside ``folder``, then rename it."""
    import openvino as ov

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_sibling(folder, directory=True)
    try:
        # compress_to_fp16=False: the default would store fp16 weights and change the outputs.
        ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "model.xml").is_file():  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compile_config(precision: str = "f32") -> dict:
    # The precision always explicit: on CPUs with AMX/AVX-512-BF16 OpenVINO would otherwise pick
    # bf16 on its own. LATENCY + torch's thread count: one request at a time, as the predictor uses it.
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": max(1, compute_threads()),
            "INFERENCE_PRECISION_HINT": precision}


# Extra compile settings per part. The decoder graph runs without OpenVINO's "snippets" fusion:
# it fused the reassociated attention's small products with the adds and normalisations around
# them into kernels several times slower. SNIPPETS_MODE is a CPU plugin setting that OpenVINO accepts at compile time without listing it; a version that refuses it
# compiles with defaults.
_PART_CONFIG = {DECODER_PART: {"SNIPPETS_MODE": "DISABLE"}}


def _compile(converted, part: str, precision: str = "f32"):
    """``converted`` compiled for the CPU with :func:`_compile_config` and ``part``'s own settings.

    Not through OpenVINO's compiled-model cache (``CACHE_DIR``): it would shorten compiling, but
    OpenVINO rewrites a blob in place, so processes starting together (batch workers, the service
    beside the command line) could read one being written.
    """
    config = _compile_config(precision)
    extra = _PART_CONFIG.get(part, {})
    if extra:
        try:
            return _get_core().compile_model(converted, "CPU", {**config, **extra})
        except Exception as exc:  # noqa: BLE001 - a tuning setting must not turn acceleration off
            log.debug("compiling %s with %s failed (%s); using the defaults", part, extra, exc)
    return _get_core().compile_model(converted, "CPU", config)


def compile_part(part: str, model: PromptableModel, source: Source, example_fn: Callable[[], Inputs],
                 precision: str = "f32") -> Any:
    """Compiled model for one part, shared by every model with the same weights in this process.

    The converted graph (and its disk cache) does not depend on the precision; the compiled one
    does. The first bf16 compilation on a CPU model is checked against the f32 one (itself
    checked against PyTorch at conversion) on ``example_fn``'s input, and a marker in the disk
    cache records the pass, so a CPU whose bf16 kernels go wrong falls back to PyTorch instead of
    giving bad masks, and later processes skip the check.
    """
    digest = source.digest
    key = (part, model.spec.name, digest, compute_threads(), str(cache_dir()), precision)
    with _process_lock:
        compiled = _process_cache.get(key)
        if compiled is not None:
            return compiled
    if precision != "f32":
        marker = _precision_check_file(part, model, digest, precision)
        reference_model = None if marker.is_file() else compile_part(part, model, source, example_fn, "f32")
        with _process_lock:
            converted = _load_or_convert(part, model, source, example_fn)
            compiled = _compile(converted, part, precision)
            if reference_model is not None:  # first use of this precision on this CPU model
                inputs = {i: t.numpy() for i, t in enumerate(example_fn())}
                expected = reference_model.create_infer_request().infer(inputs)
                got = compiled.create_infer_request().infer(inputs)
                errors = [_check_relative(f"{part} output {i} ({precision})", np.asarray(got[i]),
                                          np.asarray(expected[i]), _BF16_MAX_RELATIVE_ERROR)
                          for i in range(len(reference_model.outputs))]
                try:
                    _write_marker(marker, json.dumps({"precision": precision, "relative_error_vs_f32": errors}))
                except OSError as exc:
                    log.warning("cannot write %s (%s)", marker, exc)
            _process_cache[key] = compiled
        return compiled
    with _process_lock:
        converted = _load_or_convert(part, model, source, example_fn)
        compiled = _compile(converted, part, precision)
        _process_cache[key] = compiled
    return compiled


def compile_int8_encoder(model: PromptableModel, source: Source, images: torch.Tensor, float_precision: str) -> Any:
    """The encoder quantized to INT8 (:mod:`.int8`), compiled with
    ``float_precision`` for the operations that stay in floating point.

    Quantizing takes minutes, so the INT8 graph is cached on disk beside the float one, keyed by
    the weights, the versions and the calibration set. Before it is cached, its embedding of the
    example image is checked against the float32 graph's (relative L2 below
    ``_INT8_MAX_RELATIVE_ERROR``).
    """
    from .int8 import CALIBRATION_VERSION, nncf_version, quantize_encoder

    digest = source.digest
    key = ("encoder-int8", model.spec.name, digest, compute_threads(), str(cache_dir()), float_precision)
    with _process_lock:
        compiled = _process_cache.get(key)
        if compiled is not None:
            return compiled
        folder = _cache_folder(f"encoder-int8-nncf{nncf_version()}-c{CALIBRATION_VERSION}", model, digest)
        quantized = _read_cached(folder)
        if quantized is None:
            converted = _load_or_convert("encoder", model, source, lambda: (images,))
            log.warning("quantizing the %s encoder to INT8 (once per weights, a few minutes on a small CPU; "
                        "cached in %s)", model.spec.name, folder.parent)
            quantized = quantize_encoder(converted, images.shape[-1], float_stem=_patch_embedding_convolutions(model))
            reference = compile_part("encoder", model, source, lambda: (images,), "f32")
            inputs = {0: images.numpy()}
            expected = reference.create_infer_request().infer(inputs)[0]
            got = _compile(quantized, "encoder-int8").create_infer_request().infer(inputs)[0]
            error = _check_relative("INT8 encoder output", np.asarray(got), np.asarray(expected), _INT8_MAX_RELATIVE_ERROR)
            meta = {"model": model.spec.name, "part": "encoder", "precision": "int8", "weights_digest": digest,
                    "openvino": openvino_version(), "nncf": nncf_version(), "calibration_version": CALIBRATION_VERSION,
                    "relative_error_vs_f32": error}
            try:
                _save_atomically(quantized, folder, meta)
            except OSError as exc:
                log.warning("cannot write the OpenVINO cache in %s (%s)", folder.parent, exc)
        compiled = _compile(quantized, "encoder-int8", float_precision)
        _process_cache[key] = compiled
    return compiled


def _patch_embedding_convolutions(model: PromptableModel) -> int:
    """Convolutions in the encoder's patch embedding (TinyViT: 2, SAM's ViT: 1); they are the
    first ones of the converted graph."""
    patch_embed = getattr(model.image_encoder, "patch_embed", None)
    if patch_embed is None:
        return 1
    return max(1, sum(isinstance(m, nn.Conv2d) for m in patch_embed.modules()))


