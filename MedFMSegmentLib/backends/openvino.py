"""The OpenVINO backend: the image encoder and the box-prompt decoder as OpenVINO graphs on the CPU.

``model.encode`` and ``model.decode`` keep their signatures, shapes and dtypes (torch float32
tensors); only the engine underneath changes. Anything the converted graphs do not cover falls
back to PyTorch call by call: clicks, several boxes at once, a mask input, gradients, training
mode, a GPU, half precision, or weights changed after conversion. The graphs are arranged for
the CPU (:mod:`.box_decoder`, :func:`~.fast_encoder.for_openvino`); precisions are ``f32``,
``bf16`` (where the CPU computes it natively) and the explicit ``int8`` encoder (:mod:`.int8`).
``bench/bench_perf.py`` measures speed and Dice against plain PyTorch.

Conversion costs some seconds, so converted graphs are kept on disk in a user cache folder
(``~/.cache/medfmsegment``, or ``$MEDFMSEGMENT_CACHE``), keyed by a SHA-256 of the weights that
are actually in memory (fine-tuning and adapters change them) and by the OpenVINO and PyTorch
versions. A graph is written only after its outputs were checked against PyTorch, so a cached
graph is a validated one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from ..io import new_sibling
from .box_decoder import BoxDecoder, image_tokens
from .fast_encoder import for_openvino

if TYPE_CHECKING:
    from ..models import PromptableModel

__all__ = ["CACHE_ENV", "DECODER_PART", "OpenVINOAccelerator", "cache_dir", "cpu_has_native_bf16", "openvino_version",
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



def cache_dir() -> Path:
    """Folder of converted models: ``$MEDFMSEGMENT_CACHE``, else ``$XDG_CACHE_HOME/medfmsegment``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medfmsegment"




# ---------------------------------------------------------------------------- OpenVINO
class ImageEncoder(nn.Module):
    """Normalisation + image encoder, so the converted graph takes images in [0, 1] like ``encode``.

    Holds only the encoder's own weights, so its digest does not change with the decoder's. The
    encoder is an eval-mode copy rewritten for OpenVINO (:func:`~MedFMSegmentLib.backends.fast_encoder.for_openvino`:
    the same values, fewer reference kernels); the model's own encoder is untouched.
    """

    def __init__(self, model: PromptableModel) -> None:
        super().__init__()
        self.image_encoder = for_openvino(model.image_encoder)
        self.sam_normalization = model.spec.normalization == "sam"
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone(), persistent=False)
        self.register_buffer("pixel_std", model.pixel_std.detach().clone(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.sam_normalization:  # same arithmetic as PromptableModel.normalize
            images = (images * 255.0 - self.pixel_mean) / self.pixel_std
        return self.image_encoder(images)



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


def _fingerprint(*modules: nn.Module) -> tuple | None:
    """Cheap identity of the weights: which tensors, and their in-place version counters.

    Loading a state dict, an optimiser step or injecting LoRA layers all change it, so a converted
    graph is never used for weights it was not converted from. None when it cannot be read.
    """
    try:
        return tuple((index, name, id(p), p._version) for index, module in enumerate(modules)
                     for name, p in module.named_parameters())
    except RuntimeError:  # inference tensors carry no version counter
        return None


def _encoder_fingerprint(model: PromptableModel) -> tuple | None:
    return _fingerprint(model.image_encoder)


def _decoder_fingerprint(model: PromptableModel) -> tuple | None:
    return _fingerprint(model.prompt_encoder, model.mask_decoder)


def _get_core():
    global _core
    if _core is None:
        import openvino as ov

        _core = ov.Core()
    return _core


def _example_images(size: int) -> torch.Tensor:
    """Deterministic image-like input in [0, 1] for conversion checks: smooth shapes plus noise."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = ((xx / 0.6) ** 2 + (yy / 0.4) ** 2 <= 1).float() * 0.5 + 0.25 * (xx + 1)
    image = (blob + 0.05 * torch.rand(size, size, generator=generator)).clamp(0, 1)
    return image.expand(1, 3, size, size).contiguous()


def _convert(module: nn.Module, example: tuple[torch.Tensor, ...]):
    """PyTorch module -> static-shape OpenVINO model.

    ``torch.export`` first: with it (or a plain ``torch.jit.trace``) conversion took ~10 s, while
    ``openvino.convert_model`` on the module itself took ~45 s on the 2-core machine.
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
    return cache_dir() / "openvino" / "".join(c if c.isalnum() or c in "-._" else "_" for c in key)


def _precision_check_file(part: str, model: PromptableModel, digest: str, precision: str) -> Path:
    """Marker that ``precision`` passed its check for these weights on this CPU model."""
    try:
        cpu = _get_core().get_property("CPU", "FULL_DEVICE_NAME")
    except Exception:  # noqa: BLE001
        cpu = "unknown"
    cpu_key = hashlib.sha256(f"{cpu}|{torch.get_num_threads()}".encode()).hexdigest()[:16]
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


def _load_or_convert(part: str, model: PromptableModel, module: nn.Module, example_fn: Callable[[], Inputs],
                     digest: str):
    """OpenVINO model of ``module`` from the disk cache, or converted, validated and cached.

    ``example_fn`` gives the example inputs; it is called only when converting (it may be costly).
    """

    folder = _cache_folder(part, model, digest)
    loaded = _read_cached(folder)
    if loaded is not None:
        return loaded
    log.info("converting %s %s for OpenVINO (once per weights; cached in %s)", model.spec.name, part, folder.parent)
    example = example_fn()
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


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads()),
            "INFERENCE_PRECISION_HINT": precision}


