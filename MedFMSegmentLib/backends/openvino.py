"""The OpenVINO backend: the image encoder and the box-prompt decoder as OpenVINO graphs on the CPU.

``model.encode`` and ``model.decode`` keep their signatures, shapes and dtypes (torch float32
tensors); only the engine underneath changes. Anything the converted graphs do not cover falls
back to PyTorch call by call: clicks, several boxes at once, a mask input, gradients, training
mode, a GPU, half precision, or weights changed after conversion. The graphs are arranged for
the CPU (:mod:`.box_decoder`, :func:`~.fast_encoder.for_openvino`); precisions are ``f32``,
``bf16`` (where the CPU computes it natively) and the explicit ``int8`` encoder (:mod:`.int8`).
Conversion, validation and the disk cache of the graphs: :mod:`.openvino_graphs`.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .box_decoder import BoxDecoder, image_tokens
from .fast_encoder import for_openvino
from .openvino_graphs import (CACHE_ENV, DECODER_PART, Inputs, Source, cache_dir, compile_int8_encoder, compile_part,
                              cpu_has_native_bf16, example_images, fingerprint, openvino_version, weights_digest)

if TYPE_CHECKING:
    from ..models import PromptableModel

__all__ = ["CACHE_ENV", "DECODER_PART", "OpenVINOAccelerator", "cache_dir", "cpu_has_native_bf16", "openvino_version",
           "weights_digest"]

log = logging.getLogger(__name__)


class ImageEncoder(nn.Module):
    """Normalisation + image encoder, so the converted graph takes images in [0, 1] like ``encode``.

    Holds only the encoder's weights; its graph is keyed by the digest of the model's own encoder
    (before the rewrite), so the copy is made only when converting. The encoder is an eval-mode
    copy rewritten for OpenVINO (:func:`~MedFMSegmentLib.backends.fast_encoder.for_openvino`:
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


def _encoder_fingerprint(model: PromptableModel) -> tuple | None:
    return fingerprint(model.image_encoder)


def _decoder_fingerprint(model: PromptableModel) -> tuple | None:
    return fingerprint(model.prompt_encoder, model.mask_decoder)


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
        images = example_images(size)
        encoder_source = Source(lambda: ImageEncoder(model).eval(), weights_digest(model.image_encoder))
        float_precision = precision
        if precision == "int8":
            float_precision = "bf16" if cpu_has_native_bf16() else "f32"
            encoder = compile_int8_encoder(model, encoder_source, images, float_precision)
        else:
            encoder = compile_part("encoder", model, encoder_source, lambda: (images,), precision)

        def decoder_example() -> Inputs:
            # A real float32 embedding (of the example image) so the check sees realistic logits.
            reference_encoder = compile_part("encoder", model, encoder_source, lambda: (images,))
            embedding = reference_encoder.create_infer_request().infer({0: images.numpy()})[0]
            box = torch.tensor([[0.15 * size, 0.2 * size, 0.7 * size, 0.8 * size]])
            return image_tokens(torch.from_numpy(np.array(embedding, copy=True))), box

        decoder = None
        if "decoder" in parts:
            decoder = compile_part(DECODER_PART, model, Source.of(BoxDecoder(model).eval()), decoder_example,
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