# Extra compile settings per part. The decoder graph runs without OpenVINO's "snippets" fusion:
# it fused the reassociated attention's small products with the adds and normalisations around
# them into kernels several times slower. SNIPPETS_MODE is a CPU plugin setting that OpenVINO accepts at compile time without listing it; a version that refuses it
# compiles with defaults.
_PART_CONFIG = {DECODER_PART: {"SNIPPETS_MODE": "DISABLE"}}


def _compile(converted, part: str, precision: str = "f32"):
    """``converted`` compiled for the CPU with :func:`_compile_config` and ``part``'s own settings."""
    config = _compile_config(precision)
    extra = _PART_CONFIG.get(part, {})
    if extra:
        try:
            return _get_core().compile_model(converted, "CPU", {**config, **extra})
        except Exception as exc:  # noqa: BLE001 - a tuning setting must not turn acceleration off
            log.debug("compiling %s with %s failed (%s); using the defaults", part, extra, exc)
    return _get_core().compile_model(converted, "CPU", config)


def _compiled(part: str, model: PromptableModel, module: nn.Module, example_fn: Callable[[], Inputs],
              precision: str = "f32") -> Any:
    """Compiled model for one part, shared by every model with the same weights in this process.

    The converted graph (and its disk cache) does not depend on the precision; the compiled one
    does. The first bf16 compilation on a CPU model is checked against the f32 one (itself
    checked against PyTorch at conversion) on ``example_fn``'s input, and a marker in the disk
    cache records the pass, so a CPU whose bf16 kernels go wrong falls back to PyTorch instead of
    giving bad masks, and later processes skip the check.
    """
    digest = weights_digest(module)
    key = (part, model.spec.name, digest, torch.get_num_threads(), str(cache_dir()), precision)
    with _process_lock:
        compiled = _process_cache.get(key)
        if compiled is not None:
            return compiled
    if precision != "f32":
        marker = _precision_check_file(part, model, digest, precision)
        reference_model = None if marker.is_file() else _compiled(part, model, module, example_fn, "f32")
        with _process_lock:
            converted = _load_or_convert(part, model, module, example_fn, digest)
            compiled = _compile(converted, part, precision)
            if reference_model is not None:  # first use of this precision on this CPU model
                inputs = {i: t.numpy() for i, t in enumerate(example_fn())}
                expected = reference_model.create_infer_request().infer(inputs)
                got = compiled.create_infer_request().infer(inputs)
                errors = [_check_relative(f"{part} output {i} ({precision})", np.asarray(got[i]),
                                          np.asarray(expected[i]), _BF16_MAX_RELATIVE_ERROR)
                          for i in range(len(reference_model.outputs))]
                try:
                    _write_atomically(marker, json.dumps({"precision": precision, "relative_error_vs_f32": errors}))
                except OSError as exc:
                    log.warning("cannot write %s (%s)", marker, exc)
            _process_cache[key] = compiled
        return compiled
    with _process_lock:
        converted = _load_or_convert(part, model, module, example_fn, digest)
        compiled = _compile(converted, part, precision)
        _process_cache[key] = compiled
    return compiled


def _compiled_int8_encoder(model: PromptableModel, module: nn.Module, images: torch.Tensor,
                           float_precision: str) -> Any:
    """The encoder quantized to INT8 (:mod:`.int8`), compiled with
    ``float_precision`` for the operations that stay in floating point.

    Quantizing takes minutes, so the INT8 graph is cached on disk beside the float one, keyed by
    the weights, the versions and the calibration set. Before it is cached, its embedding of the
    example image is checked against the float32 graph's (relative L2 below
    ``_INT8_MAX_RELATIVE_ERROR``).
    """
    from .int8 import CALIBRATION_VERSION, nncf_version, quantize_encoder

    digest = weights_digest(module)
    key = ("encoder-int8", model.spec.name, digest, torch.get_num_threads(), str(cache_dir()), float_precision)
    with _process_lock:
        compiled = _process_cache.get(key)
        if compiled is not None:
            return compiled
        folder = _cache_folder(f"encoder-int8-nncf{nncf_version()}-c{CALIBRATION_VERSION}", model, digest)
        quantized = _read_cached(folder)
        if quantized is None:
            converted = _load_or_convert("encoder", model, module, lambda: (images,), digest)
            log.warning("quantizing the %s encoder to INT8 (once per weights, a few minutes on a small CPU; "
                        "cached in %s)", model.spec.name, folder.parent)
            quantized = quantize_encoder(converted, images.shape[-1], float_stem=_patch_embedding_convolutions(model))
            reference = _compiled("encoder", model, module, lambda: (images,), "f32")
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


class OpenVINOAccelerator:
    """Runs ``encode`` and one-box ``decode`` with compiled OpenVINO models.

    ``encode``/``decode`` return None when a call is outside what the graphs cover; the model
    then runs PyTorch for that call.
    """

    name = "openvino"

    def __init__(self, model: PromptableModel, encoder, decoder, precision: str = "f32") -> None:
        """``decoder`` may be None: every decode then runs in PyTorch."""
        self.precision = precision
        # Per part: training only the decoder (frozen-encoder fine-tuning) keeps the encoder graph valid.
        self._fingerprints = {"encoder": _encoder_fingerprint(model), "decoder": _decoder_fingerprint(model)}
        self._fingerprint_of = {"encoder": _encoder_fingerprint, "decoder": _decoder_fingerprint}
        self._stale: set[str] = set() if decoder is not None else {"decoder"}
        self._encoder = encoder
        self._decoder = decoder
        # Infer requests are not thread-safe; one lock each so a prompt need not wait for an
        # embedding being computed in another thread.
        self._encoder_request = encoder.create_infer_request()
        self._decoder_request = decoder.create_infer_request() if decoder is not None else None
        self._encoder_lock = threading.Lock()
        self._decoder_lock = threading.Lock()
        self._image_shape = tuple(encoder.input(0).get_shape())
        self._tokens_shape = tuple(decoder.input(0).get_shape()) if decoder is not None else None
        # (copy of the last embedding decoded, its token-major copy): later prompts on a slice reuse it.
        self._last_tokens: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def build(cls, model: PromptableModel, precision: str = "f32",
              parts: tuple[str, ...] = ("encoder", "decoder")) -> "OpenVINOAccelerator":
        """Convert (or load from the caches) and compile ``parts`` of ``model`` in ``precision``
        (``f32`` or ``bf16``); the encoder is always one of them."""
        if _encoder_fingerprint(model) is None or _decoder_fingerprint(model) is None:
            raise RuntimeError("the model's weights are inference tensors; load it outside inference_mode")
        size = model.image_size
        images = _example_images(size)
        encoder_module = ImageEncoder(model).eval()
        float_precision = precision
        if precision == "int8":
            float_precision = "bf16" if cpu_has_native_bf16() else "f32"
            encoder = _compiled_int8_encoder(model, encoder_module, images, float_precision)
        else:
            encoder = _compiled("encoder", model, encoder_module, lambda: (images,), precision)

        def decoder_example() -> Inputs:
            # A real float32 embedding (of the example image) so the check sees realistic logits.
            reference_encoder = _compiled("encoder", model, encoder_module, lambda: (images,))
            embedding = reference_encoder.create_infer_request().infer({0: images.numpy()})[0]
            box = torch.tensor([[0.15 * size, 0.2 * size, 0.7 * size, 0.8 * size]])
            return image_tokens(torch.from_numpy(np.array(embedding, copy=True))), box

        decoder = None
        if "decoder" in parts:
            decoder = _compiled(DECODER_PART, model, BoxDecoder(model).eval(), decoder_example,
                                float_precision)
        return cls(model, encoder, decoder, precision)

    def release(self, part: str) -> None:
        """Leave ``part`` (``"encoder"`` or ``"decoder"``) to PyTorch from now on, e.g. because it is
        about to be trained (the expected change, so no stale-weights warning later)."""
        if part not in self._fingerprints:
            raise ValueError(f"unknown part {part!r}")
        self._stale.add(part)

    # ---------------------------------------------------------------- eligibility
    def _usable(self, part: str, model: PromptableModel, *tensors: torch.Tensor) -> bool:
        if part in self._stale or torch.is_grad_enabled() or model.training:
            return False  # autograd needs PyTorch (fine-tuning)
        if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
            return False
        if self._fingerprint_of[part](model) != self._fingerprints[part]:
            # Stale for good: the weights were replaced or modified after conversion.
            log.warning("the model's %s weights changed after OpenVINO conversion; using PyTorch for it", part)
            self._stale.add(part)
            if len(self._stale) == len(self._fingerprints):
                model.accelerator = None
            return False
        return True

    # ---------------------------------------------------------------- inference
    def encode(self, model: PromptableModel, images: torch.Tensor) -> torch.Tensor | None:
        """``(B, 256, 64, 64)`` embeddings, or None to let PyTorch handle the call."""
        if images.ndim != 4 or tuple(images.shape[1:]) != self._image_shape[1:] or not self._usable("encoder", model, images):
            return None
        outputs = []
        with self._encoder_lock:
            # Batched graphs gain nothing on a CPU; one image at a time keeps the shape static.
            for image in images.detach().contiguous().numpy():
                result = self._encoder_request.infer({0: image[None]}, share_inputs=True)
                outputs.append(torch.from_numpy(np.array(result[0], copy=True)))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def decode(self, model: PromptableModel, embedding: torch.Tensor, boxes: torch.Tensor | None,
               points: torch.Tensor | None, point_labels: torch.Tensor | None,
               mask_input: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(logits, iou)`` for exactly one box and nothing else, else None (PyTorch then)."""
        if boxes is None or points is not None or point_labels is not None or mask_input is not None:
            return None
        if tuple(boxes.shape) != (1, 4) or embedding.ndim != 4 or self._tokens_shape is None:
            return None
        batch, channels, height, width = embedding.shape
        if (batch, height * width, channels) != self._tokens_shape:
            return None
        boxes = boxes.float() if boxes.dtype != torch.float32 and boxes.device.type == "cpu" else boxes
        if not self._usable("decoder", model, embedding, boxes):
            return None
        with self._decoder_lock:
            # share_inputs: OpenVINO reads the 4 MB token array in place instead of copying it on
            # every prompt (it saves a copy).
            result = self._decoder_request.infer({0: self._tokens_of(embedding),
                                                  1: boxes.detach().contiguous().numpy()}, share_inputs=True)
            logits = torch.from_numpy(np.array(result[0], copy=True))
            iou = torch.from_numpy(np.array(result[1], copy=True))
        return logits, iou

    def _tokens_of(self, embedding: torch.Tensor) -> np.ndarray:
        """Token-major copy of ``embedding``, reused while the same values come back (every later
        prompt on a slice). Compared by value, not identity: callers such as
        :class:`~MedFMSegmentLib.decoder_step.DecoderStep` copy each slice's embedding into one
        buffer, and inference tensors keep no version counter. Call under the decoder lock.

        NumPy on purpose, single-threaded: a PyTorch operation here leaves PyTorch's OpenMP threads
        spinning for some milliseconds while OpenVINO's threads start the graph on the same cores.
        The comparison costs far less than that slowdown.
        """
        values = embedding.detach().numpy()
        last = self._last_tokens
        if last is not None and last[0].shape == values.shape and np.array_equal(last[0], values):
            return last[1]
        batch, channels = values.shape[:2]
        tokens = np.ascontiguousarray(values.reshape(batch, channels, -1).transpose(0, 2, 1))
        self._last_tokens = (values.copy(), tokens)
        return tokens
